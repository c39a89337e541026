"""The book of invocations in flight: one record, kept the same way by every substrate.

Substrates differ in how they queue, route and run an invocation (the local
pool has per-model queues and worker pipes; the Globus Compute pool has tasks
on engine blocks). What happens to an invocation between ``submit`` and its
one final :class:`~runtime.Result` is the same everywhere, and is written
once, here:

- **admission into the book** (:meth:`Book.open`): counters, and a deadline on
  the substrate's clock when the invocation has a timeout;
- **deadlines** (:meth:`Book.due`): the invocations past theirs, oldest first;
- **retries** (:meth:`Book.retry`): an invocation lost through no fault of its
  own (a dead worker, block or engine) runs again under the next attempt
  number, within its ``retries``;
- **the exactly-once finish** (:meth:`Book.finish`): the first Result wins,
  counters and per-model metrics are charged, its provenance is built
  (:func:`warmpool.build_provenance`), and ``on_done`` runs once,
  outside the lock; every later answer for the same invocation is dropped;
- **failures** that never reached user code (:func:`failure`), shaped alike.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from registry import FunctionSpec, ModelSpec
from runtime import ErrorKind, Invocation, InvocationTimeout, Result, error_info
from warmpool._metrics import ModelMetrics
from warmpool._provenance import ensure_provenance

log = logging.getLogger("faas.pool")

Clock = Callable[[], float]


@dataclass(eq=False)
class Entry:
    """One invocation as a substrate tracks it (substrates add their routing fields).

    Attributes:
        invocation: The invocation (its ``attempt`` grows on retry).
        spec: The function spec it runs.
        model: The resolved model version, if the function has one.
        on_done: Called exactly once with the final Result.
        submitted: Arrival time on the substrate's clock.
        submitted_wall: Arrival time (epoch seconds).
        deadline: When it times out, on the substrate's clock (None: never).
        finished: Set once, by :meth:`Book.finish`.
        cold: It arrived when its model had no ready replica.
    """

    invocation: Invocation
    spec: FunctionSpec
    model: ModelSpec | None
    on_done: Callable[[Result], None]
    submitted: float = 0.0
    submitted_wall: float = field(default_factory=time.time)
    deadline: float | None = None
    finished: bool = False
    cold: bool = False


W = TypeVar("W", bound=Entry)


class Book(Generic[W]):
    """The invocations one substrate has in flight.

    Args:
        lock: The substrate's lock (the book's state changes under it, so a
            substrate can update its own routing state in the same critical section).
        clock: The substrate's monotonic clock (deadlines are on it).
        metrics_for: The per-model metrics an entry is charged to, if any.
    """

    def __init__(
        self,
        lock: threading.RLock,
        clock: Clock,
        metrics_for: Callable[[W], ModelMetrics | None],
    ) -> None:
        self._lock = lock
        self._clock = clock
        self._metrics_for = metrics_for
        self.works: dict[str, W] = {}
        self._deadlines: list[tuple[float, str]] = []
        self.counters: dict[str, int] = {"submitted": 0, "completed": 0, "failed": 0, "workers_lost": 0}

    def open(self, work: W) -> None:
        """Enter an admitted invocation, with its deadline (caller holds the lock)."""
        self.counters["submitted"] += 1
        self.works[work.invocation.id] = work
        if work.invocation.timeout is not None:
            work.deadline = work.submitted + work.invocation.timeout
            heapq.heappush(self._deadlines, (work.deadline, work.invocation.id))

    def get(self, invocation_id: str) -> W | None:
        """The unfinished entry of an invocation, or None."""
        with self._lock:
            work = self.works.get(invocation_id)
            return None if work is None or work.finished else work

    def unfinished(self) -> list[W]:
        """Every entry not finished yet."""
        with self._lock:
            return [w for w in self.works.values() if not w.finished]

    def next_deadline(self) -> float | None:
        """The earliest pending deadline (substrate clock), if any."""
        with self._lock:
            return self._deadlines[0][0] if self._deadlines else None

    def due(self) -> list[W]:
        """Pop the unfinished entries whose deadline has passed."""
        expired: list[W] = []
        with self._lock:
            now = self._clock()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, invocation_id = heapq.heappop(self._deadlines)
                work = self.works.get(invocation_id)
                if work is not None and not work.finished and work.deadline is not None:
                    expired.append(work)
        return expired

    def _drop_stale_deadlines(self) -> None:
        # Finished entries leave their deadline in the heap until it is due; at 100/s with a
        # 600 s timeout that is 60,000 dead tuples. Rebuild once they outnumber the live ones.
        if len(self._deadlines) > 2 * len(self.works) + 1024:
            self._deadlines = [d for d in self._deadlines if d[1] in self.works]
            heapq.heapify(self._deadlines)

    def retry(self, work: W) -> bool:
        """Move a lost entry to its next attempt if its budget allows (caller holds the lock).

        Returns:
            True when it should run again (its ``invocation.attempt`` was raised);
            False when it is finished already or has no retries left.
        """
        inv = work.invocation
        if work.finished or inv.attempt >= inv.retries:
            return False
        work.invocation = inv.model_copy(update={"attempt": inv.attempt + 1})
        metrics = self._metrics_for(work)
        if metrics is not None:
            metrics.retried += 1
        return True

    def finish(
        self,
        work: W,
        result: Result,
        prepare: Callable[[W, Result], None] | None = None,
    ) -> bool:
        """Give ``work`` its final Result, once; later calls for it do nothing.

        Args:
            work: The entry.
            result: Its final Result.
            prepare: Runs under the lock once the finish is certain, before
                counting (a substrate releases its slots and fills in timing here).

        Returns:
            Whether this call finished it.
        """
        with self._lock:
            if work.finished:
                return False
            work.finished = True
            self.works.pop(work.invocation.id, None)
            self._drop_stale_deadlines()
            if prepare is not None:
                prepare(work, result)
            if result.queue_seconds is None and result.started_at:
                result.queue_seconds = max(0.0, result.started_at - work.submitted_wall)
            self.counters["completed" if result.ok else "failed"] += 1
            metrics = self._metrics_for(work)
            if metrics is not None:
                _count(metrics, result)
        ensure_provenance(work.invocation, work.spec, work.model, result)  # once, for every substrate
        try:
            work.on_done(result)
        except Exception:
            log.exception("on_done callback for %s raised", work.invocation.id)
        return True

    def fail(
        self,
        work: W,
        exc: BaseException,
        kind: ErrorKind,
        prepare: Callable[[W, Result], None] | None = None,
    ) -> bool:
        """Finish ``work`` with a failure that never reached user code (see :meth:`finish`)."""
        return self.finish(work, failure(work, exc, kind), prepare)

    def expire(self, work: W, prepare: Callable[[W, Result], None] | None = None) -> bool:
        """Finish ``work`` as timed out."""
        timeout = work.invocation.timeout
        exc = InvocationTimeout(f"The invocation of {work.spec.name!r} ran past its timeout of {timeout} s.")
        return self.finish(work, failure(work, exc, "timeout"), prepare)


def failure(work: Entry, exc: BaseException, kind: ErrorKind) -> Result:
    """A failed Result for ``work`` that never produced one of its own."""
    return Result(
        invocation_id=work.invocation.id,
        error=error_info(exc, kind, with_traceback=False),
        attempt=work.invocation.attempt,
        finished_at=time.time(),
    )


def _count(metrics: ModelMetrics, result: Result) -> None:
    if result.ok:
        metrics.completed += 1
    else:
        metrics.failed += 1
        kind = result.error.kind if result.error else ""
        if kind == "timeout":
            metrics.timeouts += 1
        elif kind == "cancelled":
            metrics.cancelled += 1
    if result.queue_seconds is not None:
        metrics.queue_wait_seconds.add(result.queue_seconds)
    if result.started_at and result.finished_at:
        metrics.execution_seconds.add(result.finished_at - result.started_at)
