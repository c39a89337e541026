"""The in-process warm pool: resident engine replicas and long-lived workers.

The pool owns three kinds of child processes: engine replicas (one process
group each), worker processes (spawned, each running many invocations in
threads), and nothing else. It dispatches an invocation to the worker with the
fewest in-flight invocations once the invocation's model has a ready replica,
enforces timeouts from the outside, retries invocations lost with a dead
worker, and on shutdown leaves no child process behind.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from registry._specs import FunctionSpec, ModelSpec
from runtime._errors import EngineError, InvocationTimeout, PoolClosedError, WorkerLost
from runtime._execute import error_info
from runtime._store import ObjectStore
from runtime._wire import Invocation, Result
from warmpool._replica import (
    EngineFactory,
    Replica,
    ReplicaState,
    default_engine_factory,
    new_log_dir,
)
from warmpool._worker import Abort, Dispatch, worker_main

log = logging.getLogger("faas.pool")

Clock = Callable[[], float]


@dataclass(eq=False)
class Work:
    """One invocation as the pool tracks it.

    Attributes:
        invocation: The invocation (its ``attempt`` grows on retry).
        spec: The function spec it runs.
        model: The resolved model version, if the function has one.
        on_done: Called exactly once with the final Result.
    """

    invocation: Invocation
    spec: FunctionSpec
    model: ModelSpec | None
    on_done: Callable[[Result], None]
    submitted: float = 0.0
    deadline: float | None = None
    worker: _Worker | None = None
    replica: Replica | None = None
    finished: bool = False


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    inflight: dict[str, Work] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: int = 0
    retiring: bool = False
    reader: threading.Thread | None = None


class Pool:
    """An in-process warm pool.

    Args:
        store: The object store workers load function artifacts from.
        workers: Number of worker processes.
        threads_per_worker: Invocations one worker runs at once.
        engine_factory: Builds the engine host for a model spec.
        clock: Monotonic clock (injectable for tests).
        log_dir: Where engine logs go (a temp dir per replica by default).
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
    ) -> None:
        if workers < 1 or threads_per_worker < 1:
            raise ValueError("A pool needs at least one worker with at least one thread.")
        self.store = store
        self._n_workers = workers
        self._threads = threads_per_worker
        self._engine_factory = engine_factory
        self._clock = clock
        self._log_dir = log_dir
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._next_worker_index = 0
        self._replicas: dict[str, Replica] = {}
        self._pending: dict[str, list[Work]] = {}
        self._works: dict[str, Work] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._started = False
        self.metrics: dict[str, float] = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "retried": 0,
            "timeouts": 0,
            "workers_lost": 0,
            "cold_starts": 0,
            "cold_start_seconds": 0.0,
            "warm_hits": 0,
        }
        self._monitor = threading.Thread(target=self._monitor_loop, name="faas-pool-monitor", daemon=True)

    # -- lifecycle -----------------------------------------------------------
    def start(self, models: list[ModelSpec] | None = None) -> Pool:
        """Spawn the workers and the engines of models with ``min_replicas >= 1``."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down.")
            if self._started:
                return self
            self._started = True
            for _ in range(self._n_workers):
                self._spawn_worker()
            self._monitor.start()
        for spec in models or []:
            if spec.min_replicas >= 1:
                self._replica_for(spec)
        return self

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
            leftovers = [w for w in self._works.values() if not w.finished]
            workers = list(self._workers)
            replicas = list(self._replicas.values())
            self._wake.notify_all()
        for work in leftovers:
            self._finish(
                work,
                self._failure(work, PoolClosedError("The pool shut down before it finished."), "cancelled"),
            )
        for w in workers:
            with contextlib.suppress(OSError, ValueError), w.send_lock:
                w.conn.send(None)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            with contextlib.suppress(OSError):
                w.conn.close()
        for r in replicas:
            r.host.stop()
            r.state = ReplicaState.STOPPED
        if self._monitor.is_alive():
            self._monitor.join(timeout)

    # -- public API ------------------------------------------------------------
    def submit(
        self,
        invocation: Invocation,
        spec: FunctionSpec,
        model: ModelSpec | None,
        on_done: Callable[[Result], None],
    ) -> None:
        """Queue an invocation; ``on_done`` receives its final Result exactly once.

        Raises:
            PoolClosedError: The pool is shut down.
        """
        work = Work(invocation, spec, model, on_done, submitted=self._clock())
        with self._lock:
            if self._closed:
                raise PoolClosedError("The pool has been shut down; no new invocations are accepted.")
            if not self._started:
                self.start()
            self.metrics["submitted"] += 1
            self._works[invocation.id] = work
            if invocation.timeout is not None:
                work.deadline = work.submitted + invocation.timeout
                heapq.heappush(self._deadlines, (work.deadline, invocation.id))
                self._wake.notify()
        self._route(work)

    def cancel(self, invocation_id: str) -> bool:
        """Stop an invocation: it finishes as cancelled and its engine requests are aborted."""
        from runtime._errors import InvocationCancelled

        with self._lock:
            work = self._works.get(invocation_id)
            if work is None or work.finished:
                return False
        self._finish(
            work,
            self._failure(work, InvocationCancelled("The invocation was cancelled."), "cancelled"),
        )
        return True

    def engine_url(self, model: ModelSpec, timeout: float | None = None) -> str:
        """Ensure a ready replica of ``model`` and return its URL (blocks during a cold start)."""
        replica = self._replica_for(model)
        if not replica.ready_event.wait(timeout or model.startup_timeout + 5):
            raise EngineError(f"No replica of {model.ref} became ready in time.")
        if replica.state is not ReplicaState.READY or replica.url is None:
            raise EngineError(f"The engine of {model.ref} failed to start: {replica.error}")
        return replica.url

    def replicas(self) -> list[Replica]:
        """The current replicas."""
        with self._lock:
            return list(self._replicas.values())

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid]

    def status(self) -> dict[str, Any]:
        """Metrics, replicas and workers as a JSON-able dict."""
        with self._lock:
            return {
                "metrics": dict(self.metrics),
                "inflight": sum(len(w.inflight) for w in self._workers),
                "queued": sum(len(v) for v in self._pending.values()),
                "replicas": [r.describe() for r in self._replicas.values()],
                "workers": [
                    {"pid": w.process.pid, "inflight": len(w.inflight), "abandoned": w.abandoned}
                    for w in self._workers
                ],
            }

    # -- routing -----------------------------------------------------------------
    def _route(self, work: Work) -> None:
        if work.model is None:
            self._dispatch(work)
            return
        replica = self._replica_for(work.model)
        with self._lock:
            if replica.state is ReplicaState.STARTING:
                self._pending.setdefault(work.model.ref, []).append(work)
                return
            if replica.state is ReplicaState.READY:
                self.metrics["warm_hits"] += 1
        if replica.state is ReplicaState.READY:
            work.replica = replica
            self._dispatch(work)
        else:
            self._finish(
                work,
                self._failure(
                    work,
                    EngineError(f"The engine of {work.model.ref} is not available: {replica.error}"),
                    "engine_lost",
                ),
            )

    def _replica_for(self, spec: ModelSpec) -> Replica:
        with self._lock:
            replica = self._replicas.get(spec.ref)
            if replica is not None and replica.state in (ReplicaState.STARTING, ReplicaState.READY):
                return replica
            host = self._engine_factory(spec, self._log_dir or new_log_dir())
            replica = Replica(spec=spec, host=host, created_at=self._clock())
            self._replicas[spec.ref] = replica
        threading.Thread(
            target=self._start_replica, args=(replica,), name=f"faas-start-{spec.ref}", daemon=True
        ).start()
        return replica

    def _start_replica(self, replica: Replica) -> None:
        try:
            replica.host.start()
            replica.host.wait_ready(replica.spec.startup_timeout)
        except Exception as exc:
            log.error("Engine for %s failed to start: %s", replica.spec.ref, exc)
            replica.host.stop()
            with self._lock:
                replica.state = ReplicaState.FAILED
                replica.error = str(exc)
                waiting = self._pending.pop(replica.spec.ref, [])
            replica.ready_event.set()
            for work in waiting:
                self._finish(
                    work,
                    self._failure(
                        work,
                        EngineError(f"The engine of {replica.spec.ref} failed to start: {exc}"),
                        "engine_lost",
                    ),
                )
            return
        with self._lock:
            now = self._clock()
            replica.ready_at = now
            replica.cold_start_s = now - replica.created_at
            self.metrics["cold_starts"] += 1
            self.metrics["cold_start_seconds"] += replica.cold_start_s
            if self._closed:
                replica.host.stop()
                replica.state = ReplicaState.STOPPED
                replica.ready_event.set()
                return
            replica.state = ReplicaState.READY
            waiting = self._pending.pop(replica.spec.ref, [])
        replica.ready_event.set()
        for work in waiting:
            work.replica = replica
            self._dispatch(work)

    def _dispatch(self, work: Work) -> None:
        with self._lock:
            if work.finished:
                return
            candidates = [w for w in self._workers if not w.retiring and w.process.is_alive()]
            if not candidates:
                candidates = [self._spawn_worker()]
            worker = min(candidates, key=lambda w: len(w.inflight))
            worker.inflight[work.invocation.id] = work
            work.worker = worker
            if work.replica is not None:
                work.replica.inflight += 1
        msg = Dispatch(
            invocation=work.invocation,
            engine_url=work.replica.url if work.replica else None,
            model_name=work.model.ref if work.model else None,
            model_param=work.spec.model_param,
            model_param_index=work.spec.model_param_index,
        )
        try:
            with worker.send_lock:
                worker.conn.send(msg)
        except (OSError, ValueError):
            pass  # the worker died; its reader thread retries or fails this work

    # -- workers -----------------------------------------------------------------
    def _spawn_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self.store.config(), self._threads),
            name=f"faas-worker-{self._next_worker_index}",
            daemon=True,
        )
        proc.start()
        child.close()
        worker = _Worker(index=self._next_worker_index, process=proc, conn=parent)
        self._next_worker_index += 1
        self._workers.append(worker)
        worker.reader = threading.Thread(
            target=self._reader_loop,
            args=(worker,),
            name=f"faas-reader-{worker.index}",
            daemon=True,
        )
        worker.reader.start()
        return worker

    def _reader_loop(self, worker: _Worker) -> None:
        while True:
            try:
                result: Result = worker.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                work = worker.inflight.pop(result.invocation_id, None)
            if work is not None:
                self._finish(work, result)
        self._worker_gone(worker)

    def _worker_gone(self, worker: _Worker) -> None:
        worker.process.join(5)
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            lost = list(worker.inflight.values())
            worker.inflight.clear()
            if self._closed:
                return
            if not worker.retiring:
                self.metrics["workers_lost"] += 1
                log.warning(
                    "Worker %s (pid %s) died with %d invocations",
                    worker.index,
                    worker.process.pid,
                    len(lost),
                )
            if len([w for w in self._workers if not w.retiring]) < self._n_workers:
                self._spawn_worker()
        for work in lost:
            self._lost(
                work,
                WorkerLost(
                    f"The worker process running this invocation (pid {worker.process.pid}) "
                    f"died (exit code {worker.process.exitcode})."
                ),
                "worker_lost",
            )

    def _lost(self, work: Work, exc: Exception, kind: str) -> None:
        """Retry an invocation lost through no fault of its own, or fail it."""
        with self._lock:
            if work.replica is not None:
                work.replica.inflight -= 1
                work.replica = None
        if work.finished:
            return
        if work.invocation.attempt < work.invocation.retries:
            with self._lock:
                self.metrics["retried"] += 1
            work.invocation = work.invocation.model_copy(update={"attempt": work.invocation.attempt + 1})
            work.worker = None
            work.replica = None
            self._route(work)
        else:
            self._finish(work, self._failure(work, exc, kind))

    # -- completion ------------------------------------------------------------
    def _failure(self, work: Work, exc: Exception, kind: str) -> Result:
        return Result(
            invocation_id=work.invocation.id,
            error=error_info(exc, kind, with_traceback=False),  # type: ignore[arg-type]
            attempt=work.invocation.attempt,
            finished_at=time.time(),
        )

    def _finish(self, work: Work, result: Result) -> None:
        with self._lock:
            if work.finished:
                return
            work.finished = True
            self._works.pop(work.invocation.id, None)
            if work.worker is not None:
                work.worker.inflight.pop(work.invocation.id, None)
            if work.replica is not None:
                work.replica.inflight -= 1
            self.metrics["completed" if result.ok else "failed"] += 1
        try:
            work.on_done(result)
        except Exception:
            log.exception("on_done callback for %s raised", work.invocation.id)

    def _monitor_loop(self) -> None:
        """Fail invocations past their deadline and recycle workers full of stuck threads."""
        while True:
            expired: list[Work] = []
            with self._lock:
                if self._closed:
                    return
                now = self._clock()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, inv_id = heapq.heappop(self._deadlines)
                    work = self._works.get(inv_id)
                    if work is not None and not work.finished:
                        expired.append(work)
                wait = min(self._deadlines[0][0] - now, 0.5) if self._deadlines else 0.5
            for work in expired:
                self._expire(work)
            with self._lock:
                if self._closed:
                    return
                self._wake.wait(max(wait, 0.005))

    def _expire(self, work: Work) -> None:
        worker = work.worker
        timeout = work.invocation.timeout
        self._finish(
            work,
            self._failure(
                work,
                InvocationTimeout(
                    f"The invocation of {work.spec.name!r} ran past its timeout of {timeout} s."
                ),
                "timeout",
            ),
        )
        with self._lock:
            self.metrics["timeouts"] += 1
        if worker is None:
            return
        with contextlib.suppress(OSError, ValueError), worker.send_lock:
            worker.conn.send(Abort(work.invocation.id))
        with self._lock:
            worker.abandoned += 1
            # A thread stuck in user code cannot be killed; once half a worker's
            # threads are stuck, replace the worker after its live work drains.
            if worker.abandoned * 2 >= self._threads and not worker.retiring:
                worker.retiring = True
                self._spawn_worker()
                threading.Thread(target=self._retire, args=(worker,), daemon=True).start()

    def _retire(self, worker: _Worker) -> None:
        deadline = time.monotonic() + 600
        while worker.inflight and time.monotonic() < deadline and not self._closed:
            time.sleep(0.1)  # polling a drain, not synchronisation
        with contextlib.suppress(OSError, ValueError), worker.send_lock:
            worker.conn.send(None)
        worker.process.join(5)
        if worker.process.is_alive():
            worker.process.kill()


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (and is not a zombie we own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
