"""A worker that dies idle wedges its HTEX worker pool; the block wrapper restarts the pool.

An HTEX worker waits for tasks inside ``multiprocessing.Queue.get``, which holds
the queue's read lock while it waits. A worker SIGKILLed there (an idle worker:
the OOM killer, an operator's ``kill -9``) takes the lock with it: Parsl starts a
new worker, but no worker of that pool can read a task again, and the block
silently stops taking work while the interchange keeps sending it tasks. A
worker running a task holds no lock, and Parsl reports its task as lost.

So every task marks its worker busy for as long as it runs (an empty file named
by the worker's pid in ``$FAAS_BLOCK_BUSY_DIR``), and the block wrapper restarts
the worker pool -- not the engine -- when one of the pool's processes disappears
without such a mark. The tasks the old pool held come back as lost (after the
interchange's heartbeat threshold) and are retried by the pool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from warmpool._procs import pid_alive

BUSY_DIR_ENV = "FAAS_BLOCK_BUSY_DIR"


@contextlib.contextmanager
def busy(env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """Mark this worker busy while the block holds it (no-op outside a block)."""
    where = env.get(BUSY_DIR_ENV)
    mark = Path(where) / str(os.getpid()) if where else None
    try:
        if mark is not None:
            mark.touch()
    except OSError:
        mark = None
    try:
        yield
    finally:
        if mark is not None:
            with contextlib.suppress(OSError):
                mark.unlink()


def children(pid: int) -> set[int]:
    """The live children of ``pid``, whichever of its threads started them (from /proc)."""
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in listing.read_text().split())
    return found


class WorkerWatch:
    """Tells which processes of one worker pool disappeared while not busy.

    Args:
        pool_pid: The worker pool's process (its children: workers, and the
            multiprocessing manager whose loss breaks the pool as well).
        busy_dir: Where tasks mark their worker busy.
    """

    def __init__(self, pool_pid: int, busy_dir: Path) -> None:
        self._pool_pid = pool_pid
        self._busy_dir = busy_dir
        self._seen = children(pool_pid)

    def idle_deaths(self) -> list[int]:
        """The pids gone since the last call that were not running a task.

        A pid that left the listing but is still alive is forgotten (it was skipped or
        re-parented, not killed): a restart of the whole pool must not rest on it.
        """
        now = children(self._pool_pid)
        gone, self._seen = self._seen - now, now
        idle = []
        for pid in sorted(p for p in gone if not pid_alive(p)):  # the listing may skip a live child
            mark = self._busy_dir / str(pid)
            if mark.exists():
                with contextlib.suppress(OSError):
                    mark.unlink()  # it died busy: Parsl reports its task; nothing is wedged
            else:
                idle.append(pid)
        return idle
