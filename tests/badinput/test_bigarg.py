"""A 2 GiB argument: staged to the store by reference, never held in memory twice.

Each case runs ``tests/badinput/_bigarg_child.py`` in a fresh process: it makes one
``bytes`` or ``bytearray`` value and calls a function with it, through the embedded
client (on a file store or SeaweedFS) or the remote client of a real ``faas serve``.
The peak RSS (``VmHWM``, reset before the value is made) of the calling process and
of the worker that ran the function may grow by the value once (it has to be there),
never by two copies: under 1.5x its size. The service, which the value never passes
through, grows by a small fraction of it. 256 MiB runs every time; 2 GiB runs for
``bytes`` through SeaweedFS by default (about 15 s) and for the rest with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._s3_servers import S3Server, aws_env
from tests.faas._service_proc import TOKENS, ServiceProc

MiB = 1 << 20
CHILD_TIMEOUT_S = 600
SLOW = pytest.mark.slow


def run_child(kind: str, mib: int, where: str, **env: str) -> dict[str, Any]:
    """The numbers of one call with a ``kind`` value of ``mib`` MiB (``where``: a store or service URL)."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tests.badinput._bigarg_child", kind, str(mib), where],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    numbers: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    numbers["process_seconds"] = round(time.monotonic() - start, 1)
    via = "service" if where.startswith("http") else "s3" if where.startswith("s3") else "file store"
    print(f"\n{kind} {mib} MiB via the {via}: {numbers}")  # the measurements, with -s
    return numbers


def assert_held_once(numbers: dict[str, Any], kind: str, mib: int) -> None:
    """The function got the whole value, and neither side held it twice."""
    size = mib * MiB
    assert (numbers["type"], numbers["received"], numbers["ends"]) == (kind, size, "0707"), numbers
    assert numbers["same_worker"], "the baseline was taken on another worker"
    for side in ("client_growth", "worker_growth"):
        # At least the value itself (the measurement sees it), less than two copies of it.
        assert 0.95 * size <= numbers[side] < 1.5 * size, (side, numbers[side] / size, numbers)


def sizes(default_2gib: bool) -> list[Any]:
    big = pytest.param(2048, id="2GiB") if default_2gib else pytest.param(2048, id="2GiB", marks=SLOW)
    return [pytest.param(256, id="256MiB"), big]


@pytest.mark.parametrize("mib", sizes(default_2gib=False))
@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_large_argument_on_a_file_store_is_staged_once(tmp_path: Path, kind: str, mib: int) -> None:
    assert_held_once(run_child(kind, mib, str(tmp_path / "store")), kind, mib)


@pytest.mark.parametrize(
    ("kind", "mib"),
    [("bytes", 256), ("bytearray", 256), ("bytes", 2048), pytest.param("bytearray", 2048, marks=SLOW)],
    ids=["bytes-256MiB", "bytearray-256MiB", "bytes-2GiB", "bytearray-2GiB"],
)
def test_large_argument_on_seaweedfs_is_staged_once(
    seaweedfs_server: S3Server, tmp_path: Path, kind: str, mib: int
) -> None:
    with aws_env(seaweedfs_server, tmp_path):
        url = seaweedfs_server.store_url(seaweedfs_server.new_bucket("bigarg"), "bigarg")
        numbers = run_child(kind, mib, url)
    assert_held_once(numbers, kind, mib)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = ServiceProc(tmp_path_factory.mktemp("bigarg-svc")).start(timeout=120)
    yield proc
    proc.stop()


def service_peak(service: ServiceProc, *, reset: bool = False) -> int:
    """The service process's peak RSS in bytes (``reset``: first bring it down to its RSS now)."""
    assert service.proc is not None
    if reset:
        Path(f"/proc/{service.proc.pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


@pytest.mark.parametrize("mib", sizes(default_2gib=False))
@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_large_argument_through_the_service_is_staged_by_the_client(
    service: ServiceProc, kind: str, mib: int
) -> None:
    """The remote client stages the value in the tenant's store itself; the service sees a reference."""
    before = service_peak(service, reset=True)
    numbers = run_child(kind, mib, service.url, FAAS_TOKEN=TOKENS["alice"])
    assert_held_once(numbers, kind, mib)
    grew = service_peak(service) - before
    assert grew < 0.1 * mib * MiB, f"the service grew by {grew} bytes for a {mib} MiB argument"
