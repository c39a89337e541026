"""The house rules, checked from the code's own imports (no import is executed).

- Layering: ``runtime <- registry <- warmpool <- faas``; a package imports only
  packages below it (imports under ``if TYPE_CHECKING:`` included: a type is a
  dependency too).
- Across packages only through the public face: a module of one package imports
  another package's names from that package or a public subpackage of it, never
  from a private (``_``-prefixed) module.
- No import circles between modules (imports under ``TYPE_CHECKING`` excepted,
  since they never run).
- No module of the four packages is over 600 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "registry", "warmpool", "faas")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def _imports(module: str, path: Path) -> Iterator[tuple[int, str, list[str], bool]]:
    """(line, imported module, names, under TYPE_CHECKING) for every absolute or relative import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], id(node) in typing_only
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target, [a.name for a in node.names], id(node) in typing_only


def test_layering_points_one_way() -> None:
    wrong = []
    for module, path in MODULES.items():
        own = LAYERS.index(module.split(".")[0])
        for line, target, _, _ in _imports(module, path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (above it)")
    assert not wrong, "\n".join(wrong)


def test_other_packages_only_through_their_public_face() -> None:
    wrong = []
    for module, path in MODULES.items():
        own = module.split(".")[0]
        for line, target, names, _ in _imports(module, path):
            parts = target.split(".")
            if parts[0] not in LAYERS or parts[0] == own:
                continue
            private = [p for p in parts[1:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} {names} (private)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, set())
        for _, target, names, typing_only in _imports(module, path):
            if typing_only:
                continue
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in MODULES and candidate != module:
                    edges.add(candidate)
                    break
    # Tarjan's strongly connected components: any component of 2+ modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_modules_stay_small() -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for path in MODULES.values()
        if (n := path.read_text(encoding="utf-8").count("\n")) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"
