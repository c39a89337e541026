"""Quiet tests: the suite runs in two processes, and a test that compares latencies runs alone.

A test marked ``quiet`` compares one tenant's latency with and without another
tenant's attack; the suite's other pytest process (``-n 2``) is a third tenant
on the same two cores whose bursts (an engine starting, torch importing) land
on one window and not the other. While a quiet test runs, the other process
waits between its tests; its servers stay up, idle.

A readers-writer lock over two ``flock`` files shared by the run's processes:
every test holds ``room`` shared, a quiet test holds it exclusive. Both pass
through ``gate`` first, and a quiet test keeps ``gate`` while it waits for
``room``, so a stream of ordinary tests cannot starve it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def machine_share(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold this test's share of the machine: alone if ``exclusive``, beside others if not.

    Args:
        folder: Holds the lock files; the same for every process of one run.
        exclusive: Whether the test must run with the run's other processes waiting.
    """
    with open(folder / "machine-share.gate", "a") as gate, open(folder / "machine-share.room", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
