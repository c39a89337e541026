"""The ``globus-compute`` substrate: warm pools on Globus Compute engines.

:class:`GlobusComputePool` satisfies :class:`warmpool._substrate.Substrate`. Each
model version gets its own GlobusComputeEngine (:class:`ModelEngine`), created
on first use, or at :meth:`~GlobusComputePool.start` for models with
``min_replicas >= 1``; functions without a model share one more engine whose
blocks start no engine. A block is an engine host: its node-local engine is up
before its workers take tasks, and every worker on the node is a thin client
of it. Invocations are Globus Compute tasks. The pool sends a model's engine
only as many as its blocks can run at once (``max_inflight`` per ready block,
plus one block's worth while another block may still start, so the scaler sees
the demand); the rest wait here in the model's fair queue (the same
:class:`~warmpool._fair.FairQueue` the local pool uses: weighted VTC across
tenants, interactive before batch), not in the interchange's arrival order.

- Timeouts are enforced here, from submission; the task also gets the
  deadline and returns at it (aborting its engine requests), freeing its worker.
- Cancellation is best effort: the invocation finishes as cancelled at once; a
  task already handed to the executor still runs, and its answer is dropped.
- An invocation lost with its worker or block, or to an engine that died under
  it, is sent again within its ``retries`` (after an engine death, once that
  engine's block is seen down). A block whose engine failed to start is a failed
  replica (with the log tail); that model's waiting invocations fail with its error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry import FunctionSpec, ModelSpec
from runtime import (
    BackPressureError,
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
from warmpool._book import Book, Entry
from warmpool._fair import Fairness, FairQueue, engine_priority
from warmpool._metrics import ModelMetrics
from warmpool._replica import Replica, ReplicaState
from warmpool._runner import Dispatch
from warmpool.globus_compute._engine import (
    BlockTaskError,
    ModelEngine,
    ProviderFactory,
    import_path,
    local_provider,
    probe,
)

log = logging.getLogger("faas.pool")

_NO_MODEL = "-"  # key of the engine that runs functions without a model
_SENDING = object()  # GceWork.future between leaving the fair queue and the executor's answer
_HOLD_MAX_S = 10.0  # longest an engine-lost retry waits for its dead engine's block to be seen down


@dataclass(eq=False)
class GceWork(Entry):
    """One invocation in flight on a Globus Compute engine: the book's entry and its task."""

    future: Any = None


