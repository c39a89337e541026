"""Fair admission end to end: two tenants share one real CPU engine through the local pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.warmpool._fair_helpers import FLOOD, SHORT, flood_then_short
from tests.warmpool._pool_helpers import generate, register
from warmpool import Pool


@pytest.mark.parametrize("fairness", ["vtc", "fcfs"])
def test_a_flooding_tenant_does_not_starve_another_tenants_short_calls(
    tmp_path: Path, tiny_model_path: Path, fairness: str
) -> None:
    registry = Registry(LocalStore(tmp_path / "store"))
    fn = register(registry, generate, model=True)
    model = ModelSpec(name="tiny-llama", version="1", max_inflight=2, min_replicas=1, idle_timeout=None)
    pool = Pool(registry.store, workers=2, fairness=fairness).start(models=[model])  # type: ignore[arg-type]
    try:
        pool.engine_url(model)  # warm: the cold start is not what this measures
        a_done_when_b_finished = flood_then_short(pool, fn, model)
        worst = max(a_done_when_b_finished)
        if fairness == "vtc":
            # b is admitted as soon as it is the backlogged tenant with the smallest counter:
            # each of its calls waits for about one of a's, never for a's whole backlog.
            assert worst <= FLOOD // 2, a_done_when_b_finished
        else:  # the baseline: in arrival order b waits behind all of a's backlog
            assert worst >= FLOOD - 2, a_done_when_b_finished
        status = pool.status()["models"][model.ref]["fairness"]
        assert status["policy"] == fairness
        assert status["tenants"]["a"]["admitted"] == FLOOD and status["tenants"]["b"]["admitted"] == SHORT
        assert status["tenants"]["a"]["served"] > status["tenants"]["b"]["served"] > 0
    finally:
        pool.shutdown()
