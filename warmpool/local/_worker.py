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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from warmpool._runner import Abort, Dispatch, Runner

__all__ = ["Abort", "Dispatch", "Partial", "Ready", "Start", "serve", "worker_main"]


@dataclass(frozen=True)
class Start:
    """The first message to a new worker: what it serves.

    Attributes:
        store_config: ``ObjectStore.config()`` of the pool's store.
        threads: Invocations it runs at once.
    """

    store_config: dict[str, Any]
    threads: int


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
    worker_main(conn, start.store_config, start.threads)


def worker_main(conn: Connection, store_config: dict[str, Any], threads: int) -> None:
    """Open the store, say :class:`Ready`, then run invocations until told to exit; never returns."""
    # The one worker-side execution, shared with Globus Compute workers; the pool's
    # store is the fallback for invocations that name none of their own.
    runner = Runner(store_config)
    runner.open_store(store_config)  # fail before Ready if the store cannot be opened
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                os._exit(0)  # parent is gone

    def run(msg: Dispatch) -> None:
        inv = msg.invocation
        send(runner.run(msg, on_partial=lambda value: send(Partial(inv.id, inv.attempt, value))))

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
            pool.submit(run, msg)
    finally:
        # Threads stuck in user code (past their timeout) must not hold the exit.
        os._exit(0)
