"""The ``internals`` and ``input_embeds`` fields of ``/generate``: names, parsing, validation.

``internals`` (a CPU-engine extension, not SGLang's) reads and writes the model's residual
stream at named hook points, in TransformerLens' vocabulary: per decoder layer ``i``
``blocks.{i}.hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
``hook_resid_post``, then ``ln_final.hook_normalized`` (the lm_head input). Every point is
``[hidden_size]`` per position. ``input_embeds`` is SGLang's field: a prompt given as its
``[T][hidden_size]`` embeddings instead of tokens.

Everything is checked here, before any engine work, so a bad request is a 400 that never
reaches the scheduler. Vectors travel as base64 of little-endian float32 bytes. The torch
side (hooks, plans) is ``_hooks``; this module stays free of torch.
"""

from __future__ import annotations

import array
import base64
import binascii
import math
import sys
from dataclasses import dataclass
from typing import Any

from warmpool.cpu_engine._fields import RequestError, UnsupportedError

LAYER_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
FINAL_POINT = "ln_final.hook_normalized"
POSITION_SETS = ("prompt", "generated", "all")
REDUCES = (None, "mean", "last")
OPS = ("add", "scale", "set")

# A positions selector: one of POSITION_SETS, or explicit absolute token indices.
Positions = str | tuple[int, ...]


def hook_names(n_layers: int) -> list[str]:
    """Every hook point of a model with ``n_layers`` decoder layers, in the order they run."""
    names = [f"blocks.{i}.{p}" for i in range(n_layers) for p in LAYER_POINTS]
    return [*names, FINAL_POINT] if n_layers else []


@dataclass(frozen=True)
class ReadSpec:
    """Record a hook point's value at some positions, optionally reduced over them."""

    hook: str
    positions: Positions = "all"
    reduce: str | None = None


@dataclass(frozen=True)
class WriteSpec:
    """Change a hook point's value at some positions before it flows on.

    Attributes:
        hook: The hook point.
        op: ``add`` (x + alpha*v), ``scale`` (x * alpha*v) or ``set`` (alpha*v).
        shape: ``(H,)`` (broadcast over the positions) or ``(k, H)`` (row j for the j-th
            of ``k`` explicit positions).
        data: The vector, float32 in this machine's byte order.
        alpha: The scalar factor.
        positions: Which positions.
    """

    hook: str
    op: str
    shape: tuple[int, ...]
    data: bytes
    alpha: float = 1.0
    positions: Positions = "all"


@dataclass(frozen=True)
class InternalsSpec:
    """A request's reads and writes (applied to every prompt of a batch body)."""

    reads: tuple[ReadSpec, ...] = ()
    writes: tuple[WriteSpec, ...] = ()


def encode_f32(values: list[float], shape: list[int]) -> dict[str, Any]:
    """The wire form of a float32 array: dtype, shape and base64 of little-endian bytes."""
    arr = array.array("f", values)
    if sys.byteorder == "big":
        arr.byteswap()
    return {"dtype": "float32", "shape": shape, "data": base64.b64encode(arr.tobytes()).decode()}


def _positions(raw: object, where: str, context_len: int) -> Positions:
    if raw is None:
        return "all"
    if isinstance(raw, str):
        if raw not in POSITION_SETS:
            raise RequestError(f"{where}.positions must be one of {list(POSITION_SETS)} or a list: {raw!r}")
        return raw
    if not isinstance(raw, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in raw):
        raise RequestError(f"{where}.positions must be 'prompt', 'generated', 'all' or a list of integers")
    if any(p < 0 for p in raw):
        raise RequestError(f"{where}.positions must be non-negative token indices")
    if any(p >= context_len for p in raw):
        raise RequestError(f"{where}.positions: {max(raw)} is not below the context length {context_len}")
    if len(set(raw)) != len(raw):
        raise RequestError(f"{where}.positions must not repeat an index")
    return tuple(raw)


def _hook(raw: object, where: str, names: frozenset[str]) -> str:
    if not isinstance(raw, str) or raw not in names:
        raise RequestError(
            f"{where}.hook: unknown hook point {raw!r} (GET /model_info lists them under hook_points)"
        )
    return raw


