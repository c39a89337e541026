"""Workers that die while starting fail the pool fast, with their cause, and are not restarted in a loop.

The breakage is a real one users hit: a directory on the caller's ``sys.path``
holding a file named like a dependency (here ``cloudpickle.py``). The caller
imported the real module before the entry went in front, so only the workers,
which import with the caller's path, trip over it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import faas
from registry import Registry
from runtime import LocalStore
from runtime._errors import WorkerStartError
from tests.warmpool._pool_helpers import register, submit, wait_for
from warmpool import Pool

CAUSE = "shadowed cloudpickle: boom"


@faas.function(timeout=30)
def add(a: int, b: int) -> int:
    return a + b


@faas.function(model="tiny-llama", timeout=30)
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt).text


def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def shadowing_path(tmp_path: Path) -> Path:
    """A directory whose ``cloudpickle.py`` raises at import."""
    bad = tmp_path / "shadow"
    bad.mkdir()
    (bad / "cloudpickle.py").write_text(f"raise ImportError({CAUSE!r})\n")
    return bad


def test_broken_start_fails_calls_fast_with_the_cause(
    shadowing_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(shadowing_path))
    client = faas.Client(store=(tmp_path / "store").as_uri(), workers=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(faas.WorkerStartError) as info:
            add.with_client(client).remote(1, 2)
        elapsed = time.monotonic() - t0
        assert elapsed < 10, elapsed
        message = str(info.value)
        assert CAUSE in message and "exited with code 1 before it was ready" in message
        assert isinstance(info.value, faas.WorkerLost)
        # Later calls, with or without a model, fail at once: no worker and no engine is started.
        t1 = time.monotonic()
        for fn in (add.with_client(client).submit(2, 3), complete.with_client(client).submit("The")):
            with pytest.raises(faas.WorkerStartError, match=CAUSE):
                fn.result(timeout=10)
        assert time.monotonic() - t1 < 8  # at once: no start attempt (each would take seconds)
        assert client.pool.replicas() == []
        counters = client.pool.status()["counters"]
        assert counters["workers_started"] == 2  # the first two, never replaced
        assert counters["failed"] == 3
    finally:
        client.shutdown()


def test_start_failures_after_a_good_start_stop_after_three(
    shadowing_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(LocalStore(tmp_path / "store"))
    spec = register(registry, double)
    pool = Pool(registry.store, workers=1, tick_interval=None, status_interval=None).start()
    try:
        first = submit(pool, spec, 21).result(timeout=60)
        assert first.ok
        (pid,) = pool.worker_pids()
        # The environment breaks under a running pool: replacements cannot start.
        monkeypatch.syspath_prepend(str(shadowing_path))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid not in pool.worker_pids(), 10, "the pool to notice the dead worker")
        t0 = time.monotonic()
        result = submit(pool, spec, 1, retries=5).result(timeout=20)
        assert time.monotonic() - t0 < 10
        assert result.error is not None and result.error.kind == "worker_lost"
        assert result.error.type_name == f"{WorkerStartError.__module__}.WorkerStartError"
        assert CAUSE in result.error.message
        assert result.attempt == 0  # lost to workers that never started: no retry spent
        assert pool.status()["counters"]["workers_started"] == 1 + 3
    finally:
        pool.shutdown()
