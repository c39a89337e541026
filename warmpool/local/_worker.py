"""Worker processes: long-lived, each running many invocations at once in threads.

A function mostly waits on the engine, so one worker process runs up to
``threads`` invocations concurrently; their requests reach the engine together
and are batched there. The parent talks to a worker over one duplex connection
(a socketpair the worker inherits, see :mod:`warmpool.local.worker`):

- parent -> worker: :class:`Start` first, then :class:`~warmpool._runner.Dispatch`
  (run this), :class:`~warmpool._runner.Abort` (drop it), ``None`` (exit);
- worker -> parent: :class:`Ready` once it can run work, then :class:`runtime.Result`
  and, before an invocation's Result, its :class:`Partial` outputs.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from runtime import Result, error_info
from warmpool._runner import Abort, Dispatch, Runner
from warmpool.local._limits import CPU_CHECK_INTERVAL, WorkerLimits, classify, kill_strays, limit_error

__all__ = ["Abort", "Dispatch", "Partial", "Ready", "Start", "serve", "worker_main"]


@dataclass(frozen=True)
class Start:
    """The first message to a new worker: what it serves.

    Attributes:
        store_config: ``ObjectStore.config()`` of the pool's store.
        threads: Invocations it runs at once.
        limits: Resource limits it applies to itself before it says Ready (None: none).
    """

    store_config: dict[str, Any]
    threads: int
    limits: WorkerLimits | None = None


@dataclass(frozen=True)
class Ready:
    """The worker's first message: it imported everything and opened the store.

    Attributes:
        pid: The worker's process id.
    """

    pid: int


@dataclass(frozen=True)
class Partial:
    """A partial output of a running invocation (``runtime.emit_partial``), sent before its Result.

    Attributes:
        invocation_id: Whose it is.
        attempt: Which attempt made it (a retried invocation's earlier outputs are stale).
        value: The value.
    """

    invocation_id: str
    attempt: int
    value: Any


def serve(conn: Connection) -> None:
    """Run a worker on ``conn`` until told to exit or the parent is gone; never returns.

    Receives :class:`Start`, answers :class:`Ready`, then runs what it is sent.
    """
    try:
        start = conn.recv()
    except (EOFError, OSError):
        os._exit(0)  # the pool went away before we started
    if not isinstance(start, Start):
        raise TypeError(f"a worker's first message must be Start, not {type(start).__name__}")
    worker_main(conn, start.store_config, start.threads, start.limits)


def worker_main(
    conn: Connection, store_config: dict[str, Any], threads: int, limits: WorkerLimits | None = None
) -> None:
    """Open the store, say :class:`Ready`, then run invocations until told to exit; never returns."""
    # The one worker-side execution, shared with Globus Compute workers; the pool's
    # store is the fallback for invocations that name none of their own.
    runner = Runner(store_config)
    runner.open_store(store_config)  # fail before Ready if the store cannot be opened
    if limits is not None:
        limits.apply()  # before any user code runs
    send_lock = threading.Lock()
    me = os.getpid()
    running: dict[int, tuple[Dispatch, int, float]] = {}  # thread id -> (dispatch, cpu clock, start)
    running_lock = threading.Lock()

    def send(message: Any) -> None:
        if os.getpid() != me:
            os._exit(0)  # a process a function forked: never speak on the worker's socket
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                os._exit(0)  # parent is gone

    def run(msg: Dispatch) -> None:
        inv = msg.invocation
        ident = threading.get_ident()
        if limits is not None and limits.cpu_seconds is not None:
            clock = time.pthread_getcpuclockid(ident)
            with running_lock:
                running[ident] = (msg, clock, time.clock_gettime(clock))
        else:
            with running_lock:
                running[ident] = (msg, -1, 0.0)
        try:
            result = runner.run(msg, on_partial=lambda value: send(Partial(inv.id, inv.attempt, value)))
        finally:
            if os.getpid() != me:
                os._exit(0)  # a forked copy of this thread returned here
            with running_lock:
                running.pop(ident, None)
        if limits is not None:
            result = classify(result, limits)
            with running_lock:  # no invocation starts (and forks) while strays are killed
                if not running or _is_limit(result):
                    kill_strays()  # what its functions forked does not outlive them
        send(result)

    if limits is not None and limits.cpu_seconds is not None:
        _cpu_watchdog(limits, running, running_lock, send)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faas-inv")
    try:
        conn.send(Ready(os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the pool is gone: its end of the socket closed with it
            if msg is None:
                break
            if isinstance(msg, Abort):
                runner.abort(msg.invocation_id, msg.attempt)
                continue
            try:
                pool.submit(run, msg)
            except RuntimeError as exc:  # no thread for it: the process limit, most likely
                send(_cannot_start(msg, exc, limits))
    finally:
        # Threads stuck in user code (past their timeout) must not hold the exit.
        os._exit(0)


def _cannot_start(msg: Dispatch, exc: RuntimeError, limits: WorkerLimits | None) -> Result:
    """The Result of an invocation this worker has no thread for."""
    inv = msg.invocation
    error = error_info(exc, "system", with_traceback=False)
    if limits is not None and limits.processes is not None:
        error = error_info(limit_error("processes", limits, str(exc)), "user", with_traceback=False)
    return Result(
        invocation_id=inv.id, attempt=inv.attempt, worker_pid=os.getpid(), error=error,
        finished_at=time.time(),
    )  # fmt: skip


def _is_limit(result: Result) -> bool:
    return result.error is not None and result.error.type_name.endswith(".ResourceLimitError")


def _cpu_watchdog(
    limits: WorkerLimits,
    running: dict[int, tuple[Dispatch, int, float]],
    lock: threading.Lock,
    send: Any,
) -> None:
    """End an invocation whose thread used more than ``limits.cpu_seconds`` of CPU.

    A thread cannot be stopped: the worker answers that invocation with a
    ResourceLimitError, kills what its functions forked and exits; the pool
    starts another worker and treats its other invocations as lost with it.
    """
    assert limits.cpu_seconds is not None
    budget = limits.cpu_seconds

    def watch() -> None:
        while True:
            time.sleep(CPU_CHECK_INTERVAL)  # a periodic check, not synchronisation
            with lock:
                items = list(running.items())
            for ident, entry in items:
                msg, clock, start = entry
                try:
                    used = time.clock_gettime(clock) - start
                except OSError:
                    continue  # its thread ended meanwhile
                with lock:
                    if used <= budget or running.get(ident) is not entry:
                        continue  # within budget, or that invocation has ended since
                inv = msg.invocation
                exc = limit_error("cpu", limits, f"its thread used {used:.1f} CPU seconds")
                send(
                    Result(
                        invocation_id=inv.id, attempt=inv.attempt, worker_pid=os.getpid(),
                        error=error_info(exc, "user", with_traceback=False), finished_at=time.time(),
                    )
                )  # fmt: skip
                kill_strays()
                os._exit(3)

    threading.Thread(target=watch, name="faas-cpu-watchdog", daemon=True).start()
