"""Shared pieces of the trigger tests: functions, a drop/duplicate source, polling with a deadline."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import faas
from faas.triggers import ObjectEvent, SqsSource, TriggerRunner
from tests._s3_servers import S3Server

EXEC_LOG_ENV = "FAAS_TRIGGER_EXEC_LOG"
ROOT = Path(__file__).resolve().parents[2]


def log_execution(path: str | None, line: str) -> None:
    """Append one line with O_APPEND (atomic for short lines, across processes)."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@faas.function(timeout=60)
def shout(ref: faas.ObjectRef) -> bytes:
    """Upper-case the object; count the execution in $FAAS_TRIGGER_EXEC_LOG."""
    data = ref.read_bytes()
    log_execution(os.environ.get(EXEC_LOG_ENV), f"{ref.bucket}/{ref.key}")
    return data.upper()


PACE_ENV = "FAAS_TRIGGER_PACE"


@faas.function(timeout=60)
def paced_shout(ref: faas.ObjectRef) -> bytes:
    """:func:`shout`, taking $FAAS_TRIGGER_PACE seconds (so a kill finds some in flight).

    The execution is counted when it starts, so one cut off by a kill counts too.
    """
    log_execution(os.environ.get(EXEC_LOG_ENV), f"{ref.bucket}/{ref.key}")
    data = ref.read_bytes()
    time.sleep(float(os.environ.get(PACE_ENV) or 0))  # the workload's duration, not synchronisation
    return data.upper()


GATE_ENV = "FAAS_TRIGGER_GATE"
TAG_ENV = "FAAS_TRIGGER_TAG"


@faas.function(timeout=120)
def gated_shout(ref: faas.ObjectRef) -> bytes:
    """:func:`shout` that logs ``start <tag> <bucket>/<key>`` and ``end <tag> <bucket>/<key>``.

    Between the two it waits until the file $FAAS_TRIGGER_GATE exists (when set),
    so a test can kill its runner while the invocation is held between the two.
    The tag is $FAAS_TRIGGER_TAG (which runner process ran it).
    """
    path, tag, where = os.environ.get(EXEC_LOG_ENV), os.environ.get(TAG_ENV, "-"), f"{ref.bucket}/{ref.key}"
    log_execution(path, f"start {tag} {where}")
    gate = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + 100.0
    while gate and not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {gate} never opened")
        time.sleep(0.02)  # polling the gate, which the test opens (or never does)
    data = ref.read_bytes()
    log_execution(path, f"end {tag} {where}")
    return data.upper()


def phases(path: Path) -> list[tuple[str, str, str]]:
    """The ``(phase, tag, bucket/key)`` lines that :func:`gated_shout` logged."""
    out = []
    for line in executions(path):
        phase, tag, where = line.split(" ", 2)
        out.append((phase, tag, where))
    return out


def executions(path: Path) -> list[str]:
    """The keys logged by executions, one per execution."""
    return path.read_text().splitlines() if path.exists() else []


def drive(runner: TriggerRunner, done: Callable[[], bool], timeout: float, what: str) -> None:
    """Run passes until ``done()`` or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s: {runner.metrics_all()}")
        runner.run_once()


def wait_for(done: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``done()`` until it holds, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)  # polling interval, not synchronisation: done() decides


class DropAndDuplicate:
    """Wraps an SqsSource: loses the notifications of chosen keys, delivers every other one twice.

    A lost notification is deleted from the queue unprocessed. Every other one
    is delivered again at least ``redeliver_after`` seconds later (by then the
    first copy has usually been processed), without its receipt, as SQS does
    after a redrive. Redelivering from memory rather than through the queue
    keeps moto's queue, which slows down with its length, short.
    """

    def __init__(self, inner: SqsSource, drop: Callable[[str], bool], redeliver_after: float = 0.5) -> None:
        self.inner, self.drop, self.name = inner, drop, f"flaky:{inner.name}"
        self.redeliver_after = redeliver_after
        self._later: list[tuple[float, ObjectEvent]] = []
        self.dropped: set[str] = set()
        self.delivered: list[str] = []

    def poll(self, wait: float) -> list[ObjectEvent]:
        now = time.monotonic()
        due = [ev for t, ev in self._later if t <= now]
        self._later = [(t, ev) for t, ev in self._later if t > now]
        out = list(due)
        for ev in self.inner.poll(0.0 if due else wait):
            if self.drop(ev.key):
                self.dropped.add(ev.key)
                self.inner.ack([ev])
                continue
            self._later.append((now + self.redeliver_after, dataclasses.replace(ev, receipt=None)))
            out.append(ev)
        self.delivered += [ev.key for ev in out]
        return out

    def pending(self) -> int:
        return len(self._later)

    def ack(self, events: Sequence[ObjectEvent]) -> None:
        self.inner.ack(events)

    def close(self) -> None:
        self.inner.close()


def count_keys(store: Any, prefix: str) -> int:
    """How many keys a store holds under ``prefix``."""
    return sum(1 for _ in store.list(prefix))


def spawn_runner(
    store_url: str, binding: str, env: dict[str, str], log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """Start :mod:`tests.faas._trigger_child` (``args``: function name, runner id) in its own session."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faas._trigger_child", store_url, binding, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("ab"), start_new_session=True,
    )  # fmt: skip


def await_ready(proc: subprocess.Popen[bytes], log: Path) -> subprocess.Popen[bytes]:
    """Wait for a spawned runner's ``ready`` (its first pass is done)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the first pass is done (or the child dies)
    assert line.strip() == b"ready", f"the runner did not start:\n{log.read_text()[-3000:]}"
    return proc


def start_runner(
    store_url: str, binding: str, env: dict[str, str], log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """:func:`spawn_runner`, then :func:`await_ready`."""
    return await_ready(spawn_runner(store_url, binding, env, log, *args), log)


def kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a spawned runner and its pool's worker processes; reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)  # the runner and its pool's worker processes
    proc.wait(timeout=30)


@pytest.fixture
def s3_env(seaweedfs_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """SeaweedFS's credentials in the environment (runners and pool workers inherit them), no gate."""
    for name, value in {**seaweedfs_server.env(), "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(GATE_ENV, raising=False)
    monkeypatch.delenv(TAG_ENV, raising=False)
    yield dict(os.environ)
