"""Fair admission on the globus-compute substrate: two tenants share one block's real CPU engine.

A real GlobusComputeEngine (Parsl's LocalProvider on 127.0.0.1, offline) runs one
block whose wrapper starts the CPU engine on the tiny model. The model has two
slots, so the pool sends the block two tasks at a time and keeps the rest in the
model's fair queue: the order in which that queue lets tasks go is what this
measures, with the same two-tenant figure as the local pool's test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.warmpool._fair_helpers import FLOOD, SHORT, flood_then_short
from tests.warmpool._pool_helpers import generate, register
from warmpool.globus_compute._pool import GlobusComputePool
from warmpool.local._pool import pid_alive

pytest.importorskip("globus_compute_endpoint")


@pytest.mark.parametrize("fairness", ["vtc", "fcfs"])
def test_a_flooding_tenant_does_not_starve_another_tenants_short_calls_on_globus_compute(
    tmp_path: Path, tiny_model_path: Path, fairness: str
) -> None:
    registry = Registry(LocalStore(tmp_path / "store"))
    fn = register(registry, generate, model=True)
    model = ModelSpec(
        name="tiny-llama",
        version="gce-fair",
        model_path=str(tiny_model_path),
        max_inflight=2,
        min_replicas=1,
        idle_timeout=None,
    )
    pool = GlobusComputePool(
        registry.store,
        run_dir=tmp_path / "gce-run",
        address="127.0.0.1",
        fairness=fairness,  # type: ignore[arg-type]
    ).start(models=[model])
    try:
        t0 = time.perf_counter()
        pool.engine_url(model)  # warm: the block and its engine are up before the flood
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        a_done_when_b_finished = flood_then_short(pool, fn, model)
        ran = time.perf_counter() - t0
        worst = max(a_done_when_b_finished)
        done = a_done_when_b_finished
        print(f"\ngce {fairness}: a's done as b's finished {done}; warm {warm:.1f} s, ran {ran:.1f} s")
        if fairness == "vtc":
            assert worst <= FLOOD // 2, a_done_when_b_finished
        else:  # arrival order: b's calls wait behind a's backlog in the same queue
            assert worst >= FLOOD - 2, a_done_when_b_finished
        status = pool.status()["models"][model.ref]
        assert status["fairness"]["policy"] == fairness
        tenants = status["fairness"]["tenants"]
        assert tenants["a"]["admitted"] == FLOOD and tenants["b"]["admitted"] == SHORT
        assert tenants["a"]["served"] > tenants["b"]["served"] > 0
        assert [r["state"] for r in status["replicas"]] == ["ready"]  # one block served it all
    finally:
        pids = pool.block_pids()
        pool.shutdown()
        assert not [p for p in pids if pid_alive(p)], "a block process outlived the pool"
