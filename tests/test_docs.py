"""The documentation builds and its examples run.

- ``mkdocs build --strict`` succeeds (no broken link, no unresolved reference),
  the home page is the README, and the API reference has a page for every
  public class and function of every public face and nothing private.
- Every Python example in README.md and docs/ is a test (Sybil's Markdown
  parsers). An example runs against one embedded pool shared by the module
  (the tiny model, an isolated store), in a namespace per document, in order.
  An example that cannot run here (a cluster, an S3 bucket, a Globus Compute
  endpoint, or a fragment of a larger program) is marked in the Markdown with
  ``<!-- skip: next "why" -->``: it is still compiled and its imports are
  imported. Hidden ``<!-- invisible-code-block: python -->`` blocks set up or
  check what the visible examples need and claim.
- No example imports a private module or name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Document, Example
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

from docs_hooks import FACES  # the public faces the API reference documents: one list for both

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass
class _DocRun:
    """One document's examples and how far they have been evaluated (examples share a namespace)."""

    document: Document
    examples: list[Example]
    done: int = 0
    outcomes: dict[int, str] = field(default_factory=dict)  # example index -> "ran" / "syntax-only: why"


def _parse(path: Path) -> _DocRun:
    document = Document.parse(str(path), PythonCodeBlockParser(), SkipParser())
    document.namespace["__name__"] = "__main__"  # examples guarded by `if __name__ == "__main__":` run
    return _DocRun(document, list(document.examples()))


def _is_code(example: Example) -> bool:
    return not isinstance(example.parsed, tuple)  # skip directives parse to (action, reason)


def _is_visible(run: _DocRun, example: Example) -> bool:
    return _is_code(example) and not run.document.text.startswith("<!--", example.region.start)


def _visible_examples() -> Iterator[tuple[Path, int, int]]:
    for path in DOC_FILES:
        run = _parse(path)
        for index, example in enumerate(run.examples):
            if _is_visible(run, example):
                yield path, index, example.line


_EXAMPLES = list(_visible_examples())
_RUNS: dict[Path, _DocRun] = {}


def _imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import | ast.ImportFrom)]


def _check_syntax_and_imports(example: Example) -> None:
    """For an example that cannot run here: it compiles, and its imports import (bound in the namespace)."""
    source = str(example.parsed)
    compile(source, f"{example.path}:{example.line}", "exec", dont_inherit=True)
    for node in _imports(source):
        exec(compile(ast.Module(body=[node], type_ignores=[]), example.path, "exec"), example.namespace)
    example.namespace.pop("__builtins__", None)


def _evaluate_through(path: Path, index: int) -> _DocRun:
    """Evaluate the document's examples in order up to the next visible example after ``index``."""
    run = _RUNS.get(path) or _RUNS.setdefault(path, _parse(path))
    stop = next(
        (i for i in range(index + 1, len(run.examples)) if _is_visible(run, run.examples[i])),
        len(run.examples),
    )
    while run.done < stop:
        example = run.examples[run.done]
        run.done += 1
        try:
            example.evaluate()
        except SkipTest as why:
            if not _is_code(example):
                raise
            _check_syntax_and_imports(example)
            run.outcomes[run.done - 1] = f"syntax-only: {why}"
        else:
            if _is_code(example):
                run.outcomes[run.done - 1] = "ran"
    return run


