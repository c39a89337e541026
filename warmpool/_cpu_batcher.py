"""The CPU engine's scheduler: continuous (iteration-level) batching over a HF causal LM.

One thread owns the model. Each loop iteration admits waiting requests up to the batch
limit, produces exactly one new token for every active sequence, and retires sequences
that finished. With the KV cache on, rows already running take one decode forward over
their cached keys/values and newly admitted rows take one prefill forward; the two caches
are then merged (left-padded) into one. With it off, every iteration recomputes the whole
left-padded batch in a single forward. Both paths sample each row with its own parameters
and, when seeded, its own ``torch.Generator``, so results do not depend on batch make-up.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from typing import Any

import torch

from warmpool._cpu_requests import GenOutput, GenRequest, SamplingParams

log = logging.getLogger("warmpool.cpu_engine")


class _Row:
    """A running sequence: its request plus generation state."""

    def __init__(self, req: GenRequest, device: torch.device) -> None:
        self.req = req
        self.tokens: list[int] = list(req.input_ids)
        self.out: list[int] = []
        self.finish: dict[str, Any] | None = None
        self.stop_pos = -1  # where a matched stop string starts in the decoded text
        self.token_logprobs: list[list[Any]] = []
        self.top_logprobs: list[list[list[Any]]] = []
        self.gen: torch.Generator | None = None
        if not req.params.greedy:
            # Per-request generator: the draw sequence depends on this request alone.
            self.gen = torch.Generator(device=device)
            seed = req.params.sampling_seed
            if seed is None:
                self.gen.seed()
            else:
                self.gen.manual_seed(seed)


class Batcher:
    """Continuous-batching scheduler over one model, run in its own thread.

    Args:
        model: A HF causal LM, already on ``device`` and in eval mode.
        tokenizer: Its tokenizer (a HF ``PreTrainedTokenizerBase``).
        device: Where tensors are created.
        max_batch_size: Most sequences in one forward step.
        context_len: Prompt plus output may not exceed this many tokens.
        use_kv_cache: Keep a KV cache across steps (falls back to recompute when the
            model's cache layout is not the plain dynamic one).
        threads: ``torch.set_num_threads`` for the scheduler thread (None: torch's default).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        max_batch_size: int,
        context_len: int,
        use_kv_cache: bool = True,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.threads = threads
        self.context_len = context_len
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        # HF fast tokenizers raise "Already borrowed" when used from two threads at once.
        self.tok_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._inflight: set[str] = set()
        self._abort: set[str] = set()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached len]; 0 = left padding
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cache_kw = _cache_kwarg(model)
        self._keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.use_kv_cache = use_kv_cache
        if use_kv_cache:
            self.use_kv_cache = self._probe_kv_cache()
        self._stats = {"requests_total": 0, "steps": 0, "rows_stepped": 0, "max_seen": 0}
        self._stats["tokens_generated"] = 0

    # ---- public API (any thread) -------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="cpu-engine-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and join the scheduler thread."""
        self.abort_all()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def encode(self, text: str) -> list[int]:
        """Tokenize a prompt the way SGLang does (special tokens such as BOS added)."""
        with self.tok_lock:
            ids: list[int] = self.tokenizer(text)["input_ids"]
        return ids

    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none); ``on_finish`` of each is called when done.

        Raises:
            ValueError: A rid is already in flight, or the batcher is stopped.
        """
        with self._cond:
            if self._stopping:
                raise ValueError("the engine is shutting down")
            taken = [r.rid for r in reqs if r.rid in self._inflight]
            if taken:
                raise ValueError(f"rid {taken[0]!r} is already in flight")
            now_done = []
            for req in reqs:
                self._stats["requests_total"] += 1
                if req.params.max_new_tokens == 0:
                    now_done.append(req)  # nothing to generate: never takes a batch slot
                    continue
                self._inflight.add(req.rid)
                self._waiting.append(req)
            self._cond.notify_all()
        for req in now_done:
            req.on_finish(self._output(_Row(req, torch.device("cpu")), {"type": "length", "length": 0}))

    def abort(self, rid: str) -> bool:
        """Abort a queued or running request; returns whether it was found."""
        found: GenRequest | None = None
        with self._cond:
            if rid not in self._inflight:
                return False
            for req in self._waiting:
                if req.rid == rid:
                    found = req
                    break
            if found is not None:
                self._waiting.remove(found)
                self._inflight.discard(rid)
            else:
                self._abort.add(rid)  # running: the scheduler retires it before its next step
                self._cond.notify_all()
        if found is not None:
            found.on_finish(self._output(_Row(found, torch.device("cpu")), _ABORT))
        return True

    def abort_all(self) -> None:
        """Abort every queued and running request."""
        with self._cond:
            rids = list(self._inflight)
        for rid in rids:
            self.abort(rid)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/server_info``."""
        with self._cond:
            s = dict(self._stats)
            running = len(self._inflight) - len(self._waiting)
            waiting = len(self._waiting)
        return {
            "requests_total": s["requests_total"],
            "requests_running": running,
            "requests_waiting": waiting,
            "steps": s["steps"],
            "mean_batch_size": s["rows_stepped"] / s["steps"] if s["steps"] else 0.0,
            "max_batch_size_seen": s["max_seen"],
            "tokens_generated": s["tokens_generated"],
        }

    # ---- scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP thread counts can be per-thread state
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    left = list(self._waiting)
                    self._waiting.clear()
                    break
                aborted = [r for r in self._rows if r.req.rid in self._abort]
                self._abort.clear()  # rids not running any more were finished already
                room = self.max_batch_size - (len(self._rows) - len(aborted))
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for row in aborted:
                row.finish = dict(_ABORT)
            if aborted:
                self._retire()
            if not self._rows and not admit:
                continue
            try:
                self._step([_Row(req, self.device) for req in admit])
            except Exception as exc:  # keep serving: fail this batch, not the process
                log.exception("forward step failed")
                message = f"engine error: {type(exc).__name__}: {exc}"
                self._finish_all(admit, {"type": "abort", "message": message}, error=message)
        # Shutting down: whatever is still queued or running ends as aborted.
        self._finish_all(left, {"type": "abort", "message": "The engine is shutting down."})

    def _step(self, new: list[_Row]) -> None:
        with torch.inference_mode():
            if self.use_kv_cache:
                logits = self._forward_cached(new)
            else:
                self._rows.extend(new)
                logits = self._forward_full()
            rows = self._rows
            toks, logprobs = self._sample(logits)
        with self._cond:
            self._stats["steps"] += 1
            self._stats["rows_stepped"] += len(rows)
            self._stats["max_seen"] = max(self._stats["max_seen"], len(rows))
            self._stats["tokens_generated"] += len(rows)
        for i, (row, tok) in enumerate(zip(rows, toks, strict=True)):
            row.out.append(tok)
            row.tokens.append(tok)
            if logprobs is not None and row.req.return_logprob:
                self._record_logprobs(row, logprobs[i], tok)
            self._check_finished(row)
            interval = row.req.params.stream_interval
            if row.req.on_update is not None and row.finish is None and len(row.out) % interval == 0:
                row.req.on_update(self._output(row, None))
        self._retire()

    def _forward_full(self) -> torch.Tensor:
        """One forward over every row's full sequence (no cache); last-position logits."""
        ids, mask = self._left_pad([r.tokens for r in self._rows])
        return self._run(ids, mask, _positions(mask), None)[0]

    def _forward_cached(self, new: list[_Row]) -> torch.Tensor:
        """Decode running rows over the cache, prefill new ones, merge their caches."""
        parts: list[torch.Tensor] = []
        if self._rows:
            assert self._mask is not None
            last = torch.tensor([[r.tokens[-1]] for r in self._rows], device=self.device)
            mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
            pos = torch.tensor([[len(r.tokens) - 1] for r in self._rows], device=self.device)
            logits, self._cache = self._run(last, mask, pos, self._cache)
            self._mask = mask
            parts.append(logits)
        if new:
            ids, mask = self._left_pad([r.tokens for r in new])
            logits, cache = self._run(ids, mask, _positions(mask), None)
            parts.append(logits)
            self._merge(cache, mask)
            self._rows.extend(new)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _run(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"use_cache": self.use_kv_cache}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1  # only the last position is sampled from
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        # Read only the field this transformers version has: the other is a deprecated alias.
        new_cache = getattr(out, self._cache_kw, None)
        return out.logits[:, -1, :].float(), new_cache

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append a freshly prefilled cache's rows below the running rows' cache."""
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old_layers, new_layers = self._cache.layers, cache.layers
        for old, new in zip(old_layers, new_layers, strict=True):
            old.keys = torch.cat([_pad_seq(old.keys, width), _pad_seq(new.keys, width)])
            old.values = torch.cat([_pad_seq(old.values, width), _pad_seq(new.values, width)])
        self._mask = torch.cat([_pad_seq(self._mask, width), _pad_seq(mask, width)])

    def _retire(self) -> None:
        """Drop finished rows (and their cache rows), then report them."""
        done = [r for r in self._rows if r.finish is not None]
        if not done:
            return
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        self._rows = [self._rows[i] for i in keep]
        if self._cache is not None and self._mask is not None:
            if not keep:
                self._cache = self._mask = None
            else:
                idx = torch.tensor(keep, device=self.device)
                mask = self._mask[idx]
                # Columns that are padding in every remaining row are dead weight: trim them.
                start = int(mask.any(dim=0).nonzero()[0, 0])
                self._mask = mask[:, start:]
                for layer in self._cache.layers:
                    layer.keys = layer.keys[idx, :, start:]
                    layer.values = layer.values[idx, :, start:]
        with self._cond:
            for r in done:
                self._inflight.discard(r.req.rid)
        for r in done:
            assert r.finish is not None
            r.req.on_finish(self._output(r, r.finish))

    def _finish_all(self, extra: list[GenRequest], finish: dict[str, Any], error: str | None = None) -> None:
        """End every running row and ``extra`` (not yet rows) with ``finish``; drop the cache."""
        rows = self._rows + [_Row(req, torch.device("cpu")) for req in extra]
        rows = list({id(r.req): r for r in rows}.values())  # admitted ones may be rows already
        self._rows, self._cache, self._mask = [], None, None
        with self._cond:
            for r in rows:
                self._inflight.discard(r.req.rid)
        for r in rows:
            out = self._output(r, finish)
            out.error = error
            r.req.on_finish(out)

    # ---- per-row bookkeeping -----------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Pick one token per row with that row's params; also logprobs if any row wants them."""
        rows = self._rows
        for i, row in enumerate(rows):
            p = row.req.params
            if len(row.out) < p.min_new_tokens:  # not allowed to stop yet
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                logits[i, sorted(banned)] = float("-inf")
        want = any(r.req.return_logprob for r in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want else None
        toks: list[int] = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.gen is not None:
                toks[i] = _draw(logits[i], row.req.params, row.gen)
        return toks, logprobs

    def _check_finished(self, row: _Row) -> None:
        p, tok, n = row.req.params, row.out[-1], len(row.out)
        if n >= p.min_new_tokens:
            if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
                row.finish = {"type": "stop", "matched": tok}
                return
            if p.stop:
                text = self._decode(row.out, p.skip_special_tokens, p.spaces_between_special_tokens)
                hits = [(text.find(s), s) for s in p.stop if s in text]
                if hits:
                    row.stop_pos, matched = min(hits)
                    row.finish = {"type": "stop", "matched": matched}
                    return
        if n >= p.max_new_tokens or len(row.tokens) >= self.context_len:
            row.finish = {"type": "length", "length": n}

    def _record_logprobs(self, row: _Row, logprobs: torch.Tensor, tok: int) -> None:
        row.token_logprobs.append([float(logprobs[tok]), tok, None])
        k = row.req.top_logprobs_num
        if k > 0:
            vals, ids = logprobs.topk(min(k, logprobs.shape[-1]))
            pairs = zip(vals.tolist(), ids.tolist(), strict=True)
            row.top_logprobs.append([[v, i, None] for v, i in pairs])

    def _decode(self, ids: list[int], skip_special: bool, spaces_between: bool) -> str:
        kw: dict[str, Any] = {"skip_special_tokens": skip_special}
        if not spaces_between:
            kw["spaces_between_special_tokens"] = False
        with self.tok_lock:
            text: str = self.tokenizer.decode(ids, **kw)
        return text

    def _output(self, row: _Row, finish: dict[str, Any] | None) -> GenOutput:
        p = row.req.params
        ids = row.out
        if finish is not None and finish["type"] == "stop" and isinstance(finish["matched"], int):
            ids = ids[:-1]  # SGLang leaves the matched stop token out of the text
        text = self._decode(ids, p.skip_special_tokens, p.spaces_between_special_tokens)
        if row.stop_pos >= 0 and not p.no_stop_trim:
            text = text[: row.stop_pos]
        elif finish is None:
            text = text.rstrip("\ufffd")  # hold back a partly generated UTF-8 character
        return GenOutput(
            rid=row.req.rid,
            output_ids=list(row.out),
            text=text,
            finish_reason=finish,
            prompt_tokens=len(row.req.input_ids),
            e2e_latency=time.perf_counter() - row.req.created,
            output_token_logprobs=list(row.token_logprobs) if row.req.return_logprob else None,
            output_top_logprobs=list(row.top_logprobs) if row.req.top_logprobs_num else None,
        )

    # ---- setup -------------------------------------------------------------------------

    def _probe_kv_cache(self) -> bool:
        """Whether the model's cache is the plain per-layer ``keys``/``values`` layout we edit."""
        try:
            with torch.inference_mode():
                ids = torch.tensor([[self.pad_id, self.pad_id]], device=self.device)
                mask = torch.tensor([[0, 1]], device=self.device)
                _, cache = self._run(ids, mask, _positions(mask), None)
            layers: list[Any] = getattr(cache, "layers", None) or []
            return bool(layers) and all(
                type(layer).__name__ == "DynamicLayer" and layer.keys.dim() == 4 for layer in layers
            )
        except Exception:  # an unusual model: recompute every step instead
            log.warning("KV cache probe failed; recomputing the batch each step", exc_info=True)
            return False


_ABORT: dict[str, Any] = {"type": "abort", "message": "Aborted by request."}


def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad dim 2 (KV: [B, H, T, D]) or dim 1 (mask: [B, T]) with zeros up to ``width``."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_kwarg(model: Any) -> str:
    """Transformers 5.x names the forward's cache argument ``cache``; older ones did not."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return min(eos_ids) if eos_ids else 0
