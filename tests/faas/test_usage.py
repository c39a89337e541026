"""The usage ledger's parts without a service: rows, reports, windows, budgets, store objects, rendering."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import faas
from faas._usage import (
    UsageRow,
    parse_since,
    read_store_usage,
    read_usage,
    report,
    store_tenants,
    usage_key,
    usage_row,
    write_usage,
)
from faas.cli._usage import render
from faas.service._api import Limits
from faas.service._auth import Tenant, TokenAuth
from faas.service._index import Index
from faas.service._ledger import Ledger, Window
from registry import FunctionSpec, ModelSpec
from runtime import ErrorInfo, LocalStore, Result, scoped_store

T0 = 1_780_000_000.0  # a fixed epoch second


def _row(
    i: int, *, tenant: str = "alice", at: float = T0, model: str = "tiny@1", tokens: int = 10
) -> UsageRow:
    return UsageRow(
        invocation_id=f"{i:032x}",
        tenant=tenant,
        function="f",
        function_version=1,
        model=model,
        outcome="succeeded",
        prompt_tokens=tokens,
        completion_tokens=tokens,
        engine_share_seconds=0.5,
        submitted_at=at - 1,
        finished_at=at,
    )


def test_usage_row_sums_engine_calls_and_marks_estimated_shares() -> None:
    spec = FunctionSpec(name="f", digest="d" * 64, version=3)
    model = ModelSpec(name="tiny", version="2")
    inv = spec.invocation(b"x", model=model.ref, store=None, stage_threshold=None)
    calls = [
        {"path": "/generate", "prompt_tokens": 5, "completion_tokens": 8, "cached_tokens": 2,
         "engine_seconds": 0.4, "engine_share_seconds": 0.1},
        {"path": "/generate", "prompt_tokens": 3, "completion_tokens": 4, "engine_seconds": 0.3,
         "engine_share_seconds": 0.2, "ttft_seconds": 0.05},
    ]  # fmt: skip
    result = Result(invocation_id=inv.id, engine_calls=calls, started_at=T0, finished_at=T0 + 2,
                    queue_seconds=0.25, cold_start_seconds=1.5)  # fmt: skip
    row = usage_row(inv, spec, model, result, "alice")
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.tokens) == (8, 12, 2, 20)
    assert row.engine_share_seconds == pytest.approx(0.3) and row.engine_seconds == pytest.approx(0.7)
    assert not row.share_estimated and row.ttft_seconds == 0.05 and row.execution_seconds == 2
    assert (row.model, row.function, row.function_version, row.outcome) == ("tiny@2", "f", 3, "succeeded")
    # An engine that reports no shares (SGLang): the latency stands in, flagged as an estimate.
    calls[0].pop("engine_share_seconds")
    failed = Result(invocation_id=inv.id, engine_calls=calls, finished_at=T0,
                    error=ErrorInfo(kind="user", type_name="ValueError", message="no"))  # fmt: skip
    row = usage_row(inv, spec, None, failed, "alice")
    assert row.share_estimated and row.engine_share_seconds == pytest.approx(0.6)
    assert (row.outcome, row.error_kind, row.model) == ("failed", "user", "tiny@2")


def test_report_filters_lists_newest_first_and_sums_by_key() -> None:
    rows = [_row(1, at=T0), _row(2, at=T0 + 3600, model="big@1"), _row(3, at=T0 + 86400)]
    listed = report(rows, since=T0 + 1)
    assert [r.invocation_id for r in listed.rows] == [rows[2].invocation_id, rows[1].invocation_id]
    assert listed.total.invocations == 2 and listed.total.prompt_tokens == 20
    by_model = report(rows, by="model")
    assert [(g.key, g.invocations) for g in by_model.groups] == [("big@1", 1), ("tiny@1", 2)]
    assert by_model.rows == [] and by_model.total.engine_share_seconds == pytest.approx(1.5)
    assert [g.invocations for g in report(rows, by="day").groups] == [2, 1]
    assert len(report(rows, by="hour").groups) == 3
    assert report(rows, limit=1).rows == [rows[2]] and report(rows, limit=1).total.invocations == 3


def test_parse_since_forms() -> None:
    assert parse_since("2h", now=T0) == T0 - 7200
    assert parse_since("30m", now=T0) == T0 - 1800
    assert parse_since(str(T0)) == T0
    assert parse_since("2026-01-01") == parse_since("2026-01-01T00:00:00+00:00")
    with pytest.raises(ValueError, match="is not a time"):
        parse_since("yesterday")


def test_window_slides_and_says_when_it_has_room() -> None:
    window = Window(60.0, 60)
    window.add(T0, 100)
    window.add(T0 + 30, 50)
    assert window.total(T0 + 30) == 150
    # Under a budget of 120 it has room once the first bucket (ending at T0 + 1) is a minute old.
    assert window.retry_after(T0 + 30, 120) == pytest.approx(31.0)
    assert window.retry_after(T0 + 30, 200) == 0.0
    assert window.total(T0 + 61) == 50
    assert window.total(T0 + 91) == 0
    window.add(T0 + 100, 5)
    window.add(T0 + 95, 5)  # a late finisher keeps the buckets in time order
    assert window.retry_after(T0 + 100, 6) == pytest.approx(56.0)


def test_ledger_refuses_over_budget_and_admits_again_when_the_window_allows(tmp_path: Path) -> None:
    now = [T0]
    ledger = Ledger(Index(tmp_path / "index.sqlite"), minute_seconds=10.0, clock=lambda: now[0])
    alice = Tenant("alice", Limits(tokens_per_minute=30))
    ledger.check(alice)
    ledger.charge([_row(1, at=T0, tokens=10)])  # 20 tokens
    ledger.check(alice)
    ledger.charge([_row(2, at=T0 + 1, tokens=5)])  # 30
    with pytest.raises(faas.BudgetExceededError) as info:
        ledger.check(alice)
    assert isinstance(info.value, faas.QuotaExceededError)
    # The first bucket (1/6 s) leaves once its end is a window old.
    assert info.value.retry_after == pytest.approx(10 + 1 / 6, abs=1e-3) and "30 tokens" in str(info.value)
    ledger.check(Tenant("alice"))  # no budget, no refusal
    ledger.check(Tenant("bob", Limits(tokens_per_minute=30)))  # bob's window is his own
    now[0] = T0 + info.value.retry_after + 1e-6
    ledger.check(alice)
    assert ledger.totals()["alice"] == (15, 0, 15, 1.0)


def test_ledger_rebuilds_windows_and_totals_from_the_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    spec = FunctionSpec(name="f", digest="d" * 64, version=1)
    invs = [spec.invocation(b"x", model=None, store=None, stage_threshold=None) for _ in range(3)]
    index.add("alice", invs)
    rows = [_row(0, at=T0 - 86400 * 31), _row(1, at=T0 - 3600), _row(2, at=T0 - 1)]
    rows = [r.model_copy(update={"invocation_id": inv.id}) for r, inv in zip(rows, invs, strict=True)]
    won = index.finish_many([(inv.id, "succeeded", "{}") for inv in invs], rows)
    assert won == [True, True, True]
    assert index.finish_many([(invs[0].id, "failed", "{}")], [rows[0]]) == [
        False
    ]  # first wins, no double row
    assert [r.invocation_id for r in index.usage("alice", since=T0 - 7200)] == [invs[2].id, invs[1].id]
    ledger = Ledger(index, clock=lambda: T0)
    assert ledger.totals()["alice"][0] == 30
    with pytest.raises(faas.BudgetExceededError):
        ledger.check(Tenant("alice", Limits(tokens_per_minute=20)))
    ledger.check(Tenant("alice", Limits(tokens_per_minute=21)))
    with pytest.raises(faas.BudgetExceededError):  # the 31-day-old row is out of the 30-day window
        ledger.check(Tenant("alice", Limits(tokens_per_30d=40)))
    ledger.check(Tenant("alice", Limits(tokens_per_30d=41)))


def test_only_an_admin_reads_other_tenants_usage(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    spec = FunctionSpec(name="f", digest="d" * 64, version=1)
    for i, tenant in enumerate(("alice", "bob", "gone")):  # "gone": no longer in the token file
        inv = spec.invocation(b"x", model=None, store=None, stage_threshold=None)
        index.add(tenant, [inv])
        row = _row(i, tenant=tenant).model_copy(update={"invocation_id": inv.id})
        assert index.finish_many([(inv.id, "succeeded", "{}")], [row]) == [True]
    ledger = Ledger(index, clock=lambda: T0)
    known = ["alice", "bob", "ops"]
    ops, bob = Tenant("ops", admin=True), Tenant("bob")
    assert ledger.scope(bob, known) == "bob" and ledger.scope(bob, known, tenant="bob") == "bob"
    assert ledger.scope(ops, known, tenant="alice") == "alice"
    assert ledger.scope(ops, known, tenant="gone") == "gone"  # its history is still readable
    assert ledger.scope(ops, known, all_tenants=True) is None
    with pytest.raises(faas.NotFoundError, match="No tenant 'nobody'"):
        ledger.scope(ops, known, tenant="nobody")
    with pytest.raises(faas.SubmitError, match="not both"):
        ledger.scope(ops, known, tenant="bob", all_tenants=True)
    for ask in ({"tenant": "alice"}, {"all_tenants": True}):
        with pytest.raises(faas.ForbiddenError, match=r"^Tenant 'bob' may read only its own usage") as info:
            ledger.scope(bob, known, **ask)  # type: ignore[arg-type]
        assert info.value.status_code == 403 and isinstance(info.value, faas.AuthError)
    everyone = ledger.report(None, by="tenant")
    assert [(g.key, g.invocations) for g in everyone.groups] == [("alice", 1), ("bob", 1), ("gone", 1)]
    assert [r.tenant for r in ledger.report("bob").rows] == ["bob"]


def test_token_file_marks_admin_tenants_and_refuses_a_flag_that_is_not_boolean(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        '[[tenants]]\nname = "ops"\ntokens = ["ops-token-0123456789"]\nadmin = true\n'
        '[[tenants]]\nname = "lab"\ntokens = ["lab-token-0123456789"]\n'
    )
    auth = TokenAuth.from_file(path)
    ops, lab = auth.authenticate("ops-token-0123456789"), auth.authenticate("lab-token-0123456789")
    assert ops is not None and ops.admin and lab is not None and not lab.admin
    path.write_text('[[tenants]]\nname = "ops"\ntokens = ["ops-token-0123456789"]\nadmin = "yes"\n')
    with pytest.raises(faas.AuthConfigError, match="admin = 'yes'; it must be true or false"):
        TokenAuth.from_file(path)


def test_store_usage_of_a_service_tenant_or_every_tenant(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    write_usage(store, _row(1, tenant="default"))  # an embedded client's row at the store's root
    for i, tenant in ((2, "alice"), (3, "alice"), (4, "bob")):  # rows a faas serve wrote per tenant
        write_usage(scoped_store(store, f"tenants/{tenant}"), _row(i, tenant=tenant))
    store.put("tenants/carol/registry/functions/f/versions/000001.json", b"{}")  # no usage: not a tenant here
    assert store_tenants(store) == ["alice", "bob"]
    assert [r.tenant for r in read_store_usage(store)] == ["default"]
    assert sorted(r.tenant for r in read_store_usage(store, tenant="alice")) == ["alice", "alice"]
    assert sorted(r.tenant for r in read_store_usage(store, all_tenants=True, since=T0 - 60)) == [
        "alice", "alice", "bob", "default"
    ]  # fmt: skip
    assert read_store_usage(store, all_tenants=True, since=T0 + 60) == []
    with pytest.raises(ValueError, match="not both"):
        read_store_usage(store, tenant="alice", all_tenants=True)


def test_budget_error_pickles_with_its_retry_after() -> None:
    err = pickle.loads(pickle.dumps(faas.BudgetExceededError("over", retry_after=12.5)))
    assert isinstance(err, faas.BudgetExceededError) and err.retry_after == 12.5 and str(err) == "over"


def test_store_objects_by_day_and_commit_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    rows = [_row(1, at=T0), _row(2, at=T0 + 2 * 86400), _row(3, at=T0 + 5 * 86400, tenant="bob")]
    for row in rows:
        assert write_usage(store, row)
    assert not write_usage(store, rows[0].model_copy(update={"prompt_tokens": 99}))
    assert usage_key(rows[0]).startswith("usage/2026-05-28/")
    assert len(read_usage(store)) == 3
    assert [r.invocation_id for r in read_usage(store, since=T0 + 86400, until=T0 + 4 * 86400)] == [
        rows[1].invocation_id
    ]
    assert read_usage(store, since=T0 - 10)[0].prompt_tokens == 10


def test_render_table_csv_json() -> None:
    rows = [_row(1), _row(2, model="big@1")]
    listed, grouped = report(rows), report(rows, by="model")
    table = render(listed, "table")
    assert "f@1" in table and "tiny@1" in table and "total" in table
    assert "big@1" in render(grouped, "table")
    lines = render(listed, "csv").splitlines()
    assert lines[0].startswith("invocation_id,tenant,function") and len(lines) == 3
    assert render(grouped, "csv").splitlines()[0].startswith("key,invocations,failed,prompt_tokens")
    assert json.loads(render(grouped, "json"))["total"]["prompt_tokens"] == 20


def _double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("records", ["async", "sync"])
def test_embedded_client_writes_one_usage_row_per_invocation(tmp_path: Path, records: str) -> None:
    store = (tmp_path / "store").as_uri()
    with faas.Client(store=store, workers=1, records=records) as client:  # type: ignore[arg-type]
        fn = faas.function(name="double")(_double).with_client(client)
        assert [fn.remote(i) for i in range(3)] == [0, 2, 4]
        client.flush_records(30)
    env = {k: v for k, v in os.environ.items() if k != "FAAS_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "faas.cli", "usage", "--store", store, "--format", "json", "--since", "1h"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)["rows"]
    assert len(rows) == 3 and {r["tenant"] for r in rows} == {"default"}
    assert {(r["function"], r["outcome"], r["engine_calls"]) for r in rows} == {("double", "succeeded", 0)}
