"""Concurrent ``/generate`` calls of one process, sent to the engine together as one streamed batch.

A worker runs many invocations at once, and each one's ``model.generate`` is an
HTTP request the engine must parse, tokenise and answer on its own. Profiled on the
CPU engine (64 concurrent one-token requests, py-spy), that per-request work held
the engine's event loop longer than the forward steps held the scheduler, and it
shares their GIL: the requests of a burst reached the scheduler over ~50 ms, so
batches started small. Here, while other calls are in flight, a call waits for
company as long as company keeps coming: until ``window`` passes with no new call,
or ``max_wait`` in all (a burst reaches a worker over several milliseconds as the
pool dispatches it; measured on the multiplex benchmark, a fixed 2 ms cut its 64
calls into ~20 engine requests, waiting out the gaps into ~10, and 20% more tokens
per second). The calls that gathered go as one batch request with
``stream: true`` and a ``stream_interval`` no generation reaches, so the engine
sends each item's final output (tagged with its ``index``) the moment that item
ends. Nobody waits for the slowest item of their batch.

A call with fewer than ``min_company`` other plain calls in flight is sent at
once, alone, exactly as before, so light load pays nothing. Only plain calls
gather (a single text or token prompt, sampling params, rid, priority); anything
else goes alone. A batch the engine refuses as a whole (HTTP 4xx/5xx: nothing of it
ran) sends each call again alone, so each gets its own answer or typed error. An
item the engine fails mid-stream fails that call with the engine's message; a
stream that breaks fails the calls it had not answered with the error the broken
connection means (the engine's rows for them are being aborted, so they are not
sent again: a retry would find their ids still in flight).

Engines opt in through ``/model_info``'s ``batched_streams``: the CPU engine does.
SGLang streams batches the same way (``index`` per chunk, cumulative text), but that
has not been checked here against a real SGLang server, so its handles send alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("runtime.model")

# Keys of a body that can join a batch: SGLang takes each as a per-item list except
# priority, which is per request (so calls gather by priority).
_PLAIN = frozenset({"text", "input_ids", "sampling_params", "rid", "priority"})
FINALS_ONLY = 2**31 - 1  # a stream_interval no generation reaches: only final chunks
DEFAULT_WINDOW = 0.002  # seconds without a new call that end a gathering
DEFAULT_MAX_WAIT = 0.010  # seconds a gathering lasts at most (a fraction of a short generation)
DEFAULT_MAX_BATCH = 64
PROBE_BACKOFF = 5.0  # seconds before asking an unreachable engine again whether it streams batches

Lines = Callable[[str, dict[str, Any], Callable[[bytes], None]], tuple[int, bytes, list[tuple[str, str]]]]


@dataclass(eq=False)
class _Call:
    body: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None  # done, no answer and no failure: send it alone
    failure: Exception | None = None  # what the batch could say of this call's fate
    lead: bool = False  # gather the next batch (the queue's first call after a full one left)


class Coalescer:
    """Gathers concurrent plain ``/generate`` calls into streamed batches.

    Args:
        post_lines: Sends one JSON POST and feeds a 2xx answer's lines to a callback
            (``KeepAlivePosts.post_lines``).
        probe: Whether the engine streams batches (``/model_info``'s ``batched_streams``);
            asked once, the first time calls could gather.
        window: Seconds without a new call that end a gathering (calls are in flight).
        max_wait: Seconds a gathering lasts at most, however steadily calls arrive.
        max_batch: Most calls in one batch.
        min_company: Plain calls already in flight before a new one waits for company:
            with fewer, a burst is not under way and the call goes at once.
    """

    def __init__(
        self,
        post_lines: Lines,
        probe: Callable[[], bool],
        *,
        window: float = DEFAULT_WINDOW,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_batch: int = DEFAULT_MAX_BATCH,
        min_company: int = 2,
    ) -> None:
        self._post_lines = post_lines
        self.min_company = min_company
        self._probe = probe
        self.window = window
        self.max_wait = max_wait
        self.max_batch = max_batch
        self.enabled: bool | None = None  # None: not asked yet
        self._cond = threading.Condition()
        self._busy = 0  # plain calls inside post() now
        self._probe_after = 0.0  # monotonic time before which an unreachable engine is not asked
        self._warned = False
        self._queues: dict[tuple[str, Any], list[_Call]] = {}
        # Counted before the call they complete is told (exact once its callers return).
        self.batches = 0  # batch requests that answered at least one call (tests, profiling)
        self.batched = 0  # calls answered through them

    def post(
        self, body: dict[str, Any], alone: Callable[[], Any], fail: Callable[[Exception], Exception]
    ) -> Any:
        """The engine's answer to one call's ``body``: from a batch, or from ``alone()``.

        ``alone`` sends the call by itself (and raises its typed errors); it runs when
        too few other calls are in flight, when the body cannot join a batch, and when
        the engine refused the whole batch. ``fail`` turns what went wrong with this
        call in a batch (an item the engine failed, a broken stream) into its typed error.
        """
        key = _key(body)
        if key is None:
            return alone()
        with self._cond:
            company = self._busy
            self._busy += 1
        try:
            if company < self.min_company or not self._enabled():
                return alone()
            call = self._gathered(key, _Call(body))
        finally:
            with self._cond:
                self._busy -= 1
        if call.answer is not None:
            return call.answer
        if call.failure is not None:
            raise fail(call.failure)
        return alone()

    def _enabled(self) -> bool:
        if self.enabled is None:
            if time.monotonic() < self._probe_after:
                return False
            try:
                self.enabled = bool(self._probe())
            except Exception as exc:  # unreachable now: ask again a little later
                log.debug("Could not ask the engine whether it streams batches: %s", exc)
                self._probe_after = time.monotonic() + PROBE_BACKOFF
                return False
        return self.enabled

    def _gathered(self, key: tuple[str, Any], mine: _Call) -> _Call:
        with self._cond:
            queue = self._queues.setdefault(key, [])
            queue.append(mine)
            self._cond.notify_all()  # a gatherer waiting for a full batch
            mine.lead = len(queue) == 1
        while True:
            with self._cond:  # lead and done are set together under the lock (see _gather_and_send)
                lead, mine.lead = mine.lead, False
                if lead:
                    mine.done.clear()
            if lead:
                self._gather_and_send(key)
            mine.done.wait()
            with self._cond:
                if not mine.lead:  # answered, failed or told to go alone; else: gather the next batch
                    return mine

    def _gather_and_send(self, key: tuple[str, Any]) -> None:
        start = time.monotonic()
        deadline, seen = start, 0
        with self._cond:
            queue = self._queues[key]
            while len(queue) < self.max_batch:
                now = time.monotonic()
                if len(queue) > seen:  # company came: wait for more, within max_wait in all
                    seen = len(queue)
                    deadline = min(now + self.window, start + max(self.max_wait, self.window))
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            batch = queue[: self.max_batch]
            del queue[: self.max_batch]
            if queue:  # more came than fit: the first of the rest gathers the next batch
                queue[0].lead = True
                queue[0].done.set()
            else:
                del self._queues[key]
        if len(batch) == 1:
            batch[0].done.set()  # nobody came: send it alone
            return
        try:  # read on a thread of the batch's own: each call returns as soon as its item ends
            threading.Thread(target=self._send, args=(key, batch), name="engine-batch", daemon=True).start()
        except RuntimeError:  # no thread to be had: everyone alone
            for call in batch:
                call.done.set()

    def _send(self, key: tuple[str, Any], batch: list[_Call]) -> None:
        ended = False  # the engine's [DONE]: a stream without it was cut (the engine died, say)

        def on_line(line: bytes) -> None:
            nonlocal ended
            if line.startswith(b"data: [DONE]"):
                ended = True
                return
            if not line.startswith(b"data: "):
                return
            chunk = json.loads(line[6:])
            index = chunk.pop("index", None) if isinstance(chunk, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(batch):
                raise _Broken(f"The engine streamed a chunk this batch cannot place: {line[:200]!r}")
            if "error" in chunk:  # this item failed; the others go on
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                batch[index].failure = ItemFailed(str(message))
                batch[index].done.set()
                return
            if (chunk.get("meta_info") or {}).get("finish_reason") is None:
                return  # a partial output (an engine that ignores stream_interval)
            if not any(call.answer is not None for call in batch):
                self.batches += 1
            self.batched += 1
            batch[index].answer = chunk
            batch[index].done.set()

        try:
            status, payload, _ = self._post_lines("/generate", _batch_body(key, batch), on_line)
            if status < 400:
                if any(call.answer is None and call.failure is None for call in batch):
                    if not ended:
                        raise ConnectionResetError(
                            "The engine's connection closed in the middle of its answer."
                        )
                    raise _Broken("The engine ended a batched answer before answering every item.")
            else:  # refused whole, so nothing of it ran: each call goes again alone
                self._warn(f"the engine refused it with HTTP {status}: {payload[:200]!r}")
        except Exception as exc:  # the stream broke: the unanswered calls fail with it
            self._warn(f"{type(exc).__name__}: {exc}")
            for call in batch:
                if call.answer is None and call.failure is None:
                    call.failure = exc
        finally:
            for call in batch:
                call.done.set()

    def _warn(self, why: str) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "A batched /generate failed: %s", why)


def _batch_body(key: tuple[str, Any], batch: list[_Call]) -> dict[str, Any]:
    field_name, priority = key
    body: dict[str, Any] = {
        field_name: [call.body[field_name] for call in batch],
        "sampling_params": [
            {**(call.body.get("sampling_params") or {}), "stream_interval": FINALS_ONLY} for call in batch
        ],
        "rid": [call.body["rid"] for call in batch],
        "stream": True,
    }
    if priority is not None:
        body["priority"] = priority
    return body


class ItemFailed(Exception):
    """The engine failed one item of a streamed batch; the message is the engine's."""


class _Broken(Exception):
    """A streamed batch's answer did not fit the batch."""


def _key(body: dict[str, Any]) -> tuple[str, Any] | None:
    """The batch a body may join (its prompt field, its priority), or None: it goes alone."""
    if not body.keys() <= _PLAIN or not isinstance(body.get("rid"), str):
        return None
    params = body.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        return None
    if isinstance(body.get("text"), str) and "input_ids" not in body:
        return ("text", body.get("priority"))
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], int) and "text" not in body:
        return ("input_ids", body.get("priority"))
    return None