class GlobusComputePool:
    """A warm pool whose engines and workers run as Globus Compute engine blocks.

    Args:
        store: The object store functions and staged values live in.
        run_dir: Where engines keep block status files, submit scripts and logs
            (default: a new temporary directory, removed by nobody: it holds the logs).
        workers_per_node: HTEX workers per block of a model (default: the model's
            ``max_inflight``); each runs one invocation at a time against the engine.
        workers: HTEX workers per block of the engine for functions without a model.
        provider_factory: Builds each engine's Parsl provider from the model spec
            (default: LocalProvider); block counts and the launcher are set by the pool.
        engine_factory: Builds the engine host on the node: a ``module:function``
            string, or a module-level function (passed by its import path).
        address: Address workers reach the interchange on (None: every address of this host).
        strategy_period: Seconds between scaler runs (short, so a cold start does not wait).
        failed_block_linger: Seconds a block whose engine failed keeps answering with
            that error before it exits (a later invocation then gets a fresh block).
        heartbeat_period: Seconds between worker pool heartbeats.
        heartbeat_threshold: Seconds without heartbeats before a block's tasks count as lost.
        monitor_interval: Seconds between checks of deadlines and block status files.
        status_interval: Seconds between status snapshots written to the store; None: none.
        engine_options: Extra GlobusComputeEngine keyword arguments.
        threads_per_worker: Accepted for the local pool's signature; an HTEX worker
            runs one task at a time, so concurrency comes from ``workers_per_node``.
        log_dir: Used as ``run_dir`` when that is not given.
        fairness: How tenants share each model's slots: ``vtc`` (weighted Virtual
            Token Counter) or ``fcfs`` (arrival order); see :mod:`warmpool._fair`.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        run_dir: Path | str | None = None,
        workers_per_node: int | None = None,
        workers: int = 2,
        provider_factory: ProviderFactory = local_provider,
        engine_factory: str | Callable[..., Any] = "warmpool:default_engine_factory",
        address: str | None = None,
        strategy_period: float = 0.5,
        failed_block_linger: float = 30.0,
        heartbeat_period: int = 5,
        heartbeat_threshold: int = 20,
        monitor_interval: float = 0.25,
        status_interval: float | None = 2.0,
        engine_options: dict[str, Any] | None = None,
        threads_per_worker: int = 1,
        log_dir: Path | None = None,
        fairness: Fairness = "vtc",
    ) -> None:
        if workers < 1 or (workers_per_node is not None and workers_per_node < 1):
            raise ValueError("A Globus Compute pool needs at least one worker per block.")
        self.store = store
        self.id = f"{socket.gethostname()}-{os.getpid()}-gce-{id(self) & 0xFFFF:04x}"
        self.run_dir = Path(run_dir or log_dir or tempfile.mkdtemp(prefix="faas-gce-"))
        self._workers_per_node = workers_per_node
        self._workers = workers
        self._provider_factory = provider_factory
        self._engine_factory = import_path(engine_factory)
        self._engine_kw: dict[str, Any] = {
            "address": address,
            "strategy_period": strategy_period,
            "failed_block_linger": failed_block_linger,
            "heartbeat_period": heartbeat_period,
            "heartbeat_threshold": heartbeat_threshold,
            "engine_options": engine_options,
        }
        self._monitor_interval = monitor_interval
        self._status_interval = status_interval
        self._lock = threading.RLock()
        self._engines: dict[str, ModelEngine] = {}
        self._engine_locks: dict[str, threading.Lock] = {}
        self._metrics: dict[str, ModelMetrics] = {}
        self._specs: dict[str, ModelSpec] = {}
        self._fairness: Fairness = fairness
        self._queues: dict[str, FairQueue[GceWork]] = {}  # per model: invocations not sent yet
        self._sent: dict[str, int] = {}  # per model: tasks sent whose answer has not come back
        self._book: Book[GceWork] = Book(self._lock, time.monotonic, self._metrics_of)
        self._works = self._book.works
        self._failed_seen: set[str] = set()
        self._held: list[tuple[GceWork, str, float]] = []  # engine-lost retries: (work, dead URL, since)
        self._ready_seen: set[str] = set()
        self._closed = False
        self._started = False
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.counters = self._book.counters

    # -- lifecycle -----------------------------------------------------------
    def start(self, models: list[ModelSpec] | None = None) -> GlobusComputePool:
        """Start the monitor, and the engines of models with ``min_replicas >= 1``."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down.")
            if not self._started:
                self._started = True
                self._monitor = threading.Thread(
                    target=self._monitor_loop, name="faas-gce-monitor", daemon=True
                )
                self._monitor.start()
        for spec in models or []:
            if spec.min_replicas >= 1:
                self._engine(spec)
        return self

    def __enter__(self) -> GlobusComputePool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left, scale every block in (stopping its engine) and reap what remains."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            leftovers = self._book.unfinished()
            engines = list(self._engines.values())
        for work in leftovers:
            self._book.fail(work, PoolClosedError("The pool shut down first."), "cancelled", self._settle)
        for engine in engines:
            engine.shutdown(timeout)
        if self._monitor is not None:
            self._monitor.join(timeout)
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
        on_partial: Callable[[int, Any], None] | None = None,  # no channel back: never called
    ) -> None:
        """Send an invocation to its model's engine; ``on_done`` receives its final Result once.

        Raises:
            PoolClosedError: The pool is shut down.
            BackPressureError: The model has ``max_queue`` invocations waiting; nothing was sent.
        """
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down; no new invocations are accepted.")
        if not self._started:
            self.start()
        engine = self._engine(model)
        key = model.ref if model else _NO_MODEL
        now = time.monotonic()
        work = GceWork(invocation, spec, model, on_done, submitted=now)
        with self._lock:
            metrics = self._metrics[key]
            if model is not None:
                inflight = sum(1 for w in self._works.values() if w.model is not None and w.model.ref == key)
                if inflight >= model.max_queue + model.max_inflight * model.max_replicas:
                    metrics.rejected += 1
                    raise BackPressureError(
                        f"The queue of model {key} is full ({inflight} invocations in flight); "
                        "nothing was submitted. Retry later or raise max_queue/max_replicas."
                    )
                work.cold = not any(r.state is ReplicaState.READY for r in engine.replicas())
                metrics.warm_hits += 0 if work.cold else 1
            metrics.submitted += 1
            self._book.open(work)
            if model is not None:
                self._queue(key).push(work)
        if model is None:
            self._send(work, engine)
        else:
            self._pump(key, engine)

    def cancel(self, invocation_id: str) -> bool:
        """Finish an invocation as cancelled; a task already sent runs on and is ignored."""
        work = self._book.get(invocation_id)
        if work is None:
            return False
        exc = InvocationCancelled("The invocation was cancelled.")
        return self._book.fail(work, exc, "cancelled", self._settle)

    def state(self, invocation_id: str) -> str | None:
        """``waiting_for_engine`` until the model has a ready block, then ``queued`` or ``running``."""
        with self._lock:
            work = self._book.get(invocation_id)
            if work is None:
                return None
            engine = self._engines.get(work.model.ref if work.model else _NO_MODEL)
            sent = work.future is not None
        if (
            work.model is not None
            and engine is not None
            and not any(r.state is ReplicaState.READY for r in engine.replicas())
        ):
            return "waiting_for_engine"
        return "running" if sent or work.model is None else "queued"

    def prefer_warm(self, spec: ModelSpec) -> ModelSpec:
        """Keep an alias's traffic on a warm version while the new version's block starts."""
        if self._ready(spec):
            return spec
        with self._lock:
            warm = [s for ref, s in self._specs.items() if s.name == spec.name and ref != spec.ref]
        warm = [s for s in warm if self._ready(s)]
        if not warm:
            return spec
        engine = self._engine(spec)
        if not any(r.live for r in engine.replicas()):
            engine.submit(probe())  # an outstanding task makes the scaler start a block
        return warm[0]

    def engine_url(self, model: ModelSpec, timeout: float | None = None) -> str:
        """Ensure a block of ``model`` runs with its engine ready; return the engine's URL.

        Raises:
            EngineError: The engine failed to start, or was not ready within ``timeout``
                (default: the model's ``startup_timeout`` plus a minute for the block).
        """
        engine = self._engine(model)
        ready = [r for r in engine.replicas() if r.state is ReplicaState.READY and r.url]
        if ready:
            return str(ready[0].url)
        wait = timeout or model.startup_timeout + 60
        future = engine.submit(probe())  # the probe task runs in a block of this engine
        try:
            return str(engine.unpack(future.result(timeout=wait)))
        except TimeoutError:
            raise EngineError(f"No engine of {model.ref} became ready within {wait:.0f} s.") from None
        except BlockTaskError as exc:
            failed = [r.error for r in engine.replicas() if r.state is ReplicaState.FAILED and r.error]
            raise EngineError(failed[-1] if failed else f"The engine of {model.ref} failed: {exc}") from None

    def replicas(self, model: str | None = None) -> list[Replica]:
        """Engine replicas (one per block and node), including stopped and failed ones."""
        with self._lock:
            engines = [(ref, e) for ref, e in self._engines.items() if model in (None, ref)]
        return [r for _, e in engines for r in e.replicas()]

    def block_pids(self) -> list[int]:
        """Process ids of every block's wrapper, worker pool and engine on this host."""
        with self._lock:
            engines = list(self._engines.values())
        return [p for e in engines for p in e.block_pids()]

    def status(self) -> dict[str, Any]:
        """Models (in flight, replicas, metrics, settings), counters, as a JSON-able dict."""
        self._watch_blocks()  # count blocks that came up since the monitor's last pass
        with self._lock:
            engines = dict(self._engines)
            works = list(self._works.values())
            counters = dict(self.counters)
            fairness = {ref: q.describe() for ref, q in self._queues.items()}
        models: dict[str, Any] = {}
        for ref, engine in engines.items():
            if engine.spec is not None:
                mine = [w for w in works if w.model is not None and w.model.ref == ref]
                queued = sum(1 for w in mine if w.future is None)  # in the fair queue, or held
                sent = len(mine) - queued
                models[ref] = engine.describe(queued, sent, fairness.get(ref), self._metrics[ref])
        return {"pool": self.id, "substrate": "globus-compute", "time": time.time(), "counters": counters,
                "models": models, "workers": []}  # fmt: skip

    # -- engines -----------------------------------------------------------------
    def _engine(self, spec: ModelSpec | None) -> ModelEngine:
        key = spec.ref if spec is not None else _NO_MODEL
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                return engine
            lock = self._engine_locks.setdefault(key, threading.Lock())
        with lock:  # one engine per model, built outside the pool lock (starting it takes a moment)
            with self._lock:
                if self._closed:
                    raise PoolClosedError("The pool has been shut down.")
                engine = self._engines.get(key)
            if engine is not None:
                return engine
            name = key.replace("@", "-").replace("/", "-")
            workers = self._workers if spec is None else (self._workers_per_node or spec.max_inflight)
            engine = ModelEngine(
                spec,
                self.run_dir / name,
                workers_per_node=workers,
                provider_factory=self._provider_factory,
                engine_factory=self._engine_factory,
                **self._engine_kw,
            )
            engine.start()
            with self._lock:
                self._engines[key] = engine
                self._metrics[key] = ModelMetrics()
                if spec is not None:
                    self._specs[key] = spec
            return engine

    def _ready(self, spec: ModelSpec) -> bool:
        with self._lock:
            engine = self._engines.get(spec.ref)
        return engine is not None and any(r.state is ReplicaState.READY for r in engine.replicas())

    # -- fair queue -------------------------------------------------------------------
    def _queue(self, key: str) -> FairQueue[GceWork]:
        """The model's fair queue (caller holds the lock)."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = FairQueue(self._fairness)
            self._sent[key] = 0
        return queue

    def _capacity(self, spec: ModelSpec, engine: ModelEngine) -> int:
        """Tasks the model's engine may hold: its ready blocks' slots, and one block more while one may start.

        A block runs ``max_inflight`` at once (fewer if it has fewer workers). The extra
        block's worth waits in the interchange, where the scaler sees it and starts a
        block (from zero, or out to ``max_replicas``).
        """
        ready = sum(1 for r in engine.replicas() if r.state is ReplicaState.READY)
        per_block = min(spec.max_inflight, engine.workers_per_node)
        return per_block * min(spec.max_replicas, ready + 1)

    def _pump(self, key: str, engine: ModelEngine | None = None) -> None:
        """Send the model's queued invocations, fairest first, while its engine has room."""
        with self._lock:
            engine = engine or self._engines.get(key)
            spec = self._specs.get(key)
        if engine is None or spec is None:
            return
        capacity = self._capacity(spec, engine)
        batch: list[GceWork] = []
        with self._lock:
            if self._closed:
                return
            queue = self._queue(key)
            while self._sent[key] < capacity:
                work = queue.pop()
                if work is None:
                    break
                self._sent[key] += 1
                work.future = _SENDING  # counts as sent from here on (state, status)
                batch.append(work)
        for work in batch:
            self._send(work, engine)

    def _pump_all(self) -> None:
        with self._lock:
            keys = [k for k, q in self._queues.items() if q.waiting()]
        for key in keys:
            self._pump(key)

    def _task_done(self, work: GceWork) -> None:
        """A sent task of a model came back (whatever its outcome): its slot is free again."""
        if work.model is None:
            return
        key = work.model.ref
        with self._lock:
            self._sent[key] = max(0, self._sent.get(key, 0) - 1)
        self._pump(key)

    def _settle(self, work: GceWork, result: Result) -> None:
        """Under the lock, once a finish is certain: cold start, and the tenant's charge."""
        if work.cold and result.engine and result.cold_start_seconds is None:
            result.cold_start_seconds = result.engine.get("cold_start_s")
        queue = self._queues.get(work.model.ref) if work.model is not None else None
        if queue is not None:
            queue.complete(work, result)

    # -- tasks ---------------------------------------------------------------------
    def _send(self, work: GceWork, engine: ModelEngine) -> None:
        inv = work.invocation
        deadline = None
        if work.deadline is not None:
            deadline = time.time() + (work.deadline - time.monotonic())
        dispatch = Dispatch(
            invocation=inv,
            model_name=work.model.ref if work.model else None,
            model_param=work.spec.model_param,
            model_param_index=work.spec.model_param_index,
            model_modes=frozenset(work.model.modes) if work.model else None,
            store=self.store.config() if inv.store is None else None,
            deadline=deadline,
            engine_priority=engine_priority(inv, work.model),
        )
        attempt = inv.attempt
        try:
            future = engine.submit(None, dispatch.model_dump_json())
        except Exception as exc:
            self._book.fail(
                work, WorkerLost(f"The Globus Compute engine refused the task: {exc}"), "system", self._settle
            )
            self._task_done(work)
            return
        work.future = future
        future.add_done_callback(lambda f: self._on_task_done(work, engine, attempt, f))

    def _on_task_done(self, work: GceWork, engine: ModelEngine, attempt: int, future: Any) -> None:
        try:
            self._answer(work, engine, attempt, future)
        finally:
            self._task_done(work)

    def _answer(self, work: GceWork, engine: ModelEngine, attempt: int, future: Any) -> None:
        if work.finished or work.invocation.attempt != attempt:
            return  # a late answer for an attempt that was timed out, cancelled or retried
        try:
            result = Result.model_validate_json(engine.unpack(future.result()))
        except BlockTaskError as exc:
            with self._lock:
                self.counters["workers_lost"] += 1
            self._lost(
                work,
                WorkerLost(f"The Globus Compute worker running this invocation was lost: {exc}"),
                "worker_lost",
            )
            return
        except Exception as exc:
            self._book.fail(work, exc, "system", self._settle)
            return
        error = result.error
        if error is not None and error.kind == "engine_lost" and error.type_name.endswith("EngineLost"):
            self._lost(work, EngineLost(error.message), "engine_lost", (result.engine or {}).get("url"))
            return
        self._book.finish(work, result, self._settle)

    def _lost(self, work: GceWork, exc: Exception, kind: ErrorKind, dead_url: str | None = None) -> None:
        """Send an invocation lost through no fault of its own again, or fail it.

        A retry after its engine died (``dead_url``) is held until that engine's block is
        seen down: until then the block's idle workers would take it and fail it at once,
        spending the whole retry budget in a second.
        """
        with self._lock:
            if work.finished or self._closed:
                return
            retry = self._book.retry(work)
            if retry and work.model is not None:
                work.future = None
                if dead_url:
                    self._held.append((work, dead_url, time.monotonic()))
                else:
                    self._queue(work.model.ref).push(work, front=True)  # retries go first
        if not retry:
            self._book.fail(work, exc, kind, self._settle)
        elif work.model is None:
            self._send(work, self._engine(None))
        # a model's retry is sent by the pump that follows this task's answer (_task_done)

    def _metrics_of(self, work: GceWork) -> ModelMetrics | None:
        return self._metrics.get(work.model.ref if work.model else _NO_MODEL)

    # -- monitor -------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        last_status = 0.0
        while not self._stopping.wait(self._monitor_interval):
            try:
                self._expire()
                self._watch_blocks()
                self._release_held()
                self._pump_all()  # blocks that became ready have room for queued invocations
                if (
                    self._status_interval is not None
                    and time.monotonic() - last_status >= self._status_interval
                ):
                    last_status = time.monotonic()
                    self.store.put(
                        f"pools/{self.id}/status.json", json.dumps(self.status(), default=str).encode()
                    )
            except Exception:  # the monitor must outlive one bad pass
                log.exception("Globus Compute pool monitor pass failed")

    def _expire(self) -> None:
        for work in self._book.due():
            self._book.expire(work, self._settle)

    def _release_held(self) -> None:
        """Queue the engine-lost retries whose dead engine no longer has a ready block."""
        now = time.monotonic()
        with self._lock:  # (held is empty but after an engine death: no block files read then)
            held, self._held = self._held, []
            for work, url, since in held:
                engine = self._engines.get(work.model.ref) if work.model is not None else None
                if work.finished or engine is None:
                    continue
                if engine.serves(url) and now - since < _HOLD_MAX_S:
                    self._held.append((work, url, since))
                else:
                    self._queue(engine.spec.ref if engine.spec else _NO_MODEL).push(work, front=True)

    def _watch_blocks(self) -> None:
        with self._lock:
            engines = [(ref, e) for ref, e in self._engines.items() if e.spec is not None]
        for ref, engine in engines:
            replicas = engine.replicas()
            metrics = self._metrics[ref]
            newly_failed: list[Replica] = []
            with self._lock:  # the monitor and status() both count; once per block
                for r in replicas:
                    name = f"{ref}/{r.id}"
                    if r.ready_at is not None and name not in self._ready_seen:
                        self._ready_seen.add(name)
                        metrics.cold_starts += 1
                        if r.cold_start_s is not None:
                            metrics.cold_start_seconds.add(r.cold_start_s)
                    if r.state is ReplicaState.FAILED and name not in self._failed_seen:
                        self._failed_seen.add(name)
                        metrics.engine_failures += 1
                        newly_failed.append(r)
            # An engine that died while serving (it was ready once) is replaced by a new block, and
            # its lost tasks are retried; only one that failed to start fails the waiting ones.
            start_failures = [r for r in newly_failed if r.ready_at is None]
            if start_failures and not any(r.state is ReplicaState.READY for r in replicas):
                error = EngineError(start_failures[-1].error or f"The engine of {ref} failed to start.")
                with self._lock:
                    waiting = [w for w in self._works.values() if w.model is not None and w.model.ref == ref]
                for work in waiting:  # nothing ready will serve them: fail rather than hang
                    self._book.fail(work, error, "engine_lost", self._settle)
