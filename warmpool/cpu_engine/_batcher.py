"""The CPU engine's scheduler: continuous (iteration-level) batching over a HF causal LM.

One thread owns the model. Each loop iteration admits waiting requests up to the batch
limit, produces exactly one new token for every active sequence, and retires sequences
that finished. With the KV cache on, rows already running take one decode forward over
their cached keys/values and newly admitted rows take one prefill forward; the two caches
are then merged (left-padded) into one. With it off, every iteration recomputes the whole
left-padded batch in a single forward. Both paths sample each row with its own parameters
and, when seeded, its own ``torch.Generator``, so results do not depend on batch make-up.

Hook-point reads and writes (``internals``) and ``input_embeds`` go through ``_hooks``: each
forward sets a plan there naming its rows' positions.

Embedding requests (``/encode``) queue separately and run between generation steps, as one
padded forward per group: the mean of the final hidden states, L2-normalised.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from warmpool.cpu_engine._fields import check_prompt_chars, longest_token
from warmpool.cpu_engine._hooks import Hooks, make_probe
from warmpool.cpu_engine._journal import RequestLedger
from warmpool.cpu_engine._lora import Loras
from warmpool.cpu_engine._requests import EmbedOutput, EmbedRequest, GenOutput, GenRequest
from warmpool.cpu_engine._tensors import (
    cache_kwarg,
    draw,
    embed_forward,
    eos_ids,
    keep_hidden,
    left_pad,
    pad_id,
    pad_seq,
    positions,
    probe_kv_cache,
    stop_prefix_len,
)

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
        # SGLang's layout: the prompt's [T, H] states first, then one [H] vector per step.
        self.hidden: list[torch.Tensor] = []
        self.share = 0.0  # engine seconds charged to this row (its tokens' part of each step)
        self.probe = make_probe(req, device)  # hook-point reads/writes, input_embeds (_hooks)
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
        request_log: Append one JSON line per request that ends here (see ``_journal``).
        answer_journal: Directory of the answer journal (``_journal``; None: off): a retried
            invocation's request that the engine already answered is answered again from it.
        max_loras: LoRA adapters resident at once (``_lora``; 0: LoRA off).
        max_lora_rank: Largest adapter rank.
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
        batch_window: float = 0.002,
        max_batch_wait: float = 0.02,
        request_log: Path | None = None,
        answer_journal: Path | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
    ) -> None:
        self.model = model
        self.ledger = RequestLedger(request_log, answer_journal)
        self.tokenizer, self.token_chars = tokenizer, longest_token(tokenizer)  # (see check_prompt_chars)
        self.device = device
        self.max_batch_size = max_batch_size
        self.threads = threads
        self.context_len = context_len
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = pad_id(tokenizer, self.eos_ids)
        # HF fast tokenizers raise "Already borrowed" when used from two threads at once.
        self.tok_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._embeds: collections.deque[EmbedRequest] = collections.deque()
        self._inflight: set[str] = set()
        self._abort: set[str] = set()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached len]; 0 = left padding
        self._stopping = False
        # Forming a batch from idle: wait while requests keep arriving (each within
        # batch_window of the last, at most max_batch_wait in all), so a burst of
        # concurrent requests starts as one batch instead of trickling in one prefill
        # at a time. A running batch never waits: newcomers join it at the next step.
        self.batch_window = batch_window
        self.max_batch_wait = max_batch_wait
        self._last_arrival = 0.0
        self._thread: threading.Thread | None = None
        self._cache_kw = cache_kwarg(model)
        self._keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.use_kv_cache = use_kv_cache
        self.hooks = Hooks(model)  # per-row reads/writes of internals, each forward's plan set in _run
        self.loras = Loras(model, max_loras=max_loras, max_rank=max_lora_rank)  # per-row adapters, ditto
        if use_kv_cache:
            self.use_kv_cache = probe_kv_cache(self._run, self.pad_id, device)
        self._stats = {"requests_total": 0, "steps": 0, "rows_stepped": 0, "max_seen": 0}
        self._stats["tokens_generated"] = 0
        # Usage of counted (non-health-check) requests, charged as each ends; busy: every step, timed.
        self._usage = {"prompt_tokens_total": 0, "generation_tokens_total": 0}
        self._busy = 0.0

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
        """Tokenize a prompt as SGLang does (BOS added); RequestError if it cannot fit the context."""
        check_prompt_chars(len(text), self.context_len, self.token_chars)
        with self.tok_lock:
            ids: list[int] = self.tokenizer(text)["input_ids"]
        return ids

    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none); ``on_finish`` of each is called when done.

        Raises:
            ValueError: A rid is already in flight, or the batcher is stopped.
        """
        answers = [self.ledger.replay(req) for req in reqs]  # answered for an earlier attempt
        with self._cond:
            if self._stopping:
                raise ValueError("the engine is shutting down")
            taken = [r.rid for r in reqs if r.rid in self._inflight]
            if taken:
                raise ValueError(f"rid {taken[0]!r} is already in flight")
            now_done: list[tuple[GenRequest, GenOutput | None]] = []
            for req, answer in zip(reqs, answers, strict=True):
                self._stats["requests_total"] += req.counted
                if answer is not None or req.params.max_new_tokens == 0:
                    now_done.append((req, answer))  # nothing to generate: never takes a batch slot
                    continue
                self._inflight.add(req.rid)
                self._waiting.append(req)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()
        for req, answer in now_done:
            empty = {"type": "length", "length": 0}
            req.on_finish(answer or self._output(_Row(req, torch.device("cpu")), empty))

    def submit_embeds(self, reqs: list[EmbedRequest]) -> None:
        """Queue inputs to embed; each ``on_finish`` is called from the scheduler thread.

        Raises:
            ValueError: The batcher is stopped.
        """
        with self._cond:
            if self._stopping:
                raise ValueError("the engine is shutting down")
            self._stats["requests_total"] += len(reqs)
            self._embeds.extend(reqs)
            self._cond.notify_all()

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
            usage = dict(self._usage)
            busy = self._busy
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
            **usage,
            "cached_tokens_total": 0,  # no prefix cache
            "busy_seconds": busy,
        }

    # ---- scheduler thread --------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP thread counts can be per-thread state
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows and not self._embeds:
                    self._cond.wait()
                if not self._rows and self._waiting and self.batch_window > 0:
                    self._gather()
                if self._stopping:
                    left = list(self._waiting)
                    embeds = list(self._embeds)
                    self._waiting.clear()
                    self._embeds.clear()
                    break
                aborted = [r for r in self._rows if r.req.rid in self._abort]
                self._abort.clear()  # rids not running any more were finished already
                room = self.max_batch_size - (len(self._rows) - len(aborted))
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                n_embeds = min(self.max_batch_size, len(self._embeds))
                embeds = [self._embeds.popleft() for _ in range(n_embeds)]
            if embeds:
                self._embed(embeds)
            if any(r.lora for r in admit):
                admit = self._admit_loras(admit)
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
        for req in embeds:
            req.on_finish(EmbedOutput(req.rid, [], len(req.input_ids), 0.0, "the engine is shutting down"))

    def _gather(self) -> None:
        """Wait (holding the condition) while a burst of requests is still arriving."""
        give_up = time.monotonic() + self.max_batch_wait
        while not self._stopping and len(self._waiting) < self.max_batch_size:
            now = time.monotonic()
            quiet_at = self._last_arrival + self.batch_window
            if now >= quiet_at or now >= give_up:
                return
            self._cond.wait(min(quiet_at, give_up) - now)

    def _embed(self, reqs: list[EmbedRequest]) -> None:
        """Embed a group of inputs in one padded forward; failures fail the group, not the engine."""
        t0 = time.perf_counter()
        try:
            seqs = [r.input_ids for r in reqs]
            vectors = embed_forward(self.model, seqs, self.pad_id, self.device, keep_kw=self._keep_kw)
        except Exception as exc:
            log.exception("embedding forward failed")
            message = f"engine error: {type(exc).__name__}: {exc}"
            for req in reqs:
                req.on_finish(EmbedOutput(req.rid, [], len(req.input_ids), 0.0, message))
            return
        now = time.perf_counter()
        shares = self._charge(now - t0, [len(r.input_ids) for r in reqs])
        with self._cond:
            self._usage["prompt_tokens_total"] += sum(len(r.input_ids) for r in reqs)
        for req, vec, share in zip(reqs, vectors, shares, strict=True):
            req.on_finish(
                EmbedOutput(req.rid, vec, len(req.input_ids), now - req.created, engine_share=share)
            )

    def _charge(self, seconds: float, weights: list[int]) -> list[float]:
        """Add a step's time to the busy time; return each row's part, split by its tokens."""
        with self._cond:
            self._busy += seconds
        total = sum(weights) or 1
        return [seconds * w / total for w in weights]

    def _step(self, new: list[_Row]) -> None:
        t0 = time.perf_counter()
        # Tokens each row feeds this step: a new row its prompt, a cached row one, a recomputed row all.
        fed = {id(r): len(r.tokens) for r in new}
        if not self.use_kv_cache:
            fed.update((id(r), len(r.tokens)) for r in self._rows)
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
        weights = [fed.get(id(r), 1) for r in rows]
        for row, share in zip(rows, self._charge(time.perf_counter() - t0, weights), strict=True):
            row.share += share
        self._retire()

    def _forward_full(self) -> torch.Tensor:
        """One forward over every row's full sequence (no cache); last-position logits."""
        rows = self._rows
        ids, mask = left_pad([r.tokens for r in rows], self.pad_id, self.device)
        logits, _, hidden = self._run(ids, mask, positions(mask), None, _wants_hidden(rows), rows)
        keep_hidden(rows, hidden, prefill=None)  # a row's first step fed its whole prompt
        return logits

    def _forward_cached(self, new: list[_Row]) -> torch.Tensor:
        """Decode running rows over the cache, prefill new ones, merge their caches."""
        parts: list[torch.Tensor] = []
        if self._rows:
            assert self._mask is not None
            rows = self._rows
            last = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
            mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
            pos = torch.tensor([[len(r.tokens) - 1] for r in rows], device=self.device)
            logits, self._cache, hidden = self._run(last, mask, pos, self._cache, _wants_hidden(rows), rows)
            self._mask = mask
            parts.append(logits)
            keep_hidden(rows, hidden, prefill=False)
        if new:
            ids, mask = left_pad([r.tokens for r in new], self.pad_id, self.device)
            logits, cache, hidden = self._run(ids, mask, positions(mask), None, _wants_hidden(new), new)
            parts.append(logits)
            keep_hidden(new, hidden, prefill=True)
            self._merge(cache, mask)
            self._rows.extend(new)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        hidden: bool = False,
        rows: list[_Row] | None = None,
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """One forward of ``rows``: last-position logits, the new cache, (if asked) final hidden states."""
        kwargs: dict[str, Any] = {"use_cache": self.use_kv_cache}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1  # only the last position is sampled from
        if hidden:
            kwargs["output_hidden_states"] = True
        embeds = self.hooks.begin([(r.probe, len(r.tokens)) for r in rows or ()], ids)
        self.loras.begin([r.req.lora for r in rows or ()])
        feed = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        try:
            out = self.model(attention_mask=mask, position_ids=pos, **feed, **kwargs)
        finally:
            self.hooks.end()
            self.loras.end()
        # Read only the field this transformers version has: the other is a deprecated alias.
        new_cache = getattr(out, self._cache_kw, None)
        # The last entry is the final layer's output after the final norm: the lm_head input.
        states = out.hidden_states[-1].float() if hidden else None
        return out.logits[:, -1, :].float(), new_cache, states

    def _admit_loras(self, reqs: list[GenRequest]) -> list[GenRequest]:
        """Load the adapters of ``reqs`` (``_lora``); those without a free slot wait at the front."""
        admitted, deferred, failed = self.loras.admit(reqs, {r.req.lora for r in self._rows if r.req.lora})
        with self._cond:
            self._waiting.extendleft(reversed(deferred))
            self._inflight.difference_update(req.rid for req, _ in failed)
        for req, why in failed:
            out = self._output(_Row(req, torch.device("cpu")), {"type": "abort", "message": why})
            out.error = why
            req.on_finish(out)
        return admitted

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append a freshly prefilled cache's rows below the running rows' cache."""
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old_layers, new_layers = self._cache.layers, cache.layers
        for old, new in zip(old_layers, new_layers, strict=True):
            old.keys = torch.cat([pad_seq(old.keys, width), pad_seq(new.keys, width)])
            old.values = torch.cat([pad_seq(old.values, width), pad_seq(new.values, width)])
        self._mask = torch.cat([pad_seq(self._mask, width), pad_seq(mask, width)])

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
                toks[i] = draw(logits[i], row.req.params, row.gen)
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
            # Hold back a tail that may yet become a stop string, so streamed texts only grow.
            text = text[: len(text) - stop_prefix_len(text, p.stop)]
        out = GenOutput(
            rid=row.req.rid,
            output_ids=list(row.out),
            text=text,
            finish_reason=finish,
            prompt_tokens=len(row.req.input_ids),
            e2e_latency=time.perf_counter() - row.req.created,
            engine_share=row.share,
            output_token_logprobs=list(row.token_logprobs) if row.req.return_logprob else None,
            output_top_logprobs=list(row.top_logprobs) if row.req.top_logprobs_num else None,
            hidden_states=[h.tolist() for h in row.hidden]
            if row.req.return_hidden_states and finish
            else None,
            internals=row.probe.result(self.hooks.hidden) if row.probe is not None and finish else None,
        )
        if finish is not None and row.req.counted:
            with self._cond:
                self._usage["prompt_tokens_total"] += len(row.req.input_ids)
                self._usage["generation_tokens_total"] += len(row.out)
            self.ledger.finished(row.req, out)
        return out


_ABORT: dict[str, Any] = {"type": "abort", "message": "Aborted by request."}


def _wants_hidden(rows: list[_Row]) -> bool:
    return any(r.req.return_hidden_states for r in rows)
