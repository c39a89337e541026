"""The warm pool against the real CPU engine and real worker processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore, loads
from tests.warmpool._pool_helpers import FakeClock, generate, nap, register, submit, wait_for
from warmpool import BackPressureError, Pool, ReplicaState
from warmpool.local._pool import pid_alive


@pytest.fixture
def registry(tmp_path: Path, tiny_model_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path / "store"))


def tiny(**settings: object) -> ModelSpec:
    return ModelSpec(name="tiny-llama", version="1", **settings)  # type: ignore[arg-type]


@pytest.fixture
def make_pool(registry: Registry) -> Iterator[object]:
    pools: list[Pool] = []

    def make(**kw: object) -> Pool:
        pool = Pool(registry.store, workers=kw.pop("workers", 2), **kw).start()  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def engine_running(url: str) -> int:
    return int(httpx.get(f"{url}/server_info", timeout=5).json()["stats"]["requests_running"])


def test_scale_from_zero_then_to_zero_after_idle_timeout(registry: Registry, make_pool: object) -> None:
    clock = FakeClock()
    pool = make_pool(clock=clock, tick_interval=None)  # type: ignore[operator]
    spec = tiny(idle_timeout=60.0)
    fn = register(registry, generate, model=True)
    assert pool.replicas() == []
    result = submit(pool, fn, "The quick brown", 4, model=spec).result(60)
    assert result.ok and loads(result.value) == 4
    [replica] = pool.replicas()
    assert replica.state is ReplicaState.READY
    assert pool.status()["models"][spec.ref]["metrics"]["cold_starts"] == 1
    clock.advance(59.0)
    pool.tick()
    assert replica.state is ReplicaState.READY
    clock.advance(2.0)
    pool.tick()
    wait_for(lambda: replica.state is ReplicaState.STOPPED, what="idle replica to stop")
    assert replica.host.pid is not None and not pid_alive(replica.host.pid)
    # The next invocation brings a replica back.
    assert submit(pool, fn, "The quick brown", 2, model=spec).result(60).ok
    assert [r.state for r in pool.replicas()] == [ReplicaState.STOPPED, ReplicaState.READY]


def test_min_replicas_keeps_one_warm(registry: Registry, make_pool: object) -> None:
    clock = FakeClock()
    spec = tiny(min_replicas=1, idle_timeout=1.0)
    pool = make_pool(clock=clock, tick_interval=None)  # type: ignore[operator]
    pool.start(models=[spec])
    [replica] = pool.replicas()
    wait_for(lambda: replica.state is ReplicaState.READY, 60, "warm replica")
    clock.advance(3600)
    pool.tick()
    assert [r.state for r in pool.replicas()] == [ReplicaState.READY]
    fn = register(registry, generate, model=True)
    assert submit(pool, fn, "The quick brown", 2, model=spec).result(30).ok
    assert pool.status()["models"][spec.ref]["metrics"]["warm_hits"] == 1


def test_scale_out_to_two_replicas_under_sustained_load(registry: Registry, make_pool: object) -> None:
    spec = tiny(max_replicas=2, max_inflight=2)
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, generate, model=True)
    futures = [submit(pool, fn, "The quick brown", 48, model=spec) for _ in range(24)]
    wait_for(
        lambda: len([r for r in pool.replicas() if r.state is ReplicaState.READY]) == 2, 90, "2 replicas"
    )
    results = [f.result(120) for f in futures]
    assert all(r.ok for r in results)
    assert len(pool.replicas()) == 2
    assert all(r.inflight == 0 for r in pool.replicas())


def test_back_pressure_when_queue_is_full(registry: Registry, make_pool: object) -> None:
    spec = tiny(max_queue=3, max_inflight=1)
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, generate, model=True)
    queued = [submit(pool, fn, "The quick brown", 2, model=spec) for _ in range(3)]  # engine still cold
    with pytest.raises(BackPressureError, match="queue of model tiny-llama@1 is full"):
        submit(pool, fn, "The quick brown", 2, model=spec)
    status = pool.status()
    assert status["models"][spec.ref]["metrics"]["rejected"] == 1
    assert status["counters"]["submitted"] == 3
    assert all(f.result(60).ok for f in queued)


@pytest.mark.parametrize("retries", [2, 0])
def test_engine_killed_during_50_inflight(registry: Registry, make_pool: object, retries: int) -> None:
    spec = tiny(max_inflight=64)
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, generate, model=True)
    assert submit(pool, fn, "warm", 1, model=spec).result(60).ok
    [replica] = pool.replicas()
    old_pid = replica.host.pid
    assert old_pid is not None and replica.url is not None
    futures = [submit(pool, fn, "The quick brown", 300, model=spec, retries=retries) for _ in range(50)]
    wait_for(lambda: engine_running(str(replica.url)) >= 40, 30, "40 generations running in the engine")
    os.killpg(old_pid, signal.SIGKILL)
    results = [f.result(120) for f in futures]
    if retries:
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
        assert sum(r.attempt > 0 for r in results) >= 40
    else:
        lost = [r for r in results if not r.ok]
        assert len(lost) >= 40
        assert {r.error.kind for r in lost if r.error} == {"engine_lost"}
        assert all("EngineLost" in (r.error.type_name if r.error else "") for r in lost)
    # A new replica serves the next call.
    after = submit(pool, fn, "The quick brown", 2, model=spec).result(60)
    assert after.ok
    live = [r for r in pool.replicas() if r.state is ReplicaState.READY]
    assert len(live) == 1 and live[0].host.pid != old_pid
    assert replica.state is ReplicaState.FAILED
    assert "exited" in (replica.error or "") or "stopped answering" in (replica.error or "")
    assert pool.status()["models"][spec.ref]["metrics"]["engine_failures"] == 1


def test_worker_killed_only_its_invocations_retry(registry: Registry, make_pool: object) -> None:
    spec = tiny(max_inflight=64)
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, generate, model=True)
    assert submit(pool, fn, "warm", 1, model=spec).result(60).ok
    [replica] = pool.replicas()
    engine_pid = replica.host.pid
    futures = [submit(pool, fn, "The quick brown", 200, model=spec, retries=1) for _ in range(20)]
    workers = wait_for(
        lambda: (
            [w for w in pool._workers.workers if w.inflight]
            if len([w for w in pool._workers.workers if w.inflight]) == 2
            else None
        ),
        30,
        "both workers busy",
    )
    victim = workers[0]
    victim_ids = set(victim.inflight)
    os.kill(victim.pid, signal.SIGKILL)
    results = {f.invocation_id: f.result(120) for f in futures}  # type: ignore[attr-defined]
    assert all(r.ok for r in results.values())
    retried = {i for i, r in results.items() if r.attempt > 0}
    assert retried == victim_ids
    assert pool.counters["workers_lost"] == 1
    assert replica.host.pid == engine_pid and replica.state is ReplicaState.READY
    wait_for(lambda: len(pool.worker_pids()) == 2, 30, "replacement worker")


def test_cancel_running_invocation_frees_slot_within_1s(registry: Registry, make_pool: object) -> None:
    import time

    spec = tiny()
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, generate, model=True)
    assert submit(pool, fn, "warm", 1, model=spec).result(60).ok
    [replica] = pool.replicas()
    fut = submit(pool, fn, "The quick brown", 400, model=spec)
    wait_for(lambda: engine_running(str(replica.url)) == 1, 30, "generation running")
    t0 = time.monotonic()
    assert pool.cancel(fut.invocation_id)  # type: ignore[attr-defined]
    # Freed by the cancel, not by the generation ending: the result says cancelled, and the
    # bound is generous so a loaded 2-core machine does not flake it.
    wait_for(lambda: engine_running(str(replica.url)) == 0 and replica.inflight == 0, 10.0, "slot freed")
    assert time.monotonic() - t0 < 10.0
    result = fut.result(5)
    assert result.error is not None and result.error.kind == "cancelled"


def test_no_model_function_and_timeout(registry: Registry, make_pool: object) -> None:
    pool = make_pool()  # type: ignore[operator]
    fn = register(registry, nap)
    assert loads(submit(pool, fn, 0.01).result(30).value) == 0.01
    slow = submit(pool, fn, 5.0, timeout=0.5).result(10)
    assert slow.error is not None and slow.error.kind == "timeout"
    assert pool.replicas() == []
