"""Keep remote tracebacks readable.

cloudpickle replaces ``co_filename`` with ``"<dynamic-code>"`` in functions it
pickles by value, so a worker's traceback would show no file and no source
line. A function artifact therefore carries its source file's name and text;
the worker restores both (code filenames and ``linecache``) after unpickling.
"""

from __future__ import annotations

import inspect
import linecache
import types
from dataclasses import dataclass
from typing import Any

_DYNAMIC = "<dynamic-code>"


@dataclass(frozen=True)
class FunctionBundle:
    """A function plus the source file it was defined in.

    Attributes:
        fn: The function (pickled by value or reference by cloudpickle).
        filename: Its source file's path on the submitting machine.
        source: That file's text, for remote tracebacks ("" when unknown).
    """

    fn: Any
    filename: str = ""
    source: str = ""


def bundle_function(fn: Any) -> FunctionBundle:
    """Wrap ``fn`` with its source file name and text (both best effort)."""
    try:
        filename = inspect.getsourcefile(fn) or ""
        with open(filename, encoding="utf-8") as f:
            source = f.read()
    except (TypeError, OSError):
        filename, source = "", ""
    return FunctionBundle(fn=fn, filename=filename, source=source)


def _retarget(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_retarget(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    if code.co_filename == _DYNAMIC:
        return code.replace(co_filename=filename, co_consts=consts)
    return code.replace(co_consts=consts)


def restore_function(obj: Any) -> Any:
    """Unwrap a FunctionBundle, restoring filenames and source lines; other objects pass through."""
    if not isinstance(obj, FunctionBundle):
        return obj
    fn = obj.fn
    if not obj.filename:
        return fn
    if obj.source:
        lines = obj.source.splitlines(keepends=True)
        linecache.cache[obj.filename] = (len(obj.source), None, lines, obj.filename)
    module = getattr(fn, "__module__", None)
    targets = [fn, *getattr(fn, "__globals__", {}).values()]
    for target in targets:
        code = getattr(target, "__code__", None)
        same_module = getattr(target, "__module__", None) == module
        if isinstance(code, types.CodeType) and same_module and code.co_filename == _DYNAMIC:
            target.__code__ = _retarget(code, obj.filename)
    return fn
