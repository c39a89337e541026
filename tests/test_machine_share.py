"""The suite's readers-writer lock: a quiet test excludes the other process's tests and is not starved."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

from tests._machine_share import machine_share
from tests._wait import wait_for


def free(path: Path, op: int) -> bool:
    """Whether ``op`` on ``path`` would be granted now (a new open file conflicts as another process's)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, op | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_ordinary_tests_share_and_a_quiet_one_is_alone(tmp_path: Path) -> None:
    room = tmp_path / "machine-share.room"
    with machine_share(tmp_path, exclusive=False):
        assert free(room, fcntl.LOCK_SH) and not free(room, fcntl.LOCK_EX)
    with machine_share(tmp_path, exclusive=True):
        assert not free(room, fcntl.LOCK_SH)
    assert free(room, fcntl.LOCK_EX)


def test_a_waiting_quiet_test_holds_the_gate_so_ordinary_tests_queue_behind_it(tmp_path: Path) -> None:
    gate, room = tmp_path / "machine-share.gate", tmp_path / "machine-share.room"
    ran = threading.Event()

    def quiet() -> None:
        with machine_share(tmp_path, exclusive=True):
            ran.set()

    with machine_share(tmp_path, exclusive=False):
        writer = threading.Thread(target=quiet)
        writer.start()
        # It waits for the room holding the gate: an ordinary test, which passes the
        # gate first, cannot slip in ahead of it while this one is still running.
        wait_for(lambda: not free(gate, fcntl.LOCK_EX), 10, "the quiet test to hold the gate")
        assert not ran.is_set()
    assert ran.wait(10)
    writer.join(10)
    assert free(gate, fcntl.LOCK_EX) and free(room, fcntl.LOCK_EX)
