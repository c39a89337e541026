"""An HTEX worker SIGKILLed while idle, on a real GlobusComputeEngine block with the CPU engine.

An idle HTEX worker waits inside ``multiprocessing.Queue.get`` holding the queue's
read lock; killed there, it wedges every worker of its pool. The block wrapper
restarts the worker pool (not the engine), and the invocations go on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore, Model, loads
from tests.warmpool._pool_helpers import register, submit, wait_for
from warmpool.globus_compute._pool import GlobusComputePool
from warmpool.globus_compute.block import block_dirs, read_status
from warmpool.local._pool import pid_alive

pytest.importorskip("globus_compute_endpoint")


def generate_pid(model: Model, prompt: str, meet: str | None = None, n: int = 0) -> int:
    """Two tokens from the block's engine; returns the worker's pid (after ``n`` workers meet in ``meet``)."""
    import os
    import time
    from pathlib import Path

    model.generate(prompt, {"max_new_tokens": 2, "temperature": 0})
    if meet:  # a rendezvous, so that n concurrent calls are known to hold n different workers
        Path(meet, str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(list(Path(meet).iterdir())) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    return os.getpid()


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[GlobusComputePool]:
    pool = GlobusComputePool(
        LocalStore(tmp_path / "store"),
        run_dir=tmp_path / "run",
        address="127.0.0.1",
        workers_per_node=2,
        heartbeat_period=1,
        heartbeat_threshold=4,  # the wedged pool's tasks come back lost soon
    ).start()
    yield pool
    pids = pool.block_pids()
    pool.shutdown()
    assert not [p for p in pids if pid_alive(p)], "a block process outlived the pool"


def block_status(run_dir: Path) -> dict[str, Any]:
    """The status of the one ready block, with its directory."""
    ready = [(d, s) for d in block_dirs(run_dir) if (s := read_status(d)) and s.get("state") == "ready"]
    assert len(ready) == 1, ready
    return {**ready[0][1], "dir": ready[0][0]}


def test_an_idle_worker_killed_restarts_its_worker_pool_not_the_engine(
    gce: GlobusComputePool, tmp_path: Path, tiny_model_path: Path
) -> None:
    registry = Registry(gce.store)
    spec = ModelSpec(name="tiny-llama", version="w", model_path=str(tiny_model_path), max_inflight=2)
    fn = register(registry, generate_pid, model=True)
    (tmp_path / "meet").mkdir()
    meet = [submit(gce, fn, "The quick brown", str(tmp_path / "meet"), 2, model=spec) for _ in range(2)]
    first = [f.result(180) for f in meet]
    assert all(r.ok for r in first), [r.error for r in first]
    workers = {loads(r.value) for r in first}
    assert len(workers) == 2
    before = block_status(tmp_path / "run" / "tiny-llama-w")
    assert before["worker_pool_restarts"] == 0
    # The answers came back, so the workers have left their tasks (no busy marks): they are idle,
    # and one of them holds the task queue's read lock while it waits.
    assert (before["dir"] / "busy").is_dir() and not list((before["dir"] / "busy").iterdir())
    for worker in workers:
        os.kill(worker, signal.SIGKILL)
    restarted = wait_for(
        lambda: (s := block_status(tmp_path / "run" / "tiny-llama-w"))["worker_pool_restarts"] >= 1 and s,
        timeout=30,
        what="the worker pool's restart",
    )
    assert restarted["worker_pool_pid"] != before["worker_pool_pid"]
    assert restarted["pid"] == before["pid"] and pid_alive(before["pid"])  # the same engine
    futures = [submit(gce, fn, f"Line {i} of", model=spec, retries=2) for i in range(6)]
    results = [f.result(120) for f in futures]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert not workers & {loads(r.value) for r in results}
    assert block_status(tmp_path / "run" / "tiny-llama-w")["worker_pool_restarts"] <= 2  # no restart loop
