"""Model internals: named hook points to read and to write, per request inside a shared batch.

A function asks for them with ``model.generate(..., internals=Internals(read=[...], write=[...]))``.
Hook points use TransformerLens's names for Llama-family models::

    blocks.{i}.hook_resid_pre    the residual stream entering layer i
    blocks.{i}.hook_attn_out     the attention output (after o_proj, before the residual add)
    blocks.{i}.hook_resid_mid    resid_pre + attn_out (the input of the MLP's norm)
    blocks.{i}.hook_mlp_out      the MLP output
    blocks.{i}.hook_resid_post   the residual stream leaving layer i
    ln_final.hook_normalized     the final norm's output (the unembedding's input)

Positions are token indices of the sequence (prompt, then generated tokens). The states at
position p exist once token p has been fed to the model, so ``"generated"`` covers the
generated tokens fed back (all but the last), as SGLang's hidden states do.

This module builds the engine's wire form (vectors as base64 float32), decodes the arrays
that come back, records what was asked for provenance (vectors by digest, never by value),
and serves the one read an engine without named hooks can: ``ln_final.hook_normalized``
through SGLang's ``return_hidden_states``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from runtime._errors import SubmitError, UnsupportedFeatureError
from runtime._objectref import ObjectRef

HOOK_NAME = re.compile(
    r"^(?:blocks\.(?P<layer>0|[1-9][0-9]{0,3})\.hook_(?:resid_pre|resid_mid|resid_post|attn_out|mlp_out)"
    r"|ln_final\.hook_normalized)$"
)
FINAL = "ln_final.hook_normalized"
"""The one hook point an engine with only final-layer hidden states (SGLang) can serve."""

Positions = Literal["prompt", "generated", "all"] | Sequence[int]
Reduce = Literal["mean", "last"] | None
Op = Literal["add", "scale", "set"]
VectorInput = np.ndarray | Sequence[float] | Sequence[Sequence[float]] | ObjectRef

_MAX_POSITION = 1 << 20


def _check_hook(hook: object) -> str:
    if not isinstance(hook, str) or not HOOK_NAME.match(hook):
        raise SubmitError(
            f"{hook!r} is not a hook point name: use blocks.{{i}}.hook_resid_pre, hook_attn_out, "
            "hook_resid_mid, hook_mlp_out, hook_resid_post, or ln_final.hook_normalized "
            "(model.hook_points() lists the model's)."
        )
    return hook


def _check_positions(positions: object) -> str | tuple[int, ...]:
    if positions in ("prompt", "generated", "all"):
        return str(positions)
    if isinstance(positions, str) or not isinstance(positions, Sequence | np.ndarray):
        raise SubmitError(
            f"positions must be 'prompt', 'generated', 'all' or a list of token indices, got {positions!r}."
        )
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 <= int(p) < _MAX_POSITION:
            raise SubmitError(f"positions must be token indices >= 0, got {p!r}.")
        out.append(int(p))
    if not out:
        raise SubmitError("positions is an empty list; name at least one token index.")
    return tuple(out)


@dataclass(frozen=True)
class Read:
    """Read one hook point's activations for this request.

    Args:
        hook: The hook point's name (see ``model.hook_points()``).
        positions: ``"prompt"``, ``"generated"``, ``"all"`` or a list of token indices.
        reduce: ``None`` keeps one row per position, ``(m, hidden_size)``; ``"mean"`` and
            ``"last"`` reduce them to ``(hidden_size,)``.
    """

    hook: str
    positions: Positions = "all"
    reduce: Reduce = None

    def __post_init__(self) -> None:
        _check_hook(self.hook)
        object.__setattr__(self, "positions", _check_positions(self.positions))
        if self.reduce not in (None, "mean", "last"):
            raise SubmitError(f"reduce must be None, 'mean' or 'last', got {self.reduce!r}.")

    def wire(self) -> dict[str, Any]:
        """The engine's form of this read."""
        pos = self.positions
        return {
            "hook": self.hook,
            "positions": pos if isinstance(pos, str) else list(pos),
            "reduce": self.reduce,
        }


@dataclass(frozen=True)
class Write:
    """Change one hook point's activations for this request alone (steering, injection).

    Args:
        hook: The hook point's name.
        op: ``"add"`` (x + alpha*v), ``"scale"`` (x * alpha*v, elementwise) or ``"set"``
            (x = alpha*v).
        vector: ``(hidden_size,)``, applied at every selected position, or ``(k,
            hidden_size)`` with a list of k positions; an array, a list, or an
            ``ObjectRef`` to a ``.npy`` file (loaded in the worker).
        alpha: The factor applied to ``vector``.
        positions: ``"prompt"``, ``"generated"``, ``"all"`` or a list of token indices.
    """

    hook: str
    op: Op = "add"
    vector: VectorInput = field(default=(), repr=False)
    alpha: float = 1.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        _check_hook(self.hook)
        object.__setattr__(self, "positions", _check_positions(self.positions))
        if self.op not in ("add", "scale", "set"):
            raise SubmitError(f"op must be 'add', 'scale' or 'set', got {self.op!r}.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
        ):
            raise SubmitError(f"alpha must be a finite number, got {self.alpha!r}.")
        if not isinstance(self.vector, ObjectRef):
            _as_array(self.vector, self)  # fail at construction, not in the worker

    def array(self) -> np.ndarray:
        """The vector as float32 (an ``ObjectRef`` is read through the current store)."""
        if isinstance(self.vector, ObjectRef):
            try:
                loaded = np.load(io.BytesIO(self.vector.read_bytes()), allow_pickle=False)
            except ValueError as exc:
                raise SubmitError(f"The vector {self.vector!r} is not a .npy array: {exc}") from None
            return _as_array(loaded, self)
        return _as_array(self.vector, self)


