"""Fair admission end to end: two tenants share one real CPU engine through the local pool."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import pytest

from registry import FunctionSpec, ModelSpec, Registry
from runtime import LocalStore, Result, dumps
from tests.warmpool._pool_helpers import generate, register
from warmpool import Pool

FLOOD = 16  # tenant a's backlog: 8x the model's two slots
SHORT = 3  # tenant b's short calls, sent after the flood


def _submit(
    pool: Pool,
    spec: FunctionSpec,
    model: ModelSpec,
    tenant: str,
    tokens: int,
    on_done: object,
    priority: str | None = None,
) -> concurrent.futures.Future[Result]:
    fut: concurrent.futures.Future[Result] = concurrent.futures.Future()

    def done(result: Result) -> None:
        on_done()  # type: ignore[operator]
        fut.set_result(result)

    inv = spec.invocation(
        dumps((("The quick brown fox", tokens), {})),
        model=model.ref,
        store=None,
        stage_threshold=None,
        tenant=tenant,
        priority=priority,  # type: ignore[arg-type]
    )
    pool.submit(inv, spec, model, done)
    return fut


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
        lock = threading.Lock()
        a_done: list[int] = []
        a_done_when_b_finished: list[int] = []

        def a_finished() -> None:
            with lock:
                a_done.append(1)

        def b_finished() -> None:
            with lock:
                a_done_when_b_finished.append(len(a_done))

        flood = [_submit(pool, fn, model, "a", 48, a_finished) for _ in range(FLOOD)]
        # b's calls also carry a priority: the CPU engine accepts SGLang's field and ignores it.
        short = [_submit(pool, fn, model, "b", 2, b_finished, "interactive") for _ in range(SHORT)]
        for fut in short:
            result = fut.result(timeout=120)
            assert result.ok, result.error
        for fut in flood:
            assert fut.result(timeout=120).ok
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