def _vector(raw: object, where: str, hidden: int, positions: Positions) -> tuple[tuple[int, ...], bytes]:
    """Check a write's vector; returns its shape and native-order float32 bytes."""
    if not isinstance(raw, dict) or set(raw) - {"dtype", "shape", "data"}:
        raise RequestError(f"{where}.vector must be an object with dtype, shape and data")
    if raw.get("dtype") != "float32":
        raise RequestError(f"{where}.vector.dtype must be 'float32', got {raw.get('dtype')!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(f"{where}.vector.shape must be a list of integers")
    explicit = not isinstance(positions, str)
    if shape != [hidden] and not (len(shape) == 2 and shape[1] == hidden and shape[0] >= 0):
        raise RequestError(f"{where}.vector.shape must be [{hidden}] or [k, {hidden}], got {shape}")
    if len(shape) == 2 and (not explicit or shape[0] != len(positions)):
        raise RequestError(
            f"{where}.vector.shape [k, {hidden}] needs an explicit list of k positions, got {shape}"
        )
    data = raw.get("data")
    try:
        blob = base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except (binascii.Error, ValueError):
        blob = None
    if blob is None:
        raise RequestError(f"{where}.vector.data must be base64 of little-endian float32 bytes")
    need = 4 * math.prod(shape)
    if len(blob) != need:
        raise RequestError(f"{where}.vector.data has {len(blob)} bytes; shape {shape} needs {need}")
    arr = array.array("f", blob)
    if sys.byteorder == "big":
        arr.byteswap()
    if not all(math.isfinite(v) for v in arr):
        raise RequestError(f"{where}.vector.data has a non-finite value")
    return tuple(shape), arr.tobytes()


def parse_internals(raw: object, *, names: list[str], hidden: int, context_len: int) -> InternalsSpec | None:
    """Validate the ``internals`` field of a ``/generate`` body.

    Args:
        raw: The field's JSON value (None: absent).
        names: The model's hook points (empty: the model has no hooks installed).
        hidden: The model's hidden size.
        context_len: Explicit positions must be below this.

    Returns:
        The reads and writes (None when the field is absent).

    Raises:
        RequestError: Anything malformed, naming the field.
        UnsupportedError: The model has no hook points.
    """
    if raw is None:
        return None
    if not names:
        raise UnsupportedError("internals is unsupported for this model (no hook points)")
    if not isinstance(raw, dict) or set(raw) - {"read", "write"}:
        raise RequestError("internals must be an object with 'read' and/or 'write' lists")
    known = frozenset(names)
    reads: list[ReadSpec] = []
    for j, r in enumerate(_items(raw.get("read"), "internals.read")):
        where = f"internals.read[{j}]"
        if set(r) - {"hook", "positions", "reduce"}:
            raise RequestError(f"{where} has unknown keys {sorted(set(r) - {'hook', 'positions', 'reduce'})}")
        hook = _hook(r.get("hook"), where, known)
        if any(x.hook == hook for x in reads):
            raise RequestError(f"{where}.hook: {hook!r} is read twice")
        if r.get("reduce") not in REDUCES:
            raise RequestError(f"{where}.reduce must be null, 'mean' or 'last', got {r.get('reduce')!r}")
        reads.append(ReadSpec(hook, _positions(r.get("positions"), where, context_len), r.get("reduce")))
    writes: list[WriteSpec] = []
    for j, w in enumerate(_items(raw.get("write"), "internals.write")):
        where = f"internals.write[{j}]"
        extra = set(w) - {"hook", "op", "vector", "alpha", "positions"}
        if extra:
            raise RequestError(f"{where} has unknown keys {sorted(extra)}")
        hook = _hook(w.get("hook"), where, known)
        if w.get("op") not in OPS:
            raise RequestError(f"{where}.op must be 'add', 'scale' or 'set', got {w.get('op')!r}")
        alpha = w.get("alpha")
        alpha = 1.0 if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise RequestError(f"{where}.alpha must be a finite number, got {alpha!r}")
        positions = _positions(w.get("positions"), where, context_len)
        shape, data = _vector(w.get("vector"), where, hidden, positions)
        writes.append(WriteSpec(hook, w["op"], shape, data, float(alpha), positions))
    return InternalsSpec(tuple(reads), tuple(writes))


def _items(raw: object, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise RequestError(f"{where} must be a list of objects")
    return raw


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_input_embeds(raw: object, *, hidden: int, context_len: int) -> tuple[list[list[list[float]]], bool]:
    """Validate SGLang's ``input_embeds``: ``[T][H]`` floats, or a batch of those.

    Args:
        raw: The field's JSON value.
        hidden: Each embedding must have this many values.
        context_len: A prompt may have at most this many positions.

    Returns:
        One ``[T][H]`` list per prompt, and whether the body is a batch.

    Raises:
        RequestError: A wrong shape or a value that is not a finite number.
        UnsupportedError: The model's hidden size is unknown (no hooks installed).
    """
    if not hidden:
        raise UnsupportedError("input_embeds is unsupported for this model")
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], list) or not raw[0]:
        raise RequestError(f"input_embeds must be a non-empty [T][{hidden}] list (or a list of them)")
    is_batch = isinstance(raw[0][0], list)
    prompts: list[Any] = raw if is_batch else [raw]
    for j, p in enumerate(prompts):
        where = f"input_embeds[{j}]" if is_batch else "input_embeds"
        if not isinstance(p, list) or not p or not all(isinstance(v, list) and len(v) == hidden for v in p):
            raise RequestError(f"{where} must be a non-empty [T][{hidden}] list of numbers")
        if len(p) > context_len:
            raise RequestError(f"{where} has {len(p)} positions, more than the context length {context_len}")
        for v in p:
            if not all(_finite(x) for x in v):
                raise RequestError(f"{where} must hold only finite numbers")
    return prompts, is_batch
