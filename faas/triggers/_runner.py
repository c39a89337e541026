"""The trigger runner: turns object events into invocations, each object version once.

One pass (:meth:`TriggerRunner.run_once`) polls the event sources, claims new
object versions durably (commit-once claims in the faas store), submits claimed
ones through its submitter (an embedded client's pool, or the service core of
``faas serve``) by the bound function's digest, up to each binding's
``max_concurrency``, and commits finished ones: the worker wrote the output
inside the invocation (commit-once); the runner writes the done marker
(commit-once).
A failed attempt is retried up to ``max_attempts``, then dead-lettered. A
runner that dies leaves claims whose holder stops heartbeating; another runner
takes them over after the binding's lease. ``start()``/``stop()`` run passes on
a thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from faas.triggers._buckets import ObjectEvent, buckets_for
from faas.triggers._reconcile import Reconciler
from faas.triggers._sources import EventSource, PollingSource, default_sources
from faas.triggers._state import TriggerState, read_heartbeat, write_heartbeat
from faas.triggers._submit import ClientSubmitter, Submitter
from faas.triggers._work import Committer, Item, Run, location, warn_if_unreadable
from registry import Bindings, TriggerBinding
from runtime import (
    BackPressureError,
    ObjectStore,
    PoolClosedError,
    QuotaExceededError,
    StoreError,
    SubmitError,
)
from runtime import dumps as serde_dumps

if TYPE_CHECKING:
    from faas._function import Function
    from faas.clients._embedded import Client

log = logging.getLogger("faas.triggers")
Clock = Callable[[], float]


class TriggerRunner(Reconciler):
    """Runs trigger bindings through an embedded faas client, or any :class:`Submitter`.

    Args:
        client: An embedded :class:`faas.Client`: submits the invocations; its
            store holds bindings and trigger records. Give ``store`` and
            ``submitter`` instead to run elsewhere (``faas serve`` does).
        store: The faas store holding bindings and trigger records (with ``submitter``).
        submitter: Starts the attempts (with ``store``).
        bindings: Names of the bindings to run (default: every stored binding).
        functions: Functions to register before running (bindings name theirs
            by digest; the runner never loads them).
        sources: Event sources per binding name, replacing the defaults
            (:func:`default_sources`); tests wrap them to drop or duplicate events.
        clock: Wall clock (injectable; event and heartbeat times use it).
        runner_id: This runner's id in claims and heartbeats (default: host-pid-random).
        wait_seconds: Long-poll wait of notification sources when nothing is in flight.
        reload_interval: Seconds between re-reads of the stored bindings (pause, resume, rebind).
        status_interval: Seconds between metrics snapshots written to the store.
        retry_backoff: Base of the exponential delay before a failed object is retried.
        io_threads: Threads for store writes (claims, outputs, done markers).
        max_pending: Claimed objects waiting for a slot, per binding, at most; a
            listing that finds more claims the rest once the queue drains.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        store: ObjectStore | None = None,
        submitter: Submitter | None = None,
        bindings: Iterable[str] | None = None,
        functions: Iterable[Function[Any]] = (),
        sources: Mapping[str, Sequence[EventSource]] | None = None,
        clock: Clock = time.time,
        runner_id: str | None = None,
        wait_seconds: float = 1.0,
        reload_interval: float = 5.0,
        status_interval: float = 2.0,
        retry_backoff: float = 1.0,
        io_threads: int = 8,
        max_pending: int = 2000,
    ) -> None:
        if client is not None:
            from faas.clients._remote import RemoteClient

            if isinstance(client, RemoteClient):
                raise TypeError(
                    "A TriggerRunner runs on an embedded faas.Client; bindings made through a "
                    "faas.RemoteClient are run by the faas service itself."
                )
            store, submitter = client.store, submitter or ClientSubmitter(client)
            for f in functions:
                client.register(f)
        if store is None or submitter is None:
            raise TypeError("TriggerRunner needs a client, or a store and a submitter.")
        self.client, self.store, self.submitter = client, store, submitter
        self._names = None if bindings is None else list(bindings)
        self._source_overrides = dict(sources or {})
        self._clock = clock
        self.id = runner_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._committer = Committer(self.id, clock)
        self.wait_seconds, self.reload_interval = wait_seconds, reload_interval
        self.status_interval, self.retry_backoff = status_interval, retry_backoff
        self.max_pending = max_pending
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="faas-trigger-io")
        self._runs: dict[str, Run] = {}
        self._next_reload = self._next_beat = self._next_status = float("-inf")
        self._alive: dict[str, bool] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beater: threading.Thread | None = None
        self._lock = threading.Lock()
        self.reload()

    def __repr__(self) -> str:
        return f"<TriggerRunner {self.id} bindings={sorted(self._runs)}>"

    # -- bindings --------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the stored bindings now (new, changed, paused, removed)."""
        stored = {b.name: b for b in Bindings(self.store).list()}
        wanted = set(stored) if self._names is None else set(self._names)
        missing = wanted - set(stored)
        if missing and self._names is not None and not self._runs:
            from runtime import UnknownBindingError

            raise UnknownBindingError(f"No trigger binding named {sorted(missing)} is stored.")
        for name in list(self._runs):
            if (name not in wanted or name not in stored) and not self._runs[name].inflight:
                self._runs.pop(name).close()
        for name in sorted(wanted & set(stored)):
            binding = stored[name]
            run: Run | None = self._runs.get(name)
            if run is not None and location(binding) != location(run.binding) and not run.inflight:
                self._runs.pop(name).close()  # moved: new buckets and sources
                run = None
            if run is None:
                self._runs[name] = self._new_run(binding)
            else:
                run.binding = binding
        self._next_reload = self._clock() + self.reload_interval

    def reload_soon(self) -> None:
        """Re-read the stored bindings at the next pass (safe from any thread)."""
        self._next_reload = float("-inf")
        self._wake.set()

    def _new_run(self, binding: TriggerBinding) -> Run:
        config = self.store.config()
        root = config["options"].get("root") if config["kind"] == "file" else None
        src, out = buckets_for(binding, root)
        override = self._source_overrides.get(binding.name)
        sources = list(override) if override is not None else default_sources(binding, src, clock=self._clock)
        warn_if_unreadable(binding, self.store)
        state = TriggerState(self.store, binding.name)
        return Run(binding, src, out, state, sources)

    # -- one pass --------------------------------------------------------------------------
    def run_once(self, *, wait_for_listings: bool = True) -> int:
        """Do one pass: poll, claim, submit, commit. Returns how many things changed state.

        Args:
            wait_for_listings: Finish a due listing within this pass. The runner's
                thread passes False: listings then run on the I/O threads while
                passes go on, and are applied by the pass after they finish.
        """
        now = self._clock()
        if now >= self._next_reload:
            self.reload()
        if now >= self._next_beat and self._beater is None:
            self._heartbeat(now)
        self._alive.clear()
        busy = any(r.inflight or r.pending for r in self._runs.values())
        changed, waited = 0, busy
        for run in list(self._runs.values()):
            for source in run.sources:
                if isinstance(source, PollingSource):
                    changed += self._listing(run, source, wait_for_listings)
                    continue
                events = source.poll(0.0 if waited else self.wait_seconds)
                waited = True
                changed += self._offer(run, source, events)
        for run in self._runs.values():
            changed += self._collect(run) + self._dispatch(run)
            poller = run.poller()
            if run.more and poller is not None and len(run.pending) < self.max_pending // 2:
                poller.trigger()
        if self._clock() >= self._next_status:
            self.write_status()
        return changed

    def _heartbeat(self, now: float) -> None:
        doc = {"runner": self.id, "pid": os.getpid(), "host": socket.gethostname(), "beat_at": now}
        write_heartbeat(self.store, self.id, {**doc, "bindings": sorted(self._runs)})
        lease = min((r.binding.lease_seconds for r in self._runs.values()), default=60.0)
        self._next_beat = now + lease / 4

    def _holder_alive(self, run: Run, runner: str, now: float) -> bool:
        if runner == self.id:
            return True
        if runner not in self._alive:
            beat = read_heartbeat(self.store, runner)
            fresh = beat is not None and not beat.get("stopped")
            self._alive[runner] = fresh and now - float(beat["beat_at"]) <= run.binding.lease_seconds  # type: ignore[index]
        return self._alive[runner]

    # -- intake ---------------------------------------------------------------------------
    def _offer(self, run: Run, source: EventSource, events: list[ObjectEvent]) -> int:
        """Claim notified objects; acknowledge the messages whose events are recorded."""
        b, fresh, bad = run.binding, [], set()
        for ev in events:
            if ev.bucket != run.src.name or not b.matches(ev.key) or b.paused:
                continue  # not ours, or paused: the reconciler finds it after resume
            ids = [b.dedup_id(ev.bucket, ev.key, ev.etag, d) for d in b.digests]
            if any(i in run.settled or run.mine(i) or i in run.foreign for i in ids):
                run.counters["duplicates"] += 1
                continue
            if len(ids) > 1 and any(run.state.is_settled(i) for i in ids[1:]):
                run.settled.add(ids[0])
                continue
            fresh.append(Item(ids[0], ev))
        for item, outcome in self._claim_all(run, fresh):
            if isinstance(outcome, Exception):
                bad.add(item.event.receipt)
                log.warning("Could not claim %s/%s: %s", item.event.bucket, item.event.key, outcome)
            elif outcome:
                run.pending[item.id] = item
                run.counters["claimed_" + item.event.origin] += 1
            else:
                run.foreign[item.id] = 0.0
                run.counters["duplicates"] += 1
        acked = [e for e in events if e.receipt not in bad]
        if acked:
            self._io.submit(source.ack, acked).add_done_callback(_log_failure)
        return len(fresh)

    def _claim_all(self, run: Run, items: list[Item]) -> Iterable[tuple[Item, bool | Exception]]:
        """Claim ``items`` in parallel; pairs of item and outcome, in order."""
        return zip(items, self._io.map(lambda i: self._committer.claim(run, i), items), strict=True)

    def _backoff(self, failures: int) -> float:
        return float(min(self.retry_backoff * 2.0 ** max(0, failures - 1), 300.0))

    # -- dispatch --------------------------------------------------------------------------
    def _dispatch(self, run: Run) -> int:
        b, now = run.binding, self._clock()
        room = b.max_concurrency - len(run.inflight)
        if b.paused or room <= 0:
            return 0
        ready = [i for i in run.pending.values() if i.not_before <= now][:room]
        to_claim = [i for i in ready if not i.claimed]
        for item, won in self._claim_all(run, to_claim):
            if won is not True:
                del run.pending[item.id]
                run.foreign[item.id] = now if isinstance(won, Exception) else now + b.lease_seconds / 2
                continue
            if item.takeover:  # counted here, not when found: of runners racing to take over, one wins
                item.takeover = False
                run.counters["recovered"] += 1
            if item.retry_of:
                with contextlib.suppress(StoreError):
                    run.state.delete_dead(item.retry_of)
                    run.state.delete_retry(item.retry_of)
        started = 0
        for item in ready:
            if not item.claimed:
                continue
            args = serde_dumps(((run.src.ref(item.event),), {}), what=f"trigger arguments of {b.name!r}")
            try:
                future = self.submitter.submit(
                    b, args, attempt=f"{b.name}/{item.id}/{item.attempt}", output=run.target(item)
                )
            except (BackPressureError, QuotaExceededError):  # no room now: it stays pending
                run.counters["back_pressure"] += 1
                break
            except PoolClosedError:
                break
            except SubmitError as exc:
                del run.pending[item.id]
                run.apply(item, self._committer.failed(run, item, exc), self._clock(), self._backoff)
                continue
            future.add_done_callback(lambda _f: self._wake.set())
            item.future, item.started = future, now
            run.inflight[item.id] = run.pending.pop(item.id)
            started += 1
        run.max_inflight_seen = max(run.max_inflight_seen, len(run.inflight))
        return started

    # -- completion ------------------------------------------------------------------------
    def _collect(self, run: Run) -> int:
        finished = [i for i in run.inflight.values() if i.future is not None and i.future.done()]
        for item, outcome in zip(
            finished, self._io.map(lambda i: self._committer.finish(run, i), finished), strict=True
        ):
            del run.inflight[item.id]
            run.apply(item, outcome, self._clock(), self._backoff)
        return len(finished)

    # -- metrics ---------------------------------------------------------------------------
    def metrics(self, name: str) -> dict[str, Any]:
        """Binding ``name``'s numbers as this runner sees them (backlog, lag, counters)."""
        return self._runs[name].metrics(self.id, self._clock())

    def metrics_all(self) -> dict[str, dict[str, Any]]:
        """:meth:`metrics` of every binding this runner runs."""
        return {name: self.metrics(name) for name in sorted(self._runs)}

    def write_status(self) -> None:
        """Write every binding's metrics snapshot to the store now (``faas triggers ls`` reads them)."""
        self._next_status = self._clock() + self.status_interval
        for name, run in self._runs.items():
            try:
                run.state.write_status(self.id, self.metrics(name))
            except StoreError as exc:
                log.warning("Could not write the trigger status of %s: %s", name, exc)

    def reconcile_now(self) -> None:
        """Make the next pass list every binding's prefix (and pick up retries) at once."""
        for run in self._runs.values():
            poller = run.poller()
            if poller is not None:
                poller.trigger()

    def binding_names(self) -> list[str]:
        """The bindings this runner runs."""
        return sorted(self._runs)

    def idle(self) -> bool:
        """Whether nothing is pending or in flight in this runner."""
        return not any(r.pending or r.inflight for r in self._runs.values())

    # -- thread ----------------------------------------------------------------------------
    def start(self) -> TriggerRunner:
        """Run passes on a background thread until :meth:`stop`."""
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                self._heartbeat(self._clock())
                self._thread = threading.Thread(target=self._loop, name="faas-trigger-runner", daemon=True)
                self._beater = threading.Thread(target=self._beat_loop, name="faas-trigger-beat", daemon=True)
                self._thread.start()
                self._beater.start()
        return self

    def _beat_loop(self) -> None:
        """Heartbeats on their own thread, so a long pass never makes this runner look dead."""
        while not self._stop.wait(max(0.05, self._next_beat - self._clock())):
            try:
                self._heartbeat(self._clock())
            except Exception as exc:
                log.warning("Could not write the heartbeat of runner %s: %s", self.id, exc)
                self._next_beat = self._clock() + 1.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                changed = self.run_once(wait_for_listings=False)
            except Exception:
                log.exception("A trigger pass failed; the next pass starts in 1 s")
                self._stop.wait(1.0)
                continue
            if not changed:  # pace the loop; finished invocations and listings wake it
                self._wake.wait(0.05 if not self.idle() else min(0.2, self._next_listing()))
                self._wake.clear()

    def _next_listing(self) -> float:
        pollers = [p for r in self._runs.values() if (p := r.poller()) is not None]
        return min((p.seconds_to_next() for p in pollers), default=0.2)

    def stop(self, timeout: float = 30.0, *, drain: float | None = None, release: bool = True) -> None:
        """Stop the thread; work in flight is committed if it finishes within ``drain`` seconds.

        Args:
            timeout: Seconds to wait for the threads.
            drain: Seconds to wait for work in flight (default ``timeout``).
            release: Mark this runner stopped, so other runners take its claims
                over at once. A service keeps them (False): its index runs the
                invocations again on restart, under a runner of the same id.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            beater, self._beater = self._beater, None
        self._stop.set()
        self._wake.set()
        for t in (thread, beater):
            if t is not None:
                t.join(timeout)
        deadline = time.monotonic() + (timeout if drain is None else drain)
        while any(r.inflight for r in self._runs.values()) and time.monotonic() < deadline:
            for run in self._runs.values():
                self._collect(run)
            self._wake.wait(0.05)
            self._wake.clear()
        with contextlib.suppress(StoreError):
            self.write_status()
            if release:
                beat = {"runner": self.id, "beat_at": self._clock(), "stopped": True}
                write_heartbeat(self.store, self.id, beat)  # others may take its claims over at once
        self._io.shutdown(wait=True)  # pending acknowledgements and listings first
        for run in self._runs.values():
            run.close()

    def __enter__(self) -> TriggerRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.exception() is not None:
        log.warning("Acknowledging events failed (they will be delivered again): %s", future.exception())
