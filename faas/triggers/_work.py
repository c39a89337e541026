"""What a trigger runner tracks per binding, and how it finishes an attempt.

:class:`Committer` turns a finished invocation into its durable outcome. The
worker wrote the output inside the invocation (commit-once, see
:func:`runtime._outputs.write_output`) and reported it; the committer writes
the done marker (commit-once). Or it records a failure that is retried, or,
once ``max_attempts`` is spent, a dead letter with the error and provenance.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faas.triggers._buckets import Bucket, ObjectEvent
from faas.triggers._sources import EventSource, PollingSource
from faas.triggers._state import Claim, TriggerState, event_doc
from registry import TriggerBinding
from runtime import REPORT_STATES, ObjectStore, OutputTarget, SerializationError, StoreError

log = logging.getLogger("faas.triggers")
Outcome = tuple[str, Any]


@dataclass(eq=False)
class Item:
    """One object version on its way through a runner."""

    id: str
    event: ObjectEvent
    attempt: int = 1
    failures: int = 0
    claimed: bool = False
    not_before: float = 0.0
    retry_of: str | None = None
    takeover: bool = False  # the next attempt of a claim whose holder died, not yet claimed
    future: concurrent.futures.Future[Any] | None = None
    started: float = 0.0
    claimed_at: float = 0.0


@dataclass
class Listing:
    """A listing of a binding's prefix, and its records when they were needed."""

    listed: list[tuple[str, ObjectEvent]]  # (dedup id, event) of objects not known to be finished
    retries: list[dict[str, Any]]
    records: tuple[set[str], set[str], dict[str, int]] | None  # done ids, dead ids, latest attempts


@dataclass(eq=False)
class Run:
    """One binding as a runner runs it: its buckets, sources and in-memory queues."""

    binding: TriggerBinding
    src: Bucket
    out: Bucket
    state: TriggerState
    sources: list[EventSource]
    pending: dict[str, Item] = field(default_factory=dict)
    inflight: dict[str, Item] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    foreign: dict[str, float] = field(default_factory=dict)
    unclaimed: dict[str, float] = field(default_factory=dict)  # seen in a listing, held elsewhere
    counters: Counter[str] = field(default_factory=Counter)
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    max_inflight_seen: int = 0
    fetching: concurrent.futures.Future[Listing] | None = None  # a listing running on the I/O threads
    more: bool = False  # the last listing found more than the runner claimed
    listings: int = 0
    next_full: float = float("-inf")  # when the next listing also lists the records

    def poller(self) -> PollingSource | None:
        return next((s for s in self.sources if isinstance(s, PollingSource)), None)

    def metrics(self, runner_id: str, now: float) -> dict[str, Any]:
        """The binding's numbers as this runner sees them (backlog, lag, counters)."""
        waiting = {i.id: i.event.event_time for i in [*self.pending.values(), *self.inflight.values()]}
        waiting.update({k: v for k, v in self.unclaimed.items() if k not in self.settled})
        lags = list(self.lags)
        return {
            "binding": self.binding.name, "runner": runner_id, "paused": self.binding.paused,
            "updated_at": now, "backlog": len(waiting), "pending": len(self.pending),
            "inflight": len(self.inflight),
            "oldest_unprocessed_age": (now - min(waiting.values())) if waiting else 0.0,
            "max_inflight_seen": self.max_inflight_seen, "max_concurrency": self.binding.max_concurrency,
            "lag_p50": percentile(lags, 0.5), "lag_p95": percentile(lags, 0.95),
            "counters": dict(self.counters),
        }  # fmt: skip

    def apply(self, item: Item, outcome: Outcome, now: float, backoff: Callable[[int], float]) -> None:
        """Record what became of a finished attempt (requeue it, or settle it)."""
        kind, detail = outcome
        self.counters[kind] += 1
        if kind == "retry":
            item.future, item.claimed, item.attempt = None, False, item.attempt + 1
            item.failures, item.not_before = detail, now + backoff(detail)
            self.pending[item.id] = item
        elif kind == "commit_error":
            self.pending[item.id] = item  # committed nothing: run again (the next commit is conditional)
            item.future, item.claimed, item.attempt = None, False, item.attempt + 1
        else:
            self.settled.add(item.id)
            if kind == "done":
                self.lags.append(float(detail["committed_at"]) - item.event.event_time)

    def close(self) -> None:
        """Close the binding's event sources."""
        for source in self.sources:
            with contextlib.suppress(Exception):
                source.close()

    def mine(self, id: str) -> bool:
        return id in self.pending or id in self.inflight

    def target(self, item: Item) -> OutputTarget:
        """Where the worker writes ``item``'s output, and what guards replacing one."""
        b, ev = self.binding, item.event
        return OutputTarget(
            store=self.out.store_config(), bucket=self.out.name, key=b.output_key(ev.key),
            base=b.output_prefix + b.relative_name(ev.key), done_key=self.state.done_key(item.id),
            source=self.src.store_config(), source_key=ev.key, source_etag=ev.etag,
        )  # fmt: skip


