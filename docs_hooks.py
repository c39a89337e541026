"""MkDocs hooks (``mkdocs.yml`` names this file): the home page and the API reference.

- The home page (``index.md``) is the README, with its ``docs/...`` links made
  relative to the docs folder; nothing is copied by hand.
- The API reference is generated from the public faces: for every package in
  :data:`FACES`, a page listing its ``__all__``, and one page per public class
  and function (rendered by mkdocstrings from the docstrings). An object that
  several faces export gets one page, under the first face (in :data:`FACES`
  order) that exports it; the other faces link to it.

``python docs_hooks.py`` prints the generated pages' paths (a quick check).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

# The public faces, in the order that decides an object's home page (users meet `faas` first).
FACES = [
    "faas",
    "faas.clients",
    "faas.service",
    "faas.openai",
    "faas.triggers",
    "warmpool",
    "warmpool.local",
    "warmpool.globus_compute",
    "warmpool.engines",
    "warmpool.cpu_engine",
    "registry",
    "runtime",
]


@dataclass
class ApiPage:
    """One generated page: where it lives and what it says."""

    src_uri: str
    title: str
    markdown: str


@dataclass
class ApiReference:
    """The generated API reference: its pages and its navigation."""

    pages: list[ApiPage] = field(default_factory=list)
    nav: list[Any] = field(default_factory=list)


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "attribute"


def build_api_reference() -> ApiReference:
    """Import every face and lay out the API reference pages (one per public class and function)."""
    home: dict[int, str] = {}  # id(object) -> "face.Name" of its page
    ref = ApiReference()
    index_lines = [
        "# API reference",
        "",
        "Generated from the docstrings of the public faces (each package's `__init__` and its `__all__`).",
        "Import names from the face shown; everything else is private.",
        "",
        "| package | summary |",
        "|---|---|",
    ]
    for face in FACES:
        module = importlib.import_module(face)
        names = list(module.__all__)
        summary = (inspect.getdoc(module) or "").strip().splitlines()[0:1]
        index_lines.append(f"| [`{face}`]({face}.md) | {summary[0] if summary else ''} |")
        face_lines = [
            f"# `{face}`",
            "",
            f"::: {face}",
            "    options:",
            "      members: false",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "",
        ]
        rows: dict[str, list[str]] = {"class": [], "function": [], "attribute": []}
        attributes: list[str] = []
        face_nav: list[Any] = [{"Overview": f"api/{face}.md"}]
        for name in sorted(names, key=str.lower):
            obj = getattr(module, name)
            kind = _kind(obj)
            if kind == "attribute":
                attributes.append(name)
                rows[kind].append(f"| [`{name}`](#{face}.{name}) | |")
                continue
            key = id(obj)
            first = key not in home
            if first:
                home[key] = f"{face}.{name}"
                src = f"api/{face}/{name}.md"
                ref.pages.append(ApiPage(src, name, _object_page(f"{face}.{name}")))
                face_nav.append({name: src})
            target_face, _, target_name = home[key].rpartition(".")
            line = (inspect.getdoc(obj) or "").strip().splitlines()[0:1]
            doc = _escape_cell(line[0]) if line else ""
            note = "" if first else f" (documented as `{target_face}.{target_name}`)"
            rows[kind].append(f"| [`{name}`]({target_face}/{target_name}.md){note} | {doc} |")
        for kind, title in (("class", "Classes"), ("function", "Functions"), ("attribute", "Attributes")):
            if rows[kind]:
                face_lines += [f"## {title}", "", "| name | summary |", "|---|---|", *rows[kind], ""]
        for name in attributes:
            face_lines += [
                f"::: {face}.{name}",
                "    options:",
                "      show_root_heading: true",
                "      show_root_full_path: true",
                "      heading_level: 3",
                "",
            ]
        ref.pages.append(ApiPage(f"api/{face}.md", face, "\n".join(face_lines)))
        ref.nav.append({face: face_nav})
    ref.pages.append(ApiPage("api/index.md", "API reference", "\n".join(index_lines) + "\n"))
    ref.nav.insert(0, "api/index.md")
    return ref


def _object_page(identifier: str) -> str:
    """One object's page: its docstring rendered by mkdocstrings, its full public name as the title."""
    return "\n".join(
        [
            f"::: {identifier}",
            "    options:",
            "      heading_level: 1",
            "      show_root_full_path: true",
            "",
        ]
    )


_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj):(<code>)")
_CODE = re.compile(r"<code>[^<]*</code>")


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def home_page_markdown() -> str:
    """The README as the site's home page: links into ``docs/`` made relative to the docs folder."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


_REFERENCE: ApiReference | None = None


def on_config(config: Any) -> Any:
    """Add the API reference to the navigation (built once per build)."""
    global _REFERENCE
    _REFERENCE = build_api_reference()
    nav = config["nav"]
    if nav is not None and not any(isinstance(item, dict) and "API reference" in item for item in nav):
        nav.append({"API reference": _REFERENCE.nav})
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the home page and the API reference pages to the site's files (none is written to docs/)."""
    from mkdocs.structure.files import File

    assert _REFERENCE is not None
    files.append(File.generated(config, "index.md", content=home_page_markdown()))
    for page in _REFERENCE.pages:
        files.append(File.generated(config, page.src_uri, content=page.markdown))
    return files


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    r"""Render the Sphinx roles some docstrings use (``:class:`X```) as plain code spans.

    Also unescape ``\|`` in code spans: GitHub needs the escape for a pipe in a
    table cell's code, Python-Markdown's tables keep the backslash.
    """
    html = _ROLE.sub(r"\1", html)
    return _CODE.sub(lambda m: m.group(0).replace("\\|", "|"), html)


if __name__ == "__main__":
    for page in build_api_reference().pages:
        print(page.src_uri)
