"""The usage ledger and token budgets of a real ``faas serve`` over real sockets, on the tiny model.

One service for the module: alice has no budget (the ledger is compared with the
engine's own counters over her runs), bob has a tiny per-minute token budget on a
5-second "minute" (``FAAS_BUDGET_MINUTE_SECONDS``), so refusal and re-admission
take seconds, and ops is an admin tenant (``admin = true``) that runs nothing and
reads everyone's usage. The tests run in order on the same service: later ones
read the rows earlier ones made.
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

import httpx
import pytest

import faas
from tests.faas._service_proc import TOKENS, ServiceProc, wait_for

WINDOW = 5.0
OPS_TOKEN = "ops-token-0123456789abcdef"
TENANTS = {**TOKENS, "ops": OPS_TOKEN}


def _complete(model: faas.Model, prompt: str, n: int, stream: bool) -> str:
    """Three engine calls: one prompt, a batch of two, and one streamed when asked."""
    params = {"max_new_tokens": n, "temperature": 0}
    text = model.generate(prompt, params).text
    model.generate([prompt, prompt + " and"], {"max_new_tokens": 3, "temperature": 0})
    if stream:
        text += "".join(model.generate(prompt, params, stream=True))
    return text


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[ServiceProc]:
    proc = ServiceProc(
        tmp_path_factory.mktemp("svc-usage"),
        limits={"bob": {"tokens_per_minute": 1}},
        extra_env={"FAAS_BUDGET_MINUTE_SECONDS": str(WINDOW)},
        tenants=TENANTS,
        admins=frozenset({"ops"}),
    ).start()
    yield proc
    proc.stop()


def _client(service: ServiceProc, tenant: str) -> faas.RemoteClient:
    return faas.RemoteClient(service.url, token=TOKENS[tenant])


def _engine_stats(service: ServiceProc) -> dict[str, Any]:
    with service.client() as http:
        pool = http.get("/v1/pool").json()
    urls = [r["url"] for m in pool["models"].values() for r in m["replicas"] if r.get("state") == "ready"]
    assert len(urls) == 1, pool
    stats: dict[str, Any] = httpx.get(urls[0] + "/server_info", timeout=10).json()["stats"]
    return stats


def test_ledger_tokens_equal_the_engines_counters_and_shares_its_busy_time(service: ServiceProc) -> None:
    with _client(service, "alice") as client:
        fn = faas.function(model="tiny-llama", name="complete", timeout=120)(_complete).with_client(client)
        fn.remote("warm up", 2, False)  # the cold start and the engine's health check happen before
        before = _engine_stats(service)
        t0 = time.perf_counter()
        futures = [fn.submit(f"The quick brown {i}", 4 + i % 5, i % 2 == 0) for i in range(24)]
        assert all(f.result(timeout=300) for f in futures)
        elapsed = time.perf_counter() - t0
        after = _engine_stats(service)
        ids = {f.invocation_id for f in futures}
        rows = [r for r in client.usage(limit=10_000).rows if r.invocation_id in ids]
    assert len(rows) == 24 and all(r.tenant == "alice" and r.outcome == "succeeded" for r in rows)
    prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    busy = after["busy_seconds"] - before["busy_seconds"]
    assert sum(r.prompt_tokens for r in rows) == prompt > 0
    assert sum(r.completion_tokens for r in rows) == generated > 0
    assert sum(r.engine_calls for r in rows) == 24 * 2 + 12
    share = sum(r.engine_share_seconds for r in rows)
    assert share == pytest.approx(busy, rel=0.05), (share, busy)
    assert not any(r.share_estimated for r in rows)
    streamed = [r for r in rows if r.engine_calls == 3]
    assert len(streamed) == 12 and all(r.ttft_seconds is not None and r.ttft_seconds > 0 for r in streamed)
    assert all(r.queue_seconds is not None and r.execution_seconds for r in rows)
    assert {r.model for r in rows} == {"tiny-llama@1"} and {r.function for r in rows} == {"complete"}
    print(
        f"\nledger: {len(rows)} invocations, prompt {prompt}, generated {generated} tokens (as the engine "
        f"counted); engine share {share:.3f} s vs engine busy {busy:.3f} s; {elapsed:.1f} s wall"
    )
    # Per-tenant Prometheus counters carry the same sums (alice ran only these and the warm-up).
    with _client(service, "alice") as client:
        total = client.usage(by="model").total
    metrics = httpx.get(service.url + "/metrics").text
    assert _metric(metrics, "faas_tenant_tokens_total", tenant="alice", kind="prompt") == total.prompt_tokens
    assert _metric(metrics, "faas_tenant_tokens_total", tenant="alice", kind="completion") == (
        total.completion_tokens
    )
    engine = _metric(metrics, "faas_tenant_engine_seconds_total", tenant="alice")
    assert engine == pytest.approx(total.engine_share_seconds)


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text, by name and labels."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(p.split("=", 1) for p in line[len(name) + 1 : line.index("}")].split(","))
            if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"No sample {name}{labels} in the metrics:\n{text[-3000:]}")


def test_over_budget_is_429_with_retry_after_and_admitted_once_the_window_allows(
    service: ServiceProc,
) -> None:
    with _client(service, "bob") as bob:
        fn = faas.function(model="tiny-llama", name="complete", timeout=120)(_complete).with_client(bob)
        assert fn.remote("Once upon", 3, False)  # admitted: nothing used yet; it uses more than 1 token
        with pytest.raises(faas.BudgetExceededError) as info:
            fn.remote("Once upon", 3, False)
        assert 0 < info.value.retry_after <= WINDOW + 1
        assert isinstance(info.value, faas.QuotaExceededError)
    with service.client("bob") as http:
        refused = http.post("/v1/invocations", json={"function": "complete", "args": ""})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "BudgetExceededError"
        assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW + 1
        listed = http.get("/v1/invocations", params={"limit": 100}).json()
        assert len(listed) == 1  # nothing of the refused submits was recorded
    with _client(service, "alice") as alice:  # alice has no budget: unaffected
        fn = faas.function(model="tiny-llama", name="complete", timeout=120)(_complete).with_client(alice)
        assert fn.remote("Once upon", 2, False)
    with _client(service, "bob") as bob:
        fn = faas.function(model="tiny-llama", name="complete", timeout=120)(_complete).with_client(bob)

        def admitted() -> bool:
            try:
                return bool(fn.remote("Once upon", 3, False))
            except faas.BudgetExceededError:
                return False

        wait_for(admitted, 3 * WINDOW + 5, "bob to be admitted again once the window moved on")


def test_usage_is_scoped_to_the_tenant_and_sums_by_model_function_and_day(service: ServiceProc) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        mine = alice.get("/v1/usage", params={"limit": 10_000}).json()
        assert mine["rows"] and {r["tenant"] for r in mine["rows"]} == {"alice"}
        theirs = bob.get("/v1/usage", params={"limit": 10_000}).json()
        assert theirs["rows"] and {r["tenant"] for r in theirs["rows"]} == {"bob"}
        assert not {r["invocation_id"] for r in theirs["rows"]} & {r["invocation_id"] for r in mine["rows"]}
        by_model = alice.get("/v1/usage", params={"by": "model"}).json()
        assert [g["key"] for g in by_model["groups"]] == ["tiny-llama@1"] and by_model["rows"] == []
        assert by_model["groups"][0]["invocations"] == len(mine["rows"]) == by_model["total"]["invocations"]
        by_function = alice.get("/v1/usage", params={"by": "function"}).json()
        assert [g["key"] for g in by_function["groups"]] == ["complete@1"]
        future = alice.get("/v1/usage", params={"since": time.time() + 3600}).json()
        assert future["rows"] == [] and future["total"]["invocations"] == 0
        assert alice.get("/v1/usage", params={"by": "nope"}).status_code == 422
        assert httpx.get(service.url + "/v1/usage").status_code == 401
    # Each tenant's rows are also objects in its part of the store (written after the result records).
    for tenant, rows in (("alice", mine["rows"]), ("bob", theirs["rows"])):
        root, count = service.store / "tenants" / tenant / "usage", len(rows)
        wait_for(lambda r=root, n=count: len(list(r.rglob("*.json"))) == n, 30, f"{tenant}'s usage objects")


def _run_usage(service: ServiceProc | None, tenant: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``faas usage`` through ``service`` with ``tenant``'s token (None: no service, argv names a store)."""
    env = {k: v for k, v in os.environ.items() if k != "FAAS_URL"}
    if service is not None:
        env.update(FAAS_URL=service.url, FAAS_TOKEN=TENANTS[tenant])
    return subprocess.run(
        [sys.executable, "-m", "faas.cli", "usage", *argv],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _faas_usage(service: ServiceProc | None, *argv: str, tenant: str = "alice") -> str:
    out = _run_usage(service, tenant, *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_faas_usage_prints_a_table_csv_and_json(service: ServiceProc) -> None:
    data = json.loads(_faas_usage(service, "--format", "json", "--since", "1h"))
    assert data["rows"] and data["total"]["invocations"] == len(data["rows"])
    lines = _faas_usage(service, "--format", "csv", "--by", "day").splitlines()
    assert lines[0].startswith("key,invocations,failed,prompt_tokens") and len(lines) == 2
    table = _faas_usage(service, "--by", "model")
    assert "tiny-llama@1" in table and "total" in table
    assert "complete@1" in _faas_usage(service, "--limit", "3")


def _by_tenant(report: dict[str, Any]) -> dict[str, int]:
    return {g["key"]: g["invocations"] for g in report["groups"]}


def test_an_admin_token_reads_every_tenants_usage_and_others_get_403(service: ServiceProc) -> None:
    with service.client("alice") as alice, service.client("bob") as bob, service.client("ops") as ops:
        own = {t: len(h.get("/v1/usage", params={"limit": 10_000}).json()["rows"]) for t, h in
               (("alice", alice), ("bob", bob))}  # fmt: skip
        assert own["alice"] > 0 and own["bob"] > 0
        assert ops.get("/v1/session").json()["admin"] is True
        assert alice.get("/v1/session").json()["admin"] is False
        # ops ran nothing: its own view is empty; the whole centre is everyone's rows, by tenant.
        assert ops.get("/v1/usage").json()["rows"] == []
        everyone = ops.get("/v1/usage", params={"all_tenants": "true", "by": "tenant"}).json()
        assert _by_tenant(everyone) == own
        assert everyone["total"]["invocations"] == sum(own.values())
        listed = ops.get("/v1/usage", params={"all_tenants": "true", "limit": 10_000}).json()["rows"]
        assert len(listed) == sum(own.values()) and {r["tenant"] for r in listed} == {"alice", "bob"}
        bobs = ops.get("/v1/usage", params={"tenant": "bob", "limit": 10_000}).json()["rows"]
        assert len(bobs) == own["bob"] and {r["tenant"] for r in bobs} == {"bob"}
        # A tenant without admin may name itself, and nobody else.
        assert len(bob.get("/v1/usage", params={"tenant": "bob"}).json()["rows"]) == own["bob"]
        for params in ({"tenant": "alice"}, {"all_tenants": "true"}):
            refused = bob.get("/v1/usage", params=params)
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["type"] == "ForbiddenError"
            assert error["message"].startswith("Tenant 'bob' may read only its own usage;")
            assert "admin = true" in error["message"]
        unknown = ops.get("/v1/usage", params={"tenant": "nobody"})
        assert unknown.status_code == 404 and "'nobody'" in unknown.json()["error"]["message"]
        both = ops.get("/v1/usage", params={"tenant": "bob", "all_tenants": "true"})
        assert both.status_code == 400 and both.json()["error"]["type"] == "SubmitError"
        assert ops.get("/v1/usage", params={"tenant": "Not A Name"}).status_code == 422
    with faas.RemoteClient(service.url, token=TOKENS["bob"]) as client:
        with pytest.raises(faas.ForbiddenError) as info:
            client.usage(all_tenants=True)
        assert isinstance(info.value, faas.AuthError) and info.value.status_code == 403
    with faas.RemoteClient(service.url, token=OPS_TOKEN) as client:
        assert client.session.admin
        assert {g.key for g in client.usage(all_tenants=True, by="tenant").groups} == {"alice", "bob"}
        assert client.usage(tenant="alice", by="model").total.invocations == own["alice"]


def test_faas_usage_all_tenants_through_the_service_and_from_the_store(service: ServiceProc) -> None:
    with service.client("alice") as alice, service.client("bob") as bob:
        own = {"alice": len(alice.get("/v1/usage", params={"limit": 10_000}).json()["rows"]),
               "bob": len(bob.get("/v1/usage", params={"limit": 10_000}).json()["rows"])}  # fmt: skip
    data = json.loads(_faas_usage(service, "--all-tenants", "--by=tenant", "--format=json", tenant="ops"))
    assert _by_tenant(data) == own
    data = json.loads(_faas_usage(service, "--tenant", "bob", "--format", "json", tenant="ops"))
    assert len(data["rows"]) == own["bob"] and {r["tenant"] for r in data["rows"]} == {"bob"}
    refused = _run_usage(service, "alice", "--all-tenants")
    assert refused.returncode == 2 and "ForbiddenError: Tenant 'alice' may read only its own usage" in (
        refused.stderr
    )
    assert _run_usage(service, "alice", "--tenant", "bob").returncode == 2
    both = _run_usage(service, "ops", "--tenant", "bob", "--all-tenants")
    assert both.returncode == 2 and "not both" in both.stderr
    # An operator on the machine reads the service's store directly: every tenant's usage objects.
    for tenant, count in own.items():
        root = service.store / "tenants" / tenant / "usage"
        wait_for(lambda r=root, n=count: len(list(r.rglob("*.json"))) == n, 30, f"{tenant}'s usage objects")
    store = str(service.store)
    data = json.loads(_faas_usage(None, "--store", store, "--all-tenants", "--by=tenant", "--format=json"))
    assert _by_tenant(data) == own
    data = json.loads(_faas_usage(None, "--store", store, "--tenant", "alice", "--format", "json"))
    assert len(data["rows"]) == own["alice"] and {r["tenant"] for r in data["rows"]} == {"alice"}
    # The store has no usage/ of its own: without a tenant, nothing (as before).
    assert json.loads(_faas_usage(None, "--store", store, "--format", "json"))["rows"] == []