@pytest.fixture(scope="module")
def docs_pool(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One embedded pool (the tiny model, a fresh store) as the default client of every example."""
    import faas

    faas.configure(store=tmp_path_factory.mktemp("docs-store").as_uri(), workers=2)
    yield
    faas.shutdown()


@pytest.mark.parametrize(
    ("path", "index"),
    [(path, index) for path, index, _ in _EXAMPLES],
    ids=[f"{path.relative_to(ROOT)}:{line}" for path, _, line in _EXAMPLES],
)
def test_doc_example(path: Path, index: int, docs_pool: None) -> None:
    run = _evaluate_through(path, index)
    assert index in run.outcomes, "the example was not evaluated"


def test_doc_examples_counted(docs_pool: None) -> None:
    """Every visible example ran or was checked for syntax and imports (with a reason); print the counts."""
    counts = {"ran": 0, "syntax-only": 0}
    for path, index, line in _EXAMPLES:
        outcome = _evaluate_through(path, index).outcomes[index]
        kind = outcome.split(":")[0]
        assert kind in counts, f"{path}:{line}: {outcome}"
        assert kind == "ran" or outcome.split(":", 1)[1].strip(), f"{path}:{line}: skipped without a reason"
        counts[kind] += 1
    print(f"\ndocumentation examples: {counts['ran']} run, {counts['syntax-only']} syntax-only")
    assert sum(counts.values()) == len(_EXAMPLES) >= 25
    assert counts["ran"] >= 17


def _private_imports(source: str) -> list[str]:
    """The private modules and names that ``source`` imports."""
    hidden = []
    for node in _imports(source):
        names = [alias.name for alias in node.names]
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else names
        hidden += [m for m in modules if any(part.startswith("_") for part in m.split("."))]
        if isinstance(node, ast.ImportFrom):
            hidden += [n for n in names if n.startswith("_")]
    return hidden


def test_examples_import_no_private_module() -> None:
    private = []
    for path in DOC_FILES:
        for example in _parse(path).examples:
            if _is_code(example) and (hidden := _private_imports(str(example.parsed))):
                private.append(f"{path.relative_to(ROOT)}:{example.line}: {hidden}")
    assert not private, private


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    """The harness itself: private imports are found; a skipped example with a bad import fails."""
    assert _private_imports("import faas._function\nfrom runtime import _serde\nfrom faas import Model") == [
        "faas._function",
        "_serde",
    ]
    assert _private_imports("import faas\nfrom faas.triggers import TriggerRunner") == []
    doc = tmp_path / "doc.md"
    doc.write_text('<!-- skip: next "not here" -->\n```python\nimport faas.no_such_module\n```\n')
    with pytest.raises(ModuleNotFoundError):
        _evaluate_through(doc, 1)
    broken = tmp_path / "broken.md"
    broken.write_text('<!-- skip: next "not here" -->\n```python\ndef broken(:\n```\n')
    with pytest.raises(SyntaxError):
        _evaluate_through(broken, 1)


def test_every_python_fence_is_an_example() -> None:
    """Sybil finds every ```python fence (a typo in a fence or a skip directive would hide an example)."""
    fences = sum(path.read_text(encoding="utf-8").count("```python\n") for path in DOC_FILES)
    assert len(_EXAMPLES) == fences


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_docs_build_strict(site: Path) -> None:
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Serverless functions for calls to trillion-parameter models" in home
    assert 'href="service/"' in home  # README's docs/service.md link, made relative to the site
    assert (site / "search" / "search_index.json").stat().st_size > 10_000
    for page in ("user-guide", "modes", "modes/generate", "service", "cluster", "errors", "triggers"):
        assert (site / page / "index.html").is_file(), page
    generate = (site / "modes" / "generate" / "index.html").read_text(encoding="utf-8")
    assert "<code>int | str | None</code>" in generate  # a table cell's escaped pipe, unescaped
    # Hidden checks stay hidden: only inside an HTML comment.
    assert "fragments.remote()" in generate
    assert "fragments.remote()" not in re.sub(r"<!--.*?-->", "", generate, flags=re.S)


def test_api_pages_show_no_sphinx_roles(site: Path) -> None:
    """Docstrings' ``:class:`X``` roles are rendered as code, not as ``:class:`` text."""
    pages = list((site / "api").rglob("index.html"))
    assert len(pages) > 100
    roles = re.compile(r":(class|meth|func|data|attr|mod|exc|obj):<code>")
    assert not [str(p.relative_to(site)) for p in pages if roles.search(p.read_text(encoding="utf-8"))]


def _headings(html: str) -> list[str]:
    return re.findall(r'id="([^"]+)" class="doc doc-heading', html)


def test_api_reference_covers_every_public_name(site: Path) -> None:
    documented: dict[str, str] = {}  # heading id -> page
    for page in (site / "api").rglob("index.html"):
        for heading in _headings(page.read_text(encoding="utf-8")):
            documented[heading] = str(page.relative_to(site))
    assert len(documented) > 300, len(documented)
    missing = []
    for face in FACES:
        module = importlib.import_module(face)
        face_page = (site / "api" / face / "index.html").read_text(encoding="utf-8")
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                if f"{face}.{name}" not in documented:
                    missing.append(f"{face}.{name} (attribute)")
                continue
            # Its own page, or a link from this face's page to the page of the face that documents it.
            if f"{face}.{name}" in documented:
                continue
            linked = re.findall(rf'href="\.\./([\w.]+)/{re.escape(name)}/"', face_page)
            if not any(f"{other}.{name}" in documented for other in linked):
                missing.append(f"{face}.{name}")
    assert not missing, missing
    # A class page documents its public members, and a docstring's sections are rendered.
    client = (site / "api" / "faas" / "Client" / "index.html").read_text(encoding="utf-8")
    assert "faas.Client.shutdown" in _headings(client)


def test_api_reference_documents_nothing_private(site: Path) -> None:
    private = []
    for page in (site / "api").rglob("index.html"):
        for heading in _headings(page.read_text(encoding="utf-8")):
            parts = heading.split(".")
            if any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts):
                private.append(f"{page.relative_to(site)}: {heading}")
    assert not private, private
