"""docs/errors.md lists every error class of runtime/_errors.py, with its cause and its fix."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import runtime._errors as errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def _classes() -> list[str]:
    return [
        name
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.FaasError) and cls.__module__ == errors.__name__
    ]


def test_every_error_class_has_a_row_with_a_cause_and_a_fix() -> None:
    text = DOC.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.MULTILINE)}
    missing = [name for name in _classes() if name not in rows]
    assert not missing, f"docs/errors.md has no row for {missing}"
    for name in _classes():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert len(cells) == 4 and cells[2] and cells[3], (
            f"the row of {name} needs a cause and a fix: {cells}"
        )


def test_every_error_class_is_in_the_tree() -> None:
    text = DOC.read_text()
    missing = [name for name in _classes() if not re.search(rf"(^|[├└]── ){name}\b", text, re.MULTILINE)]
    assert not missing, f"the tree in docs/errors.md lacks {missing}"
