"""Pipelined submits: ``RemoteClient.submit`` returns at once, one sender thread sends batches.

A script that submits in a loop would otherwise wait one round trip to the
service per call, and that round trip (a few milliseconds under load) capped
what one client could keep in flight. Instead each submit is checked and
staged in the caller's thread, queued with its future, and returned; one
sender thread takes whatever has queued and sends it as batch requests (one
per function, at most ``MAX_BATCH`` items and ``MAX_BATCH_BYTES`` of inline
arguments each). Batching is natural, with no timer: while one request is on
the wire the next submits gather, so a lone submit goes out at once and a
loop of them goes out in batches as large as the round trip makes them.

What the service says comes back on the futures: the id it chose
(``Future.invocation_id`` waits for it) or its refusal (``result()`` raises
the same typed error a synchronous submit would have raised). Nothing queued
is dropped: ``flush`` and ``close`` send what is queued first, and an
interpreter exiting with submits still queued sends them before it goes.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from faas._future import Future
from faas.service._api import MAX_BATCH, MAX_BATCH_BYTES, Item
from runtime import FaasError, PoolClosedError, ServiceError

log = logging.getLogger("faas.remote")

Send = Callable[[str, list[Item]], list[str]]
Named = Callable[[list[tuple[str, Future[Any]]]], None]
_Queued = tuple[str, Item, Future[Any]]
_LIVE: weakref.WeakSet[SubmitPipeline] = weakref.WeakSet()


def chunks(
    items: Sequence[Item], max_items: int = MAX_BATCH, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[range]:
    """Index ranges of ``items`` that fit one batch request (by count and by inline bytes).

    An item is never split off alone because of its size unless it is the
    first of its range: every item is at most ``MAX_INLINE_BYTES``, far below
    ``max_bytes``.
    """
    start = size = 0
    for n, item in enumerate(items):
        if n > start and (n - start >= max_items or size + len(item.args) > max_bytes):
            yield range(start, n)
            start, size = n, 0
        size += len(item.args)
    if start < len(items):
        yield range(start, len(items))


class SubmitPipeline:
    """Queues submits and sends them as batches on one thread, in order.

    Args:
        send: Sends one batch of one function; returns the invocation ids in
            item order, or raises the service's typed error.
        named: Called with ``(id, future)`` pairs once a batch is accepted
            (the client starts watching them).
        max_queued: Submits waiting to be sent before ``put`` blocks.
    """

    def __init__(self, send: Send, named: Named, *, max_queued: int = 4 * MAX_BATCH) -> None:
        self._send = send
        self._named = named
        self._max_queued = max_queued
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cond = threading.Condition()
        self._sending = 0  # taken from the queue, not yet answered
        self._closed = False
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    def put(self, function: str, item: Item, future: Future[Any]) -> None:
        """Queue one submit of ``function``; waits while ``max_queued`` are queued.

        Raises:
            PoolClosedError: The pipeline (its client) is closed.
        """
        with self._cond:
            while len(self._queue) >= self._max_queued and not self._closed:
                self._cond.wait()  # back-pressure: the service answers slower than this process submits
            if self._closed:
                raise PoolClosedError("This faas remote client has been shut down.")
            self._queue.append((function, item, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="faas-submit", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been answered; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._sending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Send what is queued (up to ``timeout`` seconds), then stop.

        Submits still queued after that fail with PoolClosedError; none is dropped silently.
        """
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if left:
            error = PoolClosedError(
                f"The client was shut down before {len(left)} queued submits could be sent "
                f"({'the service did not answer in time' if not flushed else 'closed meanwhile'})."
            )
            for _, _, future in left:
                future._refuse(error)
        _LIVE.discard(self)

    def _take(self) -> list[_Queued] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            taken = list(self._queue)
            self._queue.clear()
            self._sending = len(taken)
            self._cond.notify_all()  # room for the submitters again
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                by_function: dict[str, list[tuple[Item, Future[Any]]]] = {}
                for function, item, future in taken:  # dicts keep first-seen order
                    by_function.setdefault(function, []).append((item, future))
                for function, group in by_function.items():
                    items = [item for item, _ in group]
                    for span in chunks(items):
                        self._send_one(function, [items[n] for n in span], [group[n][1] for n in span])
            finally:
                with self._cond:
                    self._sending = 0
                    self._cond.notify_all()

    def _send_one(self, function: str, items: list[Item], futures: list[Future[Any]]) -> None:
        try:
            ids = self._send(function, items)
            if len(ids) != len(items):
                raise ServiceError(f"The service answered a batch of {len(items)} with {len(ids)} ids.", 500)
        except FaasError as exc:
            for future in futures:
                future._refuse(exc)
            return
        except Exception as exc:  # a bug here must fail the futures, not hang them
            log.exception("Sending a batch of %d submits failed", len(items))
            error = ServiceError(f"Sending the submit failed: {type(exc).__name__}: {exc}", 0)
            for future in futures:
                future._refuse(error)
            return
        for invocation_id, future in zip(ids, futures, strict=True):
            future._name(invocation_id)
        try:
            self._named(list(zip(ids, futures, strict=True)))
        except PoolClosedError as exc:  # closed while this batch was on the wire: it runs, unwatched
            for future in futures:
                future._refuse(exc)


@atexit.register
def _flush_at_exit() -> None:
    """A script that submits and exits without waiting still gets its invocations sent."""
    for pipeline in list(_LIVE):
        if not pipeline.flush(30.0):
            log.warning("Some queued submits were not answered within 30 s of exit.")