def _as_array(value: object, write: Write) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise SubmitError(f"The vector of the write at {write.hook} is not numeric.") from None
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise SubmitError(
            f"The vector of the write at {write.hook} must be (hidden_size,) or (k, hidden_size), "
            f"got shape {arr.shape}."
        )
    if arr.ndim == 2 and (isinstance(write.positions, str) or arr.shape[0] != len(write.positions)):
        raise SubmitError(
            f"A (k, hidden_size) vector at {write.hook} needs a list of exactly k positions; "
            f"got shape {arr.shape} with positions {write.positions!r}."
        )
    if not np.isfinite(arr).all():
        raise SubmitError(f"The vector of the write at {write.hook} has NaN or infinite values.")
    return arr


@dataclass(frozen=True)
class Internals:
    """What one ``generate`` call reads from and writes to the model's hook points.

    Args:
        read: Hook points to read (one read per hook point).
        write: Changes to apply, in order, to this request alone.
    """

    read: Sequence[Read] = ()
    write: Sequence[Write] = ()

    def __post_init__(self) -> None:
        reads, writes = tuple(self.read), tuple(self.write)
        if not all(isinstance(r, Read) for r in reads) or not all(isinstance(w, Write) for w in writes):
            raise SubmitError("Internals takes read=[faas.Read(...)] and write=[faas.Write(...)].")
        hooks = [r.hook for r in reads]
        dup = sorted({h for h in hooks if hooks.count(h) > 1})
        if dup:
            raise SubmitError(f"{dup[0]} is read twice; read each hook point once per call.")
        if not reads and not writes:
            raise SubmitError("Internals needs at least one read or write.")
        object.__setattr__(self, "read", reads)
        object.__setattr__(self, "write", writes)


def _b64(arr: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(arr, dtype="<f4")
    return {"dtype": "float32", "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode()}


def wire_body(spec: Internals) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine's ``internals`` field, and its provenance form (vectors by sha256).

    Raises:
        SubmitError: A vector cannot be read or has the wrong shape.
    """
    writes, recorded = [], []
    for w in spec.write:
        arr = w.array()
        pos = w.positions if isinstance(w.positions, str) else list(w.positions)
        base = {"hook": w.hook, "op": w.op, "alpha": float(w.alpha), "positions": pos}
        writes.append({**base, "vector": _b64(arr)})
        digest = hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()
        source = repr(w.vector) if isinstance(w.vector, ObjectRef) else None
        recorded.append({**base, "vector_sha256": digest, "vector_shape": list(arr.shape), "source": source})
    reads = [r.wire() for r in spec.read]
    return {"read": reads, "write": writes}, {"read": reads, "write": recorded}


def decode(raw: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """The arrays of an engine's ``meta_info["internals"]``, and the positions each holds."""
    arrays, positions = {}, {}
    for hook, item in raw.items():
        data = base64.b64decode(item["data"])
        arrays[hook] = np.frombuffer(data, dtype="<f4").reshape(item["shape"]).copy()
        positions[hook] = [int(p) for p in item.get("positions", [])]
    return arrays, positions


def hidden_fallback(spec: Internals) -> Read:
    """The read an engine without named hooks can serve, or UnsupportedFeatureError naming the rest."""
    for w in spec.write:
        raise UnsupportedFeatureError(
            f"This engine cannot write hook point {w.hook}: it serves final-layer hidden states only "
            "(see docs/modes/internals.md for what an SGLang deployment would need)."
        )
    for r in spec.read:
        if r.hook != FINAL:
            raise UnsupportedFeatureError(
                f"This engine cannot read hook point {r.hook}: it serves only {FINAL} "
                "(final-layer hidden states)."
            )
    return spec.read[0]


def from_hidden(read: Read, hidden: np.ndarray, prompt_tokens: int) -> tuple[np.ndarray, list[int]]:
    """Serve ``read`` of ``ln_final.hook_normalized`` from SGLang's hidden states (one row per position)."""
    total = len(hidden)
    if read.positions == "prompt":
        pos = list(range(min(prompt_tokens, total)))
    elif read.positions == "generated":
        pos = list(range(prompt_tokens, total))
    elif read.positions == "all":
        pos = list(range(total))
    else:
        pos = sorted({p for p in read.positions if p < total})
    rows = hidden[pos] if pos else np.zeros((0, hidden.shape[-1] if hidden.ndim == 2 else 0), np.float32)
    if read.reduce == "mean":
        return (rows.mean(axis=0) if pos else np.zeros((0,), np.float32)), pos
    if read.reduce == "last":
        return (rows[-1] if pos else np.zeros((0,), np.float32)), pos
    return rows, pos