def location(b: TriggerBinding) -> tuple[Any, ...]:
    """What a binding's buckets and sources depend on (a change means building them anew)."""
    return (b.storage, b.bucket, b.prefix, b.out_bucket, b.endpoint_url, b.queue_url, b.poll_interval)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def warn_if_unreadable(binding: TriggerBinding, store: ObjectStore) -> None:
    """Warn when the function's ObjectRefs cannot be opened through the faas store's endpoint."""
    config = store.config()
    if binding.storage == "s3" and (
        config["kind"] != "s3" or config["options"].get("endpoint_url") != binding.endpoint_url
    ):
        log.warning(
            "Binding %r reads S3 bucket %r at %s, but this client's store is %s: functions that open "
            "their faas.ObjectRef read through the store's endpoint and will not find the object.",
            binding.name, binding.bucket, binding.endpoint_url or "AWS", store.url(),
        )  # fmt: skip


class Committer:
    """Finishes attempts for one runner.

    Args:
        runner_id: Written into claims, done markers and dead letters.
        clock: Wall clock.
    """

    def __init__(self, runner_id: str, clock: Callable[[], float]) -> None:
        self.runner_id, self.clock = runner_id, clock

    def claim(self, run: Run, item: Item) -> bool | Exception:
        """Claim ``item``'s attempt commit-once: True if won, False if taken, else the store's error."""
        now = self.clock()
        ev = item.event
        claim = Claim(
            id=item.id, attempt=item.attempt, runner=self.runner_id, failures=item.failures, claimed_at=now,
            updated_at=now, bucket=ev.bucket, key=ev.key, etag=ev.etag, size=ev.size,
            event_time=ev.event_time, origin=ev.origin,
        )  # fmt: skip
        try:
            won = run.state.claim(claim)
        except StoreError as exc:
            return exc
        if won:
            item.claimed, item.claimed_at = True, now
        return won

    def finish(self, run: Run, item: Item) -> Outcome:
        """The outcome of ``item``'s finished invocation: its done marker, or a recorded failure."""
        assert item.future is not None
        try:
            report = item.future.result()
            if not isinstance(report, dict) or report.get("state") not in REPORT_STATES:
                raise SerializationError(
                    f"The invocation of {item.event.key!r} returned {type(report).__name__}, not a report "
                    "of its output write (a worker without trigger support?)."
                )
        except Exception as exc:
            return self.failed(run, item, exc)
        try:
            return self.commit(run, item, report)
        except StoreError as exc:
            log.warning("Committing %s failed; it will run again: %s", item.event.key, exc)
            return "commit_error", exc

    def commit(self, run: Run, item: Item, report: dict[str, Any]) -> Outcome:
        """Write the done marker of an object whose output the worker wrote (as ``report`` says)."""
        b, ev, state = run.binding, item.event, report["state"]
        if state == "done_elsewhere":
            return "done_elsewhere", None
        if state in ("superseded", "deleted"):
            return self.superseded(run, item, state == "deleted")
        doc = {
            "id": item.id, "state": "done", "event": event_doc(ev), "output_key": report.get("key"),
            "output_sha256": report.get("sha256"), "output_bytes": report.get("bytes"),
            "replaced": state == "replaced", "function": b.function, "function_version": b.function_version,
            "function_digest": b.function_digest, "attempt": item.attempt, "runner": self.runner_id,
            "invocation_id": getattr(item.future, "invocation_id", None),
            "started_at": item.started, "committed_at": self.clock(),
        }  # fmt: skip
        return ("done", doc) if run.state.put_done(item.id, doc) else ("done_elsewhere", None)

    def superseded(self, run: Run, item: Item, deleted: bool) -> Outcome:
        state = "deleted" if deleted else "superseded"
        doc = {"id": item.id, "state": state, "event": event_doc(item.event), "committed_at": self.clock()}
        run.state.put_done(item.id, doc)
        return state, doc

    def failed(self, run: Run, item: Item, exc: BaseException) -> Outcome:
        """Record a failed attempt: retry it, or dead-letter it once the budget is spent."""
        current = run.src.head(item.event.key)
        if current is None or current.etag != item.event.etag:
            return self.superseded(run, item, current is None)
        failures, now = item.failures + 1, self.clock()
        remote = getattr(exc, "remote_traceback", None) or "".join(getattr(exc, "__notes__", []))
        error = {
            "type": getattr(exc, "type_name", None) or type(exc).__name__,
            "message": str(exc),
            "traceback": remote or "".join(traceback.format_exception(exc)),
        }
        ev = item.event
        claim = Claim(
            id=item.id, attempt=item.attempt, runner=self.runner_id, state="failed", failures=failures,
            claimed_at=item.claimed_at or now, updated_at=now, bucket=ev.bucket, key=ev.key, etag=ev.etag,
            size=ev.size, event_time=ev.event_time, origin=ev.origin, error=error,
        )  # fmt: skip
        run.state.update_claim(claim)
        if failures < run.binding.max_attempts:
            return "retry", failures
        item.failures = failures
        return "dead", self.dead_letter(run, item, error, now)

    def dead_letter(self, run: Run, item: Item, error: dict[str, str], now: float) -> dict[str, Any]:
        b = run.binding
        doc = {
            "id": item.id, "binding": b.name, "event": event_doc(item.event), "error": error,
            "attempts": item.attempt, "failures": item.failures, "function": b.function,
            "function_version": b.function_version, "function_digest": b.function_digest,
            "runner": self.runner_id, "failed_at": now,
        }  # fmt: skip
        run.state.put_dead(item.id, doc)
        return doc
