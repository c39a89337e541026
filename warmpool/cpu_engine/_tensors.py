"""Helpers of the CPU engine's scheduler: sampling, padding, pooling, stop strings, probing.

Kept apart from ``_cpu_batcher`` so the scheduler module stays about scheduling.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from warmpool.cpu_engine._requests import SamplingParams

log = logging.getLogger("warmpool.cpu_engine")


def draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Sample one token from a row's logits: temperature, then top-k, top-p and min-p."""
    x = logits / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_p[(sorted_p.cumsum(dim=-1) - sorted_p) > p.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into ``(ids, mask)`` tensors of shape ``[len(seqs), longest]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad dim 2 (KV: [B, H, T, D]) or dim 1 (mask: [B, T]) with zeros up to ``width``."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mean_pool_normalised(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the final hidden states over each row's real tokens, L2-normalised.

    Args:
        hidden: ``[B, T, H]`` final-layer hidden states (after the final norm).
        mask: ``[B, T]`` attention mask; 0 marks left padding.

    Returns:
        ``[B, H]`` unit vectors (float32).
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean.float(), p=2.0, dim=-1)


def embed_forward(
    model: Any, seqs: list[list[int]], pad: int, device: torch.device, *, keep_kw: bool
) -> list[list[float]]:
    """Embed token sequences in one padded forward (see :func:`mean_pool_normalised`)."""
    with torch.inference_mode():
        ids, mask = left_pad(seqs, pad, device)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if keep_kw else {}
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            use_cache=False,
            output_hidden_states=True,
            **kwargs,
        )
        vectors: list[list[float]] = mean_pool_normalised(out.hidden_states[-1], mask).tolist()
    return vectors


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def cache_kwarg(model: Any) -> str:
    """Transformers 5.x names the forward's cache argument ``cache``; older ones did not."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every end-of-sequence id named by the generation config, model config or tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def pad_id(tokenizer: Any, eos: frozenset[int]) -> int:
    """The tokenizer's pad id, else the smallest eos id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return min(eos) if eos else 0


def probe_kv_cache(run: Callable[..., tuple[Any, Any, Any]], pad: int, device: torch.device) -> bool:
    """Whether the model's cache is the plain per-layer ``keys``/``values`` layout the batcher edits.

    Args:
        run: The batcher's forward (``ids, mask, positions, cache`` in; logits, cache, states out).
        pad: A token id to feed.
        device: Where tensors are created.
    """
    try:
        with torch.inference_mode():
            ids = torch.tensor([[pad, pad]], device=device)
            mask = torch.tensor([[0, 1]], device=device)
            _, cache, _ = run(ids, mask, positions(mask), None)
        layers: list[Any] = getattr(cache, "layers", None) or []
        return bool(layers) and all(
            type(layer).__name__ == "DynamicLayer" and layer.keys.dim() == 4 for layer in layers
        )
    except Exception:  # an unusual model: recompute every step instead
        log.warning("KV cache probe failed; recomputing the batch each step", exc_info=True)
        return False


def keep_hidden(rows: list[Any], hidden: torch.Tensor | None, *, prefill: bool | None) -> None:
    """Append each asking row's states: its whole (left-padded) prompt, or the one new position.

    ``prefill=None`` decides per row: a row that has generated nothing yet was fed its prompt.
    """
    if hidden is None:
        return
    for i, row in enumerate(rows):
        if row.req.return_hidden_states:
            whole = (not row.out) if prefill is None else prefill
            # clone: a view would keep the whole batch's [B, T, H] tensor alive
            row.hidden.append((hidden[i, -len(row.tokens) :] if whole else hidden[i, -1]).clone())
