"""Named hook points inside the CPU engine's batch: each request reads and writes its own rows.

Hook points (TransformerLens' names, see ``_internals``) are torch forward hooks and forward
pre-hooks on a HF Llama-family model (``model.model.layers[i]`` with ``self_attn``, ``mlp``,
``post_attention_layernorm``; ``model.model.norm``), registered once when the engine starts.
Before each forward the batcher sets a *plan* (:meth:`Hooks.begin`): which batch row belongs
to which request, and which sequence column is which absolute token position of that row
(rows are left-padded; a decode forward feeds one column). Without a plan (no row of the
forward reads or writes) every hook returns at once.

Within a layer the points run in the order resid_pre -> attn_out -> resid_mid -> mlp_out ->
resid_post; a read sees the value after that request's writes at the same point (what flows
on). HF's decoder layer keeps its residual before ``post_attention_layernorm``, so a write at
resid_mid is applied through the attention output: ``attn' = op(resid_pre + attn) - resid_pre``.

This engine has no prefix cache: a row's KV-cache entries are computed from that row's own
residual stream only, so a request with writes never shares cache entries with another row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from warmpool.cpu_engine._internals import (
    FINAL_POINT,
    InternalsSpec,
    Positions,
    WriteSpec,
    encode_f32,
    hook_names,
)
from warmpool.cpu_engine._requests import GenRequest


class Probe:
    """One request's reads, writes and prompt embeddings, and what its reads recorded.

    Args:
        req: The request (``internals`` and/or ``input_embeds`` set).
        device: Where the write vectors and embeddings live.
    """

    def __init__(self, req: GenRequest, device: torch.device) -> None:
        spec = req.internals or InternalsSpec()
        self.has_internals = req.internals is not None
        self.prompt_len = len(req.input_ids)
        self.reads = {r.hook: r for r in spec.reads}
        self.writes: dict[str, list[tuple[WriteSpec, torch.Tensor]]] = {}
        for w in spec.writes:
            vec = torch.frombuffer(bytearray(w.data), dtype=torch.float32) if w.data else torch.zeros(0)
            self.writes.setdefault(w.hook, []).append((w, vec.reshape(w.shape).to(device)))
        self.hooks = set(self.reads) | set(self.writes)
        self.embeds: torch.Tensor | None = None
        if req.input_embeds is not None:
            self.embeds = torch.tensor(req.input_embeds, dtype=torch.float32, device=device)
        self.recorded: dict[str, dict[int, torch.Tensor]] = {h: {} for h in self.reads}
        # Positions below this were recorded already (the no-cache path recomputes them).
        self.read_from = 0

    def result(self, hidden: int) -> dict[str, Any] | None:
        """``meta_info["internals"]``: per read hook, its array and the positions recorded."""
        if not self.has_internals:
            return None
        out: dict[str, Any] = {}
        for hook, read in self.reads.items():
            rec = self.recorded[hook]
            pos = sorted(rec)
            shape: list[int] = [len(pos), hidden] if read.reduce is None else [0]
            values: list[float] = []
            if pos:
                arr = torch.stack([rec[p] for p in pos])
                if read.reduce == "mean":
                    arr = arr.mean(dim=0)
                elif read.reduce == "last":
                    arr = arr[-1]
                shape, values = list(arr.shape), arr.flatten().tolist()
            out[hook] = {**encode_f32(values, shape), "positions": pos}
        return out


def make_probe(req: GenRequest, device: torch.device) -> Probe | None:
    """A probe for a request that reads, writes or brings embeddings; None for a plain one."""
    if req.internals is None and req.input_embeds is None:
        return None
    return Probe(req, device)


@dataclass
class _Entry:
    """One batch row of a forward that has a probe: where its positions sit."""

    row: int
    probe: Probe
    base: int  # absolute position of column 0 (negative where the row is left-padded)
    lo: int  # first position fed in this forward
    hi: int  # one past the last

    def select(self, positions: Positions, start: int) -> list[int]:
        """The selected absolute positions fed in this forward, from ``start`` on."""
        lo, hi, prompt = max(self.lo, start), self.hi, self.probe.prompt_len
        if positions == "all":
            return list(range(lo, hi))
        if positions == "prompt":
            return list(range(lo, min(hi, prompt)))
        if positions == "generated":
            return list(range(max(lo, prompt), hi))
        assert not isinstance(positions, str)
        return sorted(p for p in positions if lo <= p < hi)


def _apply(op: str, cur: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    if op == "add":
        return cur + alpha * v
    if op == "scale":
        return cur * (alpha * v)
    return (alpha * v).expand_as(cur).clone()


def _first(out: Any) -> torch.Tensor:
    """A module's main output: HF layers return a tensor or a tuple led by one."""
    x: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return x


def _replace(out: Any, x: torch.Tensor) -> Any:
    return (x, *out[1:]) if isinstance(out, tuple) else x


