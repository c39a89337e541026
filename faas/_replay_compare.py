"""Compare an invocation's original return value with its replay's, field by field.

What counts (see docs/provenance.md, "What replay compares"):

- Text, token ids, integers, booleans, ``None`` and every other non-float leaf: exactly.
- Floats (Python floats, numpy float scalars and arrays, anything with ``__array__`` such
  as a torch tensor; logprobs, hidden states, embeddings): within :class:`Tolerance`, the
  ``numpy.isclose`` rule ``|replay - original| <= atol + rtol * |original|``; NaN matches
  NaN. Shapes must be equal.
- Run-specific fields of engine responses, never: inside a ``meta_info`` mapping (SGLang's
  ``/generate`` and ``/encode``) or an OpenAI-style response body (one with an ``object``
  key such as ``chat.completion``), timing fields (names containing ``latency``, ``time``,
  ``delay``, ``duration``, ``throughput`` or ``seconds`` (the CPU engine's
  ``engine_share_seconds``), or ending in ``_ts``/``_s``), request ids
  (``id``), ``created``, and scheduler counters (``cached_tokens``, ``cached_tokens_details``,
  ``total_retractions``). They are listed as ignored, not as differences.

Containers are walked: mappings by key, lists and tuples by index, dataclasses, pydantic
models and plain objects by attribute. Each difference carries a path such as
``meta_info.output_token_logprobs[3][0]`` or ``hidden_states[5][2]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4

_TIMING = re.compile(r"latency|time|delay|duration|throughput|seconds|_ts$|_s$")
_RUN_SPECIFIC = {"id", "created", "cached_tokens", "cached_tokens_details", "total_retractions"}
_PER_ARRAY = 5  # differing elements listed per array; the rest are counted


@dataclass(frozen=True)
class Tolerance:
    """How far replayed floats may be from the original's: ``|r - o| <= atol + rtol * |o|``.

    The defaults absorb float32 reduction-order noise (another batch composition or thread
    count) and still catch a changed model or prompt, which moves logprobs and hidden states
    by far more.

    Attributes:
        rtol: Relative tolerance.
        atol: Absolute tolerance.
    """

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol and atol must be >= 0, got rtol={self.rtol}, atol={self.atol}")


@dataclass(frozen=True)
class Difference:
    """One field whose replayed value differs.

    Attributes:
        path: Where, e.g. ``meta_info.output_token_logprobs[3][0]`` (empty: the value itself).
        reason: ``value`` (exact mismatch), ``float`` (beyond tolerance), ``type``,
            ``shape``, ``length``, ``missing`` (only in the original) or ``extra`` (only in the replay).
        original: A short repr of the original's value there.
        replay: A short repr of the replay's value there.
    """

    path: str
    reason: str
    original: str
    replay: str

    def describe(self) -> dict[str, str]:
        """A JSON-able summary."""
        return {
            "path": self.path or "<value>",
            "reason": self.reason,
            "original": self.original,
            "replay": self.replay,
        }


@dataclass
class Comparison:
    """The outcome of :func:`compare`.

    Attributes:
        differences: The differing fields, in walk order, at most ``limit`` of them.
        more: Differences found past ``limit`` (or past the per-array listing), not listed.
        ignored: Paths of run-specific fields that were not compared.
    """

    differences: list[Difference] = field(default_factory=list)
    more: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        """Whether nothing that matters differs."""
        return not self.differences and not self.more


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _is_response(value: Mapping[Any, Any]) -> bool:
    return isinstance(value.get("object"), str)


def _ignored_key(key: object) -> bool:
    return isinstance(key, str) and (key in _RUN_SPECIFIC or bool(_TIMING.search(key)))


def _fields(value: Any) -> dict[str, Any] | None:
    """Named fields of a dataclass, pydantic model or plain object; None for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    model_fields = getattr(type(value), "model_fields", None)
    if isinstance(model_fields, dict):
        return {name: getattr(value, name) for name in model_fields}
    if hasattr(value, "__dict__") and not callable(value):
        return dict(vars(value))
    return None


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__array__") and not isinstance(value, np.generic | str | bytes):
        if hasattr(value, "detach"):  # torch: leave autograd and the device first
            value = value.detach().cpu()
        return np.asarray(value)
    return None


