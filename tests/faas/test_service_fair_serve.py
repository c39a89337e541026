"""Fair share through a real ``faas serve``: two bearer tokens, one warm engine, real sockets.

Tenant ``a`` floods a two-slot model with one ``.map`` (a batch of long calls);
tenant ``b`` then submits one short call. The tenants' weights come from the
token file; the pool's policy from the service's substrate file. The usage
ledger, read through an admin token, says when each invocation finished: under
weighted VTC b's call finishes while most of a's backlog still waits, under
FCFS (the same service with ``fairness = "fcfs"``) only after nearly all of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import faas
from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.faas._service_helpers import running_service
from tests.warmpool._pool_helpers import wait_for

TOKENS = {
    "a": "a-lab-token-0123456789abcdef",
    "b": "b-lab-token-0123456789abcdef",
    "ops": "ops-token-0123456789abcdef",
}
FLOOD = 16  # a's backlog: 8x the model's two slots
LONG, SHORT = 96, 2  # tokens of a's calls and of b's


def generate(model: faas.Model, prompt: str, n: int) -> int:
    out = model.generate(prompt, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return int(out.completion_tokens)  # type: ignore[union-attr]


@pytest.mark.parametrize("fairness", ["vtc", "fcfs"])
def test_a_flooding_tenant_does_not_hold_up_another_tenants_short_call_through_faas_serve(
    tmp_path: Path, tiny_model_path: Path, fairness: str
) -> None:
    root = tmp_path / "svc"
    model = ModelSpec(
        name="fair-llama", model_path=str(tiny_model_path), max_inflight=2, min_replicas=1, idle_timeout=None
    )
    Registry(LocalStore(root / "store")).register_model(model)  # the operator's model, warm at start
    options = {"tenants": TOKENS, "admins": frozenset({"ops"}), "weights": {"a": 1, "b": 2}}
    with running_service(root, **options, substrate_options={"fairness": fairness}) as service:
        with service.client("ops") as http:

            def ready() -> bool:
                replicas = http.get("/v1/pool").json()["models"].get(model.ref, {}).get("replicas", [])
                return any(r["state"] == "ready" for r in replicas)

            wait_for(ready, 120, "the model's engine to be ready")
        with (
            faas.RemoteClient(service.url, token=TOKENS["a"]) as a,
            faas.RemoteClient(service.url, token=TOKENS["b"]) as b,
            faas.RemoteClient(service.url, token=TOKENS["ops"]) as ops,
        ):
            flood = faas.function(model="fair-llama", name="flood", timeout=120)(generate).with_client(a)
            short = faas.function(model="fair-llama", name="short", timeout=120)(generate).with_client(b)
            a.register(flood)  # registered before the clock starts: b's call is then one request
            b.register(short)
            t0 = time.perf_counter()
            results = flood.map(["The quick brown fox"] * FLOOD, [LONG] * FLOOD)  # one batch request
            assert short.remote("Once upon a time", SHORT) == SHORT
            b_seconds = time.perf_counter() - t0
            assert list(results) == [LONG] * FLOOD
            rows = ops.usage(all_tenants=True, limit=1000).rows
            pool = ops.status()["models"][model.ref]["fairness"]
    a_ends = sorted(r.finished_at for r in rows if r.tenant == "a")
    (b_end,) = [r.finished_at for r in rows if r.tenant == "b"]
    assert len(a_ends) == FLOOD and {r.outcome for r in rows} == {"succeeded"}
    a_before_b = sum(1 for end in a_ends if end <= b_end)
    print(
        f"\nfaas serve, {fairness}: {a_before_b} of a's {FLOOD} finished before b's; b took {b_seconds:.2f} s"
    )
    if fairness == "vtc":  # b's call is next as soon as a slot frees: most of a's backlog is still waiting
        assert a_before_b <= FLOOD // 2, (a_before_b, a_ends, b_end)
    else:  # arrival order: b waits for a's whole backlog
        assert a_before_b >= FLOOD - 2, (a_before_b, a_ends, b_end)
    # The weights of the token file reached the pool's fair queue.
    assert pool["policy"] == fairness
    assert pool["tenants"]["a"]["weight"] == 1.0 and pool["tenants"]["b"]["weight"] == 2.0
    assert pool["tenants"]["a"]["admitted"] == FLOOD and pool["tenants"]["b"]["admitted"] == 1