class Hooks:
    """The hook points of one model, and the per-forward plan they consult.

    Args:
        model: A HF causal LM. Models without the Llama layout get no hook points
            (``names`` empty), and requests using ``internals`` are refused at parse time.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._plan: dict[str, list[_Entry]] | None = None
        self._entries: list[_Entry] = []
        self._pre: dict[int, torch.Tensor] = {}  # each layer's resid_pre in the current forward
        inner = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", None) or [])
        norm = getattr(inner, "norm", None)
        parts = ("self_attn", "mlp", "post_attention_layernorm")
        ok = bool(layers) and norm is not None and all(hasattr(m, p) for m in layers for p in parts)
        self.names: list[str] = hook_names(len(layers)) if ok else []
        self.hidden = int(getattr(model.config, "hidden_size", 0) or 0) if ok else 0
        if not ok:
            return
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._resid_pre(i), with_kwargs=True)
            layer.self_attn.register_forward_hook(self._attn(i))
            layer.mlp.register_forward_hook(self._simple(f"blocks.{i}.hook_mlp_out"))
            layer.register_forward_hook(self._simple(f"blocks.{i}.hook_resid_post"))
        assert norm is not None
        norm.register_forward_hook(self._simple(FINAL_POINT))

    # ---- the plan (scheduler thread) ---------------------------------------------------

    def begin(self, rows: list[tuple[Probe | None, int]], ids: torch.Tensor) -> torch.Tensor | None:
        """Set the plan for the next forward; returns its ``inputs_embeds`` if a row brought embeddings.

        Args:
            rows: Per batch row, its probe (or None) and its sequence length including the
                tokens fed now (columns are right-aligned: left padding).
            ids: The ``[rows, width]`` token ids about to be fed.

        The plan covers only this forward's rows. There is no prefix cache, so KV-cache
        entries written under a request's writes belong to that row alone.
        """
        width = ids.shape[1]
        entries = [
            _Entry(b, probe, length - width, max(length - width, 0), length)
            for b, (probe, length) in enumerate(rows)
            if probe is not None
        ]
        if not entries:
            return None
        plan: dict[str, list[_Entry]] = {}
        for e in entries:
            for hook in e.probe.hooks:
                plan.setdefault(hook, []).append(e)
        self._plan, self._entries = plan or None, entries
        fills = [e for e in entries if e.probe.embeds is not None and e.lo < e.probe.prompt_len]
        if not fills:
            return None
        # Every row of the forward then goes in as embeddings: the others' are looked up here.
        x: torch.Tensor = self.model.get_input_embeddings()(ids)
        for e in fills:
            assert e.probe.embeds is not None
            stop = min(e.hi, e.probe.prompt_len)
            x[e.row, e.lo - e.base : stop - e.base] = e.probe.embeds[e.lo : stop].to(x.dtype)
        return x

    def end(self) -> None:
        """Clear the plan after a forward; what it fed counts as read."""
        for e in self._entries:
            e.probe.read_from = max(e.probe.read_from, e.hi)
        self._plan, self._entries = None, []
        self._pre.clear()

    # ---- the hooks (inside the forward) ------------------------------------------------

    def _resid_pre(self, i: int) -> Any:
        name = f"blocks.{i}.hook_resid_pre"

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._plan is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = self._point(name, x)
            self._pre[i] = y  # resid_mid is resid_pre + attn_out
            if y is x:
                return None
            return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

        return hook

    def _attn(self, i: int) -> Any:
        attn_name, mid_name = f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_resid_mid"

        def hook(module: Any, args: Any, out: Any) -> Any:
            if self._plan is None:
                return None
            a = _first(out)
            b = self._point(mid_name, self._point(attn_name, a), pre=self._pre[i])
            return None if b is a else _replace(out, b)

        return hook

    def _simple(self, name: str) -> Any:
        def hook(module: Any, args: Any, out: Any) -> Any:
            if self._plan is None:
                return None
            x = _first(out)
            y = self._point(name, x)
            return None if y is x else _replace(out, y)

        return hook

    def _point(self, name: str, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """Apply each planned row's writes at one point, then record its read; returns what flows on.

        With ``pre`` the point's value is ``pre + x`` (resid_mid) and writes go into ``x``.
        """
        entries = self._plan.get(name) if self._plan is not None else None
        if not entries:
            return x
        out = x
        for e in entries:
            for w, vec in e.probe.writes.get(name, ()):
                pos = e.select(w.positions, e.lo)
                if not pos:
                    continue
                if out is x:
                    out = x.clone()  # the input may be referenced elsewhere (e.g. as a residual)
                cols = torch.tensor([p - e.base for p in pos], device=x.device)
                v = vec.to(x.dtype)
                if v.dim() == 2:  # row j for the j-th listed position
                    order = {p: j for j, p in enumerate(w.positions)}
                    v = v[torch.tensor([order[p] for p in pos], device=x.device)]
                base = pre[e.row, cols] if pre is not None else None
                cur = out[e.row, cols] if base is None else base + out[e.row, cols]
                new = _apply(w.op, cur, v, w.alpha)
                out[e.row, cols] = new if base is None else new - base
            read = e.probe.reads.get(name)
            if read is not None:
                pos = e.select(read.positions, e.probe.read_from)
                if pos:
                    cols = torch.tensor([p - e.base for p in pos], device=x.device)
                    val = out[e.row, cols] if pre is None else pre[e.row, cols] + out[e.row, cols]
                    rec = e.probe.recorded[name]
                    rec.update(zip(pos, val.float().cpu().unbind(0), strict=True))
        return out
