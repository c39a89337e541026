"""The globus-compute substrate on a real GlobusComputeEngine (LocalProvider, 127.0.0.1), offline.

Blocks are real HTEX worker pools launched through parsl's LocalProvider; each
block's wrapper (``python -m warmpool.globus_compute.block``) starts the real CPU engine on
the tiny model. Nothing is faked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore, loads
from tests.warmpool._pool_helpers import generate, register, submit, wait_for
from warmpool import ReplicaState
from warmpool._substrate import Substrate, SubstrateConfig, make_substrate
from warmpool.globus_compute._pool import GlobusComputePool
from warmpool.globus_compute.block import block_dirs, read_status
from warmpool.local._pool import Pool, pid_alive

pytest.importorskip("globus_compute_endpoint")

PROMPT = "The quick brown"
IDLE_S = 4.0


def started_engines(run_dir: Path) -> list[dict[str, Any]]:
    """Status of every block whose engine became ready (one per engine start)."""
    statuses = [read_status(d) for d in block_dirs(run_dir)]
    return [s for s in statuses if s and s.get("ready")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def spec(tiny_model_path: Path) -> ModelSpec:
    return ModelSpec(
        name="tiny-llama", version="gce", model_path=str(tiny_model_path), max_inflight=4, idle_timeout=IDLE_S
    )


@pytest.fixture(scope="module")
def pool(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlobusComputePool]:
    run_dir = tmp_path_factory.mktemp("gce-run")
    gce = GlobusComputePool(registry.store, run_dir=run_dir, address="127.0.0.1", workers=2).start()
    yield gce
    pids = gce.block_pids()
    gce.shutdown()
    assert not [p for p in pids if pid_alive(p)], "a block process outlived the pool"


def test_both_substrates_satisfy_the_protocol(registry: Registry, tmp_path: Path) -> None:
    local = make_substrate("local", registry.store, workers=1)
    gce = make_substrate("globus-compute", registry.store, run_dir=tmp_path)
    assert isinstance(local, Pool) and isinstance(local, Substrate)
    assert isinstance(gce, GlobusComputePool) and isinstance(gce, Substrate)
    gce.shutdown()
    local.shutdown()
    assert SubstrateConfig.model_validate({"kind": "globus-compute", "options": {"address": "127.0.0.1"}})
    with pytest.raises(ValueError, match="kind"):
        SubstrateConfig.model_validate({"kind": "kubernetes"})


def test_200_invocations_share_one_block_engine_started_once(
    pool: GlobusComputePool, registry: Registry, spec: ModelSpec
) -> None:
    fn = register(registry, generate, model=True)
    first = submit(pool, fn, PROMPT, 4, model=spec).result(180)
    assert first.ok, first.error
    assert loads(first.value) == 4
    assert first.engine is not None and first.engine["kind"] == "cpu"
    assert first.cold_start_seconds is not None and first.cold_start_seconds > 0
    assert first.queue_seconds is not None and first.queue_seconds >= first.cold_start_seconds

    futures = [submit(pool, fn, PROMPT, 3 + i % 3, model=spec) for i in range(200)]
    results = [f.result(180) for f in futures]
    assert [r.error for r in results if not r.ok] == []
    assert [loads(r.value) for r in results] == [3 + i % 3 for i in range(200)]
    # Every invocation ran in an HTEX worker process (not here) against the one engine.
    assert {r.engine["url"] for r in results if r.engine} == {first.engine["url"]}
    assert len({r.worker_pid for r in results}) > 1
    engines = started_engines(pool.run_dir / "tiny-llama-gce")
    assert len(engines) == 1, engines
    [replica] = pool.replicas(spec.ref)
    assert replica.state is ReplicaState.READY and replica.url == first.engine["url"]
    assert replica.host.server_info()["stats"]["requests_total"] >= 201
    model = pool.status()["models"][spec.ref]
    assert model["metrics"]["cold_starts"] == 1
    assert model["metrics"]["completed"] >= 201


def test_idle_block_scales_in_with_its_engine_then_comes_back(
    pool: GlobusComputePool, registry: Registry, spec: ModelSpec
) -> None:
    fn = register(registry, generate, model=True)
    assert submit(pool, fn, PROMPT, 2, model=spec).result(180).ok
    before = started_engines(pool.run_dir / "tiny-llama-gce")
    live = [r for r in pool.replicas(spec.ref) if r.state is ReplicaState.READY]
    assert len(live) == 1
    engine_pid = live[0].host.pid
    assert engine_pid is not None and pid_alive(engine_pid)

    # Idle past max_idletime: the scaler cancels the block; its wrapper stops the engine.
    wait_for(lambda: not pid_alive(engine_pid), timeout=IDLE_S + 30, what="the idle block's engine to stop")
    wait_for(
        lambda: all(r.state is ReplicaState.STOPPED for r in pool.replicas(spec.ref)),
        timeout=10,
        what="the block to report stopped",
    )

    again = submit(pool, fn, PROMPT, 2, model=spec).result(180)
    assert again.ok, again.error
    after = started_engines(pool.run_dir / "tiny-llama-gce")
    assert len(after) == len(before) + 1
    assert again.engine is not None and again.engine["block_id"] != before[-1]["block_id"]
    assert again.cold_start_seconds is not None


def test_failed_engine_is_a_failed_replica_and_invocations_fail_fast(
    registry: Registry, tmp_path: Path
) -> None:
    broken = ModelSpec(name="tiny-llama", version="broken", model_path=str(tmp_path / "no-such-model"))
    fn = register(registry, generate, model=True)
    gce = GlobusComputePool(
        registry.store, run_dir=tmp_path / "run", address="127.0.0.1", workers_per_node=2
    ).start()
    try:
        futures = [submit(gce, fn, PROMPT, 2, model=broken) for _ in range(3)]
        results = [f.result(120) for f in futures]  # a hang fails here, not in the CI timeout
        for result in results:
            assert not result.ok and result.error is not None
            assert result.error.type_name.endswith("EngineError")
            assert "failed to start" in result.error.message
            assert "no-such-model" in result.error.message  # the engine's own log says why
        [replica] = gce.replicas(broken.ref)
        assert replica.state is ReplicaState.FAILED
        assert replica.error is not None and "Log tail" in replica.error
        described = gce.status()["models"][broken.ref]
        assert described["replicas"][0]["state"] == "failed"
        assert described["metrics"]["engine_failures"] == 1
        status = json.loads(next((tmp_path / "run").rglob("status.json")).read_text())
        assert status["state"] == "failed" and status["log_tail"]
        with pytest.raises(Exception, match="failed to start"):
            gce.engine_url(broken, timeout=60)
    finally:
        pids = gce.block_pids()
        gce.shutdown()
    assert not [p for p in pids if pid_alive(p)]


def test_function_without_model_and_timeout(pool: GlobusComputePool, registry: Registry) -> None:
    from tests.warmpool._pool_helpers import nap

    fn = register(registry, nap)
    ok = submit(pool, fn, 0.01).result(120)
    assert ok.ok and loads(ok.value) == 0.01
    late = submit(pool, fn, 5.0, timeout=1.0).result(30)
    assert not late.ok and late.error is not None and late.error.kind == "timeout"
    assert submit(pool, fn, 0.0).result(30).ok  # the worker was not held by the late one
