"""The set of worker processes the pool dispatches to."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from runtime._wire import Result
from warmpool._worker import Abort, Dispatch, worker_main

if TYPE_CHECKING:
    from warmpool._pool import Work

log = logging.getLogger("faas.pool")


@dataclass(eq=False)
class WorkerProc:
    """One worker process and what it runs.

    Attributes:
        index: Sequence number (for names and logs).
        process: The multiprocessing process (spawn context).
        conn: The parent's end of the duplex pipe.
        inflight: Invocations sent to it and not yet answered, by id.
        abandoned: Invocations it still runs after they timed out or were cancelled.
        retiring: Takes no new work; stopped once its work drains.
    """

    index: int
    process: Any
    conn: Connection
    inflight: dict[str, Work] = field(default_factory=dict)
    abandoned: int = 0
    retiring: bool = False
    exited: bool = False  # set by the reader thread when the pipe closes (no waitpid per dispatch)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int | None:
        """The process id."""
        return int(self.process.pid) if self.process.pid else None

    def send(self, msg: Dispatch | Abort | None) -> bool:
        """Send a message; False if the pipe is closed (the worker died)."""
        try:
            with self.send_lock:
                self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False


class WorkerSet:
    """Spawns, feeds and replaces the pool's worker processes.

    Args:
        store_config: ``ObjectStore.config()`` the workers open.
        size: Worker processes to keep.
        threads: Invocations each worker runs at once.
        lock: The pool's lock, guarding every worker's ``inflight``.
        on_result: Called (without the lock) for every Result a worker sends.
        on_exit: Called (without the lock) when a worker process ends, with the
            invocations it still had.
    """

    def __init__(
        self,
        store_config: dict[str, Any],
        size: int,
        threads: int,
        lock: threading.RLock,
        on_result: Callable[[WorkerProc, Result], None],
        on_exit: Callable[[WorkerProc, list[Work]], None],
    ) -> None:
        self._store_config = store_config
        self.size = size
        self.threads = threads
        self._lock = lock
        self._on_result = on_result
        self._on_exit = on_exit
        self._ctx = multiprocessing.get_context("spawn")
        self._counter = 0
        self.workers: list[WorkerProc] = []
        self.closed = False

    def start(self) -> None:
        """Spawn the workers."""
        with self._lock:
            while len(self.active()) < self.size:
                self.spawn()

    def active(self) -> list[WorkerProc]:
        """Workers that accept new work."""
        return [w for w in self.workers if not w.retiring]

    def spawn(self) -> WorkerProc:
        """Start one worker process and its reader thread (caller holds the lock)."""
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self._store_config, self.threads),
            name=f"faas-worker-{self._counter}",
            daemon=True,
        )
        proc.start()
        child.close()
        worker = WorkerProc(index=self._counter, process=proc, conn=parent)
        self._counter += 1
        self.workers.append(worker)
        threading.Thread(
            target=self._read, args=(worker,), name=f"faas-reader-{worker.index}", daemon=True
        ).start()
        return worker

    def pick(self) -> WorkerProc:
        """The accepting worker with the fewest invocations in flight (caller holds the lock)."""
        candidates = [w for w in self.active() if not w.exited]
        if not candidates:
            candidates = [self.spawn()]
        return min(candidates, key=lambda w: len(w.inflight))

    def _read(self, worker: WorkerProc) -> None:
        while True:
            try:
                result: Result = worker.conn.recv()
            except (EOFError, OSError):
                break
            self._on_result(worker, result)
        worker.exited = True
        worker.process.join(5)
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)
            lost = list(worker.inflight.values())
            worker.inflight.clear()
            if not self.closed and not worker.retiring:
                log.warning(
                    "Worker %s (pid %s) exited with code %s holding %d invocations",
                    worker.index,
                    worker.pid,
                    worker.process.exitcode,
                    len(lost),
                )
            if not self.closed and len(self.active()) < self.size:
                self.spawn()
        self._on_exit(worker, lost)

    def abandon(self, worker: WorkerProc, invocation_id: str, attempt: int) -> None:
        """Tell a worker to drop an invocation attempt; recycle it once half its threads are stuck."""
        worker.send(Abort(invocation_id, attempt))
        with self._lock:
            worker.abandoned += 1
            # A thread stuck in user code cannot be killed; once half a worker's
            # threads are stuck, replace the worker after its live work drains.
            if worker.abandoned * 2 >= self.threads and not worker.retiring and not self.closed:
                worker.retiring = True
                self.spawn()
                threading.Thread(target=self._retire, args=(worker,), daemon=True).start()

    def _retire(self, worker: WorkerProc) -> None:
        deadline = time.monotonic() + 600
        while worker.inflight and time.monotonic() < deadline and not self.closed:
            time.sleep(0.1)  # polling a drain, not synchronisation
        worker.send(None)
        worker.process.join(5)
        if worker.process.is_alive():
            worker.process.kill()

    def shutdown(self, timeout: float) -> None:
        """Ask every worker to exit, then kill stragglers and reap them all."""
        with self._lock:
            self.closed = True
            workers = list(self.workers)
        for w in workers:
            w.send(None)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            with contextlib.suppress(OSError):
                w.conn.close()
