"""Start and stop the CPU engine as a real server process, for tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


@dataclass
class EngineProc:
    proc: subprocess.Popen[bytes]
    url: str
    port_file: Path
    log: Path


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` with a deadline (short waits between polls, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start(model: Path, tmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Launch ``python -m warmpool.cpu_engine`` writing its port to ``tmp/port``."""
    log = (tmp / "engine.log").open("wb")
    argv = [sys.executable, "-m", "warmpool.cpu_engine", "--model-path", str(model)]
    argv += ["--port", "0", "--port-file", str(tmp / "port"), *extra]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait (SIGKILL after 20 s); returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


@contextmanager
def running_engine(model: Path, tmp: Path, *extra: str) -> Iterator[EngineProc]:
    """A healthy engine for the block; on exit it must stop cleanly with no traceback logged."""
    proc = start(model, tmp, *extra)
    port_file, log = tmp / "port", tmp / "engine.log"
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, START_TIMEOUT_S, "the port file")
        assert proc.poll() is None, log.read_text()
        url = f"http://127.0.0.1:{int(port_file.read_text())}"

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, START_TIMEOUT_S, "/health")
        yield EngineProc(proc, url, port_file, log)
    finally:
        code = stop(proc)
    text = log.read_text()
    # Uvicorn shuts down gracefully, then re-raises SIGTERM: -15 is the clean exit here.
    assert code in (0, -signal.SIGTERM), text
    assert "cpu engine stopped" in text and "Traceback" not in text, text