class _Walker:
    def __init__(self, tol: Tolerance, limit: int) -> None:
        self.tol, self.limit = tol, limit
        self.out = Comparison()

    def differ(self, path: str, reason: str, a: Any, b: Any) -> None:
        if len(self.out.differences) < self.limit:
            self.out.differences.append(Difference(path, reason, _short(a), _short(b)))
        else:
            self.out.more += 1

    def close(self, a: float, b: float) -> bool:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(b - a) <= self.tol.atol + self.tol.rtol * abs(a)

    def walk(self, a: Any, b: Any, path: str, engine: bool = False) -> None:
        if isinstance(a, np.generic):
            a = a.item()
        if isinstance(b, np.generic):
            b = b.item()
        arr_a, arr_b = _as_array(a), _as_array(b)
        if arr_a is not None or arr_b is not None:
            self.arrays(arr_a if arr_a is not None else a, arr_b if arr_b is not None else b, path)
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            self.mapping(a, b, path, engine)
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and type(a) is type(b):
            if len(a) != len(b):
                self.differ(path, "length", len(a), len(b))
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                self.walk(x, y, f"{path}[{i}]", engine)
        elif _number(a) and _number(b) and (isinstance(a, float) or isinstance(b, float)):
            if not self.close(float(a), float(b)):
                self.differ(path, "float", a, b)
        elif type(a) is not type(b):
            self.differ(path, "type", type(a).__name__, type(b).__name__)
        elif isinstance(a, str | bytes | int | bool) or a is None:
            if a != b:
                self.differ(path, "value", a, b)
        else:
            fa, fb = _fields(a), _fields(b)
            if fa is not None and fb is not None:
                self.mapping(fa, fb, path, engine)
            elif not _equal(a, b):
                self.differ(path, "value", a, b)

    def mapping(self, a: Mapping[Any, Any], b: Mapping[Any, Any], path: str, engine: bool) -> None:
        engine = engine or _is_response(a) or _is_response(b)
        for key in list(a) + [k for k in b if k not in a]:
            sub = _key_path(path, key)
            if engine and _ignored_key(key):
                self.out.ignored.append(sub)
            elif key not in b:
                self.differ(sub, "missing", a[key], "<absent>")
            elif key not in a:
                self.differ(sub, "extra", "<absent>", b[key])
            else:
                self.walk(a[key], b[key], sub, engine or key == "meta_info")

    def arrays(self, a: Any, b: Any, path: str) -> None:
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            self.differ(path, "type", type(a).__name__, type(b).__name__)
            return
        if a.shape != b.shape:
            self.differ(path, "shape", a.shape, b.shape)
            return
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            try:
                ok = np.isclose(b, a, rtol=self.tol.rtol, atol=self.tol.atol, equal_nan=True)
            except TypeError:  # a float array against an object array
                self.differ(path, "type", a.dtype, b.dtype)
                return
            reason = "float"
        elif a.dtype.kind == "O" or b.dtype.kind == "O":
            for i in np.ndindex(a.shape):
                self.walk(a[i], b[i], path + "".join(f"[{j}]" for j in i))
            return
        else:
            ok = a == b
            reason = "value"
        bad = np.argwhere(~np.asarray(ok, dtype=bool).reshape(a.shape))
        for n, idx in enumerate(bad):
            if n >= _PER_ARRAY:
                self.out.more += len(bad) - _PER_ARRAY
                break
            i = tuple(int(j) for j in idx)
            self.differ(path + "".join(f"[{j}]" for j in i), reason, a[i].item(), b[i].item())


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # comparison itself failed (ambiguous truth value, ...): fall back to repr
        return repr(a) == repr(b)


def compare(original: Any, replay: Any, tolerance: Tolerance | None = None, *, limit: int = 50) -> Comparison:
    """Compare two return values by what matters (see the module docstring).

    Args:
        original: The original invocation's return value.
        replay: The replay's return value.
        tolerance: Float tolerance; the default is ``Tolerance()`` (rtol 1e-3, atol 1e-4).
        limit: List at most this many differences; the rest are counted in ``more``.

    Returns:
        The differences (with paths) and the run-specific fields left out.
    """
    walker = _Walker(tolerance or Tolerance(), limit)
    walker.walk(original, replay, "")
    return walker.out
