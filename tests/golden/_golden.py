"""Helpers shared by the golden generator and its tests: reading pickles, describing values."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import pickletools
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
MANIFEST = DATA / "manifest.json"
TPMF_HEADER = 4 + 1 + 2 + 32  # b"TPMF", format version, python major/minor, sha256 (runtime._serde)
GC_IDENTIFIER_LEN = 3  # "01\n": globus_compute_sdk's DillCode strategy identifier

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_SUBIMPORT = ("cloudpickle.cloudpickle", "subimport")


def load_manifest() -> dict[str, Any]:
    """The manifest written by ``make_golden``."""
    return dict(json.loads(MANIFEST.read_text()))


def pickle_stream(data: bytes, fmt: str) -> bytes:
    """The bare pickle stream inside a golden file of format ``fmt``.

    ``tpmf``: runtime._serde bytes (header, then the pickle); ``pickle``: a staged
    object of encoding ``pickle`` without out-of-band buffers (the stream itself);
    ``gc``: globus_compute_sdk DillCode text (identifier line, then base64 of a dill pickle).
    """
    if fmt == "tpmf":
        return data[TPMF_HEADER:]
    if fmt == "pickle":
        return data
    if fmt == "gc":
        return base64.b64decode(data[GC_IDENTIFIER_LEN:])
    raise ValueError(f"unknown golden pickle format {fmt!r}")


def pickle_globals(stream: bytes) -> set[tuple[str, str]]:
    """Every ``(module, qualname)`` a pickle stream looks up (GLOBAL and STACK_GLOBAL opcodes).

    The pickler writes a STACK_GLOBAL's module and name just before it, each as a
    string or as a memo reference to one, so the two values pushed last are them.
    A module that cloudpickle pickles by reference (``subimport("faas")``) is
    reported as ``(module, "")``.
    """
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what each value-pushing opcode pushed: a str, a global's key, or None
    found: set[tuple[str, str]] = set()
    importing = False  # the last global pushed was cloudpickle's subimport: its argument names a module
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
            continue
        if name in _MEMO_PUT:
            memo[int(arg)] = pushed[-1]
            continue
        if name in _MEMO_GET:
            value = memo.get(int(arg))
        elif name in _STRINGS:
            value = arg
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
            else:
                module, qualname = pushed[-2], pushed[-1]
            if not (isinstance(module, str) and isinstance(qualname, str)):
                raise ValueError(f"{name} without a module and a name before it: {module!r}, {qualname!r}")
            found.add((module, qualname))
            value = ("global", module, qualname)
        else:
            value = None
        if importing and isinstance(value, str):
            found.add((value, ""))
        importing = value == ("global", *_SUBIMPORT)
        pushed.append(value)
    return found


def resolve(dotted: str) -> Any:
    """The object at a public dotted name such as ``faas.WorkerLost`` (module, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def describe(obj: Any) -> Any:
    """A JSON-able description of a value's fields, to compare a loaded golden with its original."""
    if isinstance(obj, BaseException):
        return {"args": describe(list(obj.args)), "attrs": describe(dict(vars(obj))), "str": str(obj)}
    if hasattr(obj, "model_dump") and hasattr(type(obj), "model_fields"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "staged") and hasattr(obj, "sha256"):  # runtime.Ref (slots, no vars)
        return {"staged": describe(obj.staged)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # a NumPy array
        return {"dtype": str(obj.dtype), "values": obj.tolist()}
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, bytes):
        return {"bytes": obj.hex()}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot describe a {type(obj).__name__}")
