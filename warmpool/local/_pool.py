"""The in-process warm pool: resident engine replicas and long-lived workers.

The pool owns two kinds of child processes: engine replicas (one process group each) and
worker processes (each running many invocations in threads). An invocation with a model
waits in that model's bounded queue until a ready replica has a free slot (``max_inflight``),
then goes to the worker with the fewest invocations in flight. The pool enforces timeouts
from outside the worker, retries invocations lost with a dead worker or engine within their
retry budget, scales replicas between ``min_replicas`` and ``max_replicas``, and on
shutdown leaves no child process behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry import FunctionSpec, ModelSpec
from runtime import (
    EngineError,
    EngineLost,
    ErrorKind,
    Invocation,
    InvocationCancelled,
    ObjectStore,
    PoolClosedError,
    Result,
    WorkerLost,
)
from warmpool._book import Book, Clock, Entry
from warmpool._fair import Fairness, engine_priority
from warmpool._metrics import ModelMetrics
from warmpool._procs import pid_alive as pid_alive  # re-exported: tests and hosts import it here
from warmpool._replica import (
    EngineFactory,
    ModelPool,
    Replica,
    ReplicaState,
    default_engine_factory,
)
from warmpool._runner import Dispatch
from warmpool.local import _lifecycle
from warmpool.local._pool_views import PoolViews
from warmpool.local._tenants import TenantWorkers, WorkerSets
from warmpool.local._worker import Partial
from warmpool.local._workers import WorkerProc
from warmpool.weights import WeightsCache

log = logging.getLogger("faas.pool")

__all__ = ["Clock", "Pool", "Work", "pid_alive"]


@dataclass(eq=False)
class Work(Entry):
    """One invocation as the local pool tracks it: the book's entry plus its routing.

    Attributes:
        worker: The worker process running it, once dispatched.
        replica: The engine replica whose slot it holds, once dispatched.
        queue_seconds: Arrival-to-dispatch seconds.
        engine: The replica's engine description, for the Result.
    """

    worker: WorkerProc | None = None
    replica: Replica | None = None
    queue_seconds: float | None = None
    engine: dict[str, Any] | None = None


class Pool(PoolViews):
    """An in-process warm pool.

    Args:
        store: The object store workers load function artifacts from.
        workers: Number of worker processes.
        threads_per_worker: Invocations one worker runs at once.
        engine_factory: Builds the engine host for a model spec.
        clock: Monotonic clock (injectable: tests drive scaling with a fake one
            and call :meth:`tick`).
        log_dir: Where engine logs go (a temp dir per replica by default).
        answer_dir: Where CPU engines keep their answer journals, a directory per model
            version, so a retried invocation's answered engine request is not run again,
            even by the engine of a restarted pool (None: no journal).
        tick_interval: Seconds between background :meth:`tick` calls; None
            disables the background thread (tests call ``tick`` themselves).
        health_interval: Seconds between HTTP health probes of ready replicas.
        status_interval: Seconds between status snapshots written to the store
            (read by ``faas pool status``); None disables them.
        fairness: How tenants share each model's slots: ``vtc`` (weighted Virtual
            Token Counter, see :mod:`warmpool._fair`) or ``fcfs`` (arrival order).
        weights_cache: Where ``weights_uri`` models are staged (default: ``$FAAS_WEIGHTS_CACHE``).
        tenant_workers: Run each tenant's invocations only in worker processes of
            that tenant, with its own user, environment and resource limits (see
            :class:`warmpool.local.TenantWorkers`; a dict is validated into one).
            None: every invocation shares the ``workers`` processes.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        workers: int = 2,
        threads_per_worker: int = 64,
        engine_factory: EngineFactory = default_engine_factory,
        clock: Clock = time.monotonic,
        log_dir: Path | None = None,
        answer_dir: Path | None = None,
        tick_interval: float | None = 0.1,
        health_interval: float = 2.0,
        status_interval: float | None = 2.0,
        fairness: Fairness = "vtc",
        weights_cache: WeightsCache | None = None,
        tenant_workers: TenantWorkers | dict[str, Any] | None = None,
    ) -> None:
        if workers < 1 or threads_per_worker < 1:
            raise ValueError("A pool needs at least one worker with at least one thread.")
        self.store = store
        self.id = f"{socket.gethostname()}-{os.getpid()}-{id(self) & 0xFFFF:04x}"
        self._engine_factory = engine_factory
        self._clock = clock
        self._log_dir = log_dir
        self._answer_dir = answer_dir
        self._tick_interval = tick_interval
        self._health_interval = health_interval
        self._status_interval = status_interval
        self._fairness = fairness
        self._weights_cache = weights_cache
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        if isinstance(tenant_workers, dict):
            tenant_workers = TenantWorkers.model_validate(tenant_workers)
        if tenant_workers is not None:
            tenant_workers.check()  # mapped users exist and can be switched to, before anything starts
        self._workers = WorkerSets(
            store.config(),
            workers,
            threads_per_worker,
            self._lock,
            self._on_result,
            self._on_worker_exit,
            self._on_partial,
            tenant_workers,
            clock,
        )
        self._partials: dict[str, Callable[[int, Any], None]] = {}  # invocation id -> its listener
        self._models: dict[str, ModelPool] = {}
        self._book: Book[Work] = Book(self._lock, clock, self._metrics_of)
        self._works = self._book.works  # the book's record, read by the lifecycle helpers
        self._closed = False
        self._stopping = threading.Event()
        self._started = False
        self.counters = self._book.counters
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------
    def start(self, models: list[ModelSpec] | None = None) -> Pool:
        """Spawn the workers, the engines of models with ``min_replicas >= 1``; pre-stage weights.

        Models with ``prestage=True`` are staged into the node's cache in the background.
        """
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down.")
            if not self._started:
                self._started = True
                self._workers.start()
                if self._tick_interval is not None:
                    self._background(self._monitor_loop, "faas-pool-monitor")
                    self._background(functools.partial(_lifecycle.probe_loop, self), "faas-pool-probe")
            pools = [self._model_pool(spec) for spec in models or []]
        for mp in pools:
            _lifecycle.start_model(self, mp)
        return self

    def _background(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left, stop workers and engines, and reap every child."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            leftovers = self._book.unfinished()
            replicas = [r for mp in self._models.values() for r in mp.replicas]
            self._wake.notify_all()
        for work in leftovers:
            self._book.fail(work, PoolClosedError("The pool shut down first."), "cancelled", self._settle)
        self._workers.shutdown(timeout)
        for r in replicas:
            r.host.stop()
            r.state = ReplicaState.STOPPED
            r.ready_event.set()
        for thread in self._threads:
            thread.join(timeout)
        if self._status_interval is not None:
            with contextlib.suppress(Exception):
                self.store.delete(f"pools/{self.id}/status.json")

    # -- public API ------------------------------------------------------------
    def submit(
        self,
        invocation: Invocation,
        spec: FunctionSpec,
        model: ModelSpec | None,
        on_done: Callable[[Result], None],
        on_partial: Callable[[int, Any], None] | None = None,
    ) -> None:
        """Queue an invocation; ``on_done`` receives its final Result exactly once.

        ``on_partial(attempt, value)`` receives its partial outputs (``runtime.emit_partial``)
        as the worker sends them, all before ``on_done``.

        Raises:
            PoolClosedError: The pool is shut down.
            BackPressureError: The model's queue is full; nothing was queued.
        """
        work = Work(invocation, spec, model, on_done, submitted=self._clock())
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down; no new invocations are accepted.")
            if not self._started:
                self.start()
            broken = self._workers.start_error(invocation.tenant)
            mp = self._model_pool(model) if model is not None and broken is None else None
            if mp is not None:
                work.cold = not mp.admit(work)  # raises BackPressureError before anything is recorded
            self._book.open(work)
            if on_partial is not None:
                self._partials[invocation.id] = on_partial
            if work.deadline is not None:
                self._wake.notify()
        if broken is not None:  # fails at once, before any engine starts for it
            self._finish(work, None, broken, "worker_lost")
        elif mp is None:
            self._dispatch(work, None)
        else:
            _lifecycle.apply_plan(self, mp)
            self._pump(mp)

    def set_fairness(self, fairness: Fairness) -> None:
        """Admit every model's waiting invocations by ``fairness`` from now on (``vtc`` or ``fcfs``).

        Tenants' counters carry on; the fairness benchmark switches policies
        between its phases to compare them on one engine.

        Raises:
            ValueError: An unknown policy.
        """
        if fairness not in ("vtc", "fcfs"):
            raise ValueError(f"Unknown fairness policy {fairness!r}; expected 'vtc' or 'fcfs'.")
        with self._lock:
            self._fairness = fairness
            for mp in self._models.values():
                mp.queue.fairness = fairness

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation: it finishes as cancelled and its engine requests are aborted."""
        with self._lock:
            work = self._book.get(invocation_id)
            if work is None:
                return False
            worker = work.worker
            attempt = work.invocation.attempt
        self._finish(work, None, InvocationCancelled("The invocation was cancelled."), "cancelled")
        if worker is not None:
            self._workers.abandon(worker, invocation_id, attempt)
        return True

    def state(self, invocation_id: str) -> str | None:
        """``waiting_for_engine``, ``queued`` or ``running``; None once finished or unknown."""
        with self._lock:
            work = self._book.get(invocation_id)
            if work is None:
                return None
            if work.worker is not None:
                return "running"
            mp = self._models.get(work.model.ref) if work.model else None
            if mp is not None and not any(r.state is ReplicaState.READY for r in mp.replicas):
                return "waiting_for_engine"
            return "queued"

    def prefer_warm(self, spec: ModelSpec) -> ModelSpec:
        """Choose the version an alias-resolved invocation runs on during a version move.

        When ``spec`` (the version an alias now names) has no ready replica
        here but another version of the same model does, start ``spec``'s
        replica and keep sending traffic to the warm version until it is ready:
        the new replica comes up before traffic moves. Pinned references
        (``name@version``) never come through here.
        """
        with self._lock:
            if not self._started:
                self.start()
            target = self._model_pool(spec)
            if any(r.state is ReplicaState.READY for r in target.replicas):
                return spec
            warm = [
                mp.spec
                for ref, mp in self._models.items()
                if mp.spec.name == spec.name and ref != spec.ref
                and any(r.state is ReplicaState.READY for r in mp.replicas)
            ]  # fmt: skip
            if not warm:
                return spec
            launch = not target.has_capacity_soon()
            if launch:
                target.launching += 1
        if launch:
            _lifecycle.launch(self, target)
        return warm[0]

    def engine_url(self, model: ModelSpec, timeout: float | None = None) -> str:
        """Ensure a ready replica of ``model`` and return its URL (blocks during a cold start)."""
        wait = timeout or model.startup_timeout + 5
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                if not self._started:
                    self.start()
                mp = self._model_pool(model)
                ready = [r for r in mp.replicas if r.state is ReplicaState.READY]
                if ready:
                    return str(ready[0].url)
                live = [r for r in mp.replicas if r.live]
                mine = not live and not mp.launching
                if mine:
                    mp.launching += 1
            if live or mine:
                break
            if time.monotonic() > deadline:
                raise EngineError(f"No replica of {model.ref} was launched in time.")
            time.sleep(0.02)  # another thread is building this model's engine host
        replica = live[0] if live else _lifecycle.launch(self, mp)
        if replica is None or not replica.ready_event.wait(max(0.0, deadline - time.monotonic())):
            raise EngineError(f"No replica of {model.ref} became ready in time.")
        if replica.state is not ReplicaState.READY or replica.url is None:
            raise EngineError(f"The engine of {model.ref} failed to start: {replica.error}")
        return replica.url

    def tick(self) -> None:
        """One pass of housekeeping: expire deadlines, notice dead engines, scale."""
        with self._lock:
            if self._closed:
                return
        expired = self._book.due()
        self._workers.tick()  # tenants' idle workers
        with self._lock:
            dead = [
                (mp, r)
                for mp in self._models.values()
                for r in mp.replicas
                if r.state is ReplicaState.READY and not r.host.alive()
            ]
            pools = list(self._models.values())
        for work in expired:
            self._expire(work)
        for mp, replica in dead:
            _lifecycle.fail_replica(self, mp, replica, f"engine process {replica.host.pid} exited")
        for mp in pools:
            _lifecycle.apply_plan(self, mp)
            self._pump(mp)

    # -- routing -----------------------------------------------------------------
    def _model_pool(self, spec: ModelSpec) -> ModelPool:
        mp = self._models.get(spec.ref)
        if mp is None:
            cache = self.weights_cache if spec.weights_uri else None
            mp = self._models[spec.ref] = ModelPool(spec, self._clock, self._fairness, cache)
        return mp

    def _pump(self, mp: ModelPool) -> None:
        """Dispatch queued invocations while a ready replica has a free slot."""
        while True:
            with self._lock:
                if self._closed:
                    return
                nxt = mp.next_dispatch()
                if nxt is None:
                    return
                work, replica = nxt
                work.replica = replica
                work.queue_seconds = self._clock() - work.submitted
                work.engine = replica.engine_info()
            self._dispatch(work, replica)

    def _dispatch(self, work: Work, replica: Replica | None) -> None:
        with self._lock:
            if work.finished:
                return
            tenant = work.invocation.tenant
            worker = self._workers.pick(tenant)
            if worker is not None:
                worker.inflight[work.invocation.id] = work
                work.worker = worker
            broken = self._workers.start_error(tenant)
        if worker is None:
            assert broken is not None
            self._finish(work, None, broken, "worker_lost")
            return
        worker.send(
            Dispatch(
                invocation=work.invocation,
                engine_url=replica.url if replica else None,
                model_name=work.model.ref if work.model else None,
                model_param=work.spec.model_param,
                model_param_index=work.spec.model_param_index,
                model_modes=frozenset(work.model.modes) if work.model else None,
                engine_priority=engine_priority(work.invocation, work.model),
            )
        )  # a dead worker's reader thread retries or fails this work

    def _monitor_loop(self) -> None:
        assert self._tick_interval is not None
        while True:
            self.tick()
            with self._lock:
                if self._closed:
                    return
                self._wake.wait(self._tick_interval)

    # -- completion ------------------------------------------------------------
    def _on_result(self, worker: WorkerProc, result: Result) -> None:
        with self._lock:
            work = worker.inflight.get(result.invocation_id)
            if work is None or work.invocation.attempt != result.attempt:
                return  # a late answer for an attempt that was timed out, cancelled or retried
            del worker.inflight[result.invocation_id]
            work.worker = None
        if result.error is not None and result.error.type_name.endswith(".ResourceLimitError"):
            self._workers.after_limit(worker, result.error)
        if result.error is not None and result.error.kind == "engine_lost" and work.replica is not None:
            mp = self._models[work.replica.spec.ref]
            replica = work.replica
            # A killed engine can still look alive for a moment; a retry sent to it
            # would be lost again, so check that it answers before retrying anywhere.
            if replica.state is ReplicaState.READY and not _lifecycle.responds(replica):
                _lifecycle.fail_replica(
                    self, mp, replica, f"engine process {replica.host.pid} stopped answering"
                )
                if work.finished or work.replica is None:
                    return
            self._lost(work, EngineLost(result.error.message), "engine_lost", attempt=result.attempt)
            return
        self._finish(work, result)

    def _on_partial(self, worker: WorkerProc, partial: Partial) -> None:
        with self._lock:
            work = worker.inflight.get(partial.invocation_id)
            if work is None or work.invocation.attempt != partial.attempt:
                return  # from an attempt the pool no longer waits for
            listener = self._partials.get(partial.invocation_id)
        if listener is not None:
            try:
                listener(partial.attempt, partial.value)
            except Exception:
                log.exception("A partial-output listener failed for invocation %s", partial.invocation_id)

    def _on_worker_exit(self, worker: WorkerProc, lost: list[Work]) -> None:
        if self._closed:
            return
        if not worker.retiring:
            with self._lock:
                self.counters["workers_lost"] += 1
        exc = WorkerLost(
            f"The worker process running this invocation (pid {worker.pid}) "
            f"died (exit code {worker.exitcode})."
        )
        for work, attempt in [(w, w.invocation.attempt) for w in lost]:
            # Work sent to a worker that never started never ran: send it again
            # without spending a retry (a worker set that cannot start fails it).
            self._lost(work, exc, "worker_lost", charge=worker.ready, attempt=attempt)
        with self._lock:
            key = self._workers.key(worker.tenant)
            broken = self._workers.start_error(worker.tenant)
            pending = [
                w for w in self._book.unfinished()
                if w.worker is None and self._workers.key(w.invocation.tenant) == key
            ]  # fmt: skip
        if broken is not None:
            for work in pending:  # queued for an engine: no worker could ever run it
                self._finish(work, None, broken, "worker_lost")

    def _lost(
        self, work: Work, exc: Exception, kind: ErrorKind, *, charge: bool = True, attempt: int | None = None
    ) -> None:
        """Retry an invocation lost through no fault of its own, or fail it.

        ``charge=False`` sends it again as the same attempt, outside its retry budget.
        ``attempt``: the attempt that was lost; if the invocation has moved past it (the
        replica's failure and its worker's engine-lost answer both report one loss), this
        report is stale and does nothing: retrying twice queued one attempt twice.
        """
        with self._lock:
            if work.finished or (attempt is not None and work.invocation.attempt != attempt):
                return
            self._detach(work)
            retry = self._book.retry(work) if charge else not work.finished
            if retry and work.model is not None:
                self._models[work.model.ref].queue.push(work, front=True)  # retries go first, never refused
        if not retry:
            self._finish(work, None, exc, kind)
        elif work.model is None:
            self._dispatch(work, None)
        else:
            mp = self._models[work.model.ref]
            _lifecycle.apply_plan(self, mp)
            self._pump(mp)

    def _detach(self, work: Work) -> None:
        """Release a work's worker and replica slots (caller holds the lock)."""
        if work.worker is not None and work.worker.inflight.get(work.invocation.id) is work:
            del work.worker.inflight[work.invocation.id]
        work.worker = None
        if work.replica is not None:
            self._models[work.replica.spec.ref].release(work.replica)
            work.replica = None

    def _expire(self, work: Work) -> None:
        with self._lock:
            worker = work.worker
            attempt = work.invocation.attempt
        if self._book.expire(work, self._settle):
            self._pump_for(work)
        if worker is not None:
            self._workers.abandon(worker, work.invocation.id, attempt)

    def _metrics_of(self, work: Work) -> ModelMetrics | None:
        mp = self._models.get(work.model.ref) if work.model else None
        return mp.metrics if mp is not None else None

    def _settle(self, work: Work, result: Result) -> None:
        """Release the work's slots and fill in what only the pool knows (under the lock)."""
        self._partials.pop(work.invocation.id, None)
        if work.replica is not None and work.cold:
            result.cold_start_seconds = work.replica.cold_start_s
        mp = self._models.get(work.model.ref) if work.model else None
        if mp is not None:
            mp.queue.complete(work, result)  # charge the tenant what the engine reports
        self._detach(work)
        if result.queue_seconds is None:
            result.queue_seconds = work.queue_seconds
        if result.engine is None:
            result.engine = work.engine

    def _pump_for(self, work: Work) -> None:
        mp = self._models.get(work.model.ref) if work.model else None
        if mp is not None:
            self._pump(mp)  # the finished work freed a slot

    def _finish(
        self,
        work: Work,
        result: Result | None,
        exc: BaseException | None = None,
        kind: ErrorKind = "system",
    ) -> None:
        """Finish ``work`` once: with ``result``, or with a failure made from ``exc``."""
        if result is not None:
            finished = self._book.finish(work, result, self._settle)
        else:
            assert exc is not None
            finished = self._book.fail(work, exc, kind, self._settle)
        if finished:
            self._pump_for(work)
