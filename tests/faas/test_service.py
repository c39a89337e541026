"""``faas serve`` over real HTTP: durability across SIGKILL, tenants, tokens, quotas, streams."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faas._service_proc import TOKENS, ServiceProc, args, register, value, wait_for


def _slow_double(x: int, side: str, seconds: float) -> int:
    import pathlib
    import time
    import uuid

    time.sleep(seconds)
    # The side channel: one file per execution that ran to completion.
    pathlib.Path(side, f"{x}-{uuid.uuid4().hex}").write_text("done")
    return 2 * x


def _echo(x: object) -> object:
    print("echo", x)
    return x


SUBSTRATES = ["local", "globus-compute"]


@pytest.fixture(scope="module", params=SUBSTRATES)
def service(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServiceProc]:
    """The service on each substrate: the local pool, and GlobusComputeEngine blocks."""
    proc = ServiceProc(
        tmp_path_factory.mktemp("svc"),
        limits={"bob": {"max_inflight": 2, "max_queued": 3}},
        substrate=request.param,
    ).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("substrate", SUBSTRATES)
def test_sigkill_with_100_in_flight_loses_nothing_and_commits_each_once(
    tmp_path: Path, substrate: str
) -> None:
    side = tmp_path / "side"
    side.mkdir()
    svc = ServiceProc(tmp_path, limits={"alice": {"max_inflight": 8}}, substrate=substrate).start()
    try:
        with svc.client() as http:
            register(http, _slow_double, "slow_double")
            ids: dict[str, int] = {}
            for i in range(100):
                r = http.post(
                    "/v1/invocations", json={"function": "slow_double", "args": args(i, str(side), 0.2)}
                )
                assert r.status_code == 200, r.text
                ids[r.json()["id"]] = i
            # Let some finish, then kill while the rest are queued or running.
            wait_for(lambda: len(list(side.iterdir())) >= 15, 60, "15 executions before the kill")
            finished_before = {
                v["id"]
                for v in http.get("/v1/invocations", params={"limit": 200, "status": "succeeded"}).json()
            }
        svc.kill()
        assert 0 < len(finished_before) < 100
        svc.start()
        with svc.client() as http:
            results = {}
            for invocation_id, i in ids.items():
                view = http.get(f"/v1/invocations/{invocation_id}/result", params={"timeout": 60}).json()
                results[i] = value(view)
            assert results == {i: 2 * i for i in range(100)}
            metrics = httpx.get(svc.url + "/metrics").text
        executions = collections.Counter(int(f.name.split("-")[0]) for f in side.iterdir())
        assert set(executions) == set(range(100))  # none lost
        for invocation_id in finished_before:  # finished before the kill: never run again
            assert executions[ids[invocation_id]] == 1
        # Invocations cut off mid-run by the kill ran again; at most max_inflight of them.
        assert sum(executions.values()) - 100 <= 8
        # One committed result per invocation, in the tenant's records.
        results_dir = svc.store / "tenants" / "alice" / "invocations"
        assert sum(1 for i in ids if (results_dir / i / "result.json").exists()) == 100
        assert 'faas_service_invocations_total{event="recovered"}' in metrics
    finally:
        svc.stop()


def test_missing_or_wrong_token_is_401_and_runs_nothing(service: ServiceProc, tmp_path: Path) -> None:
    with service.client() as alice:
        register(alice, _echo, "echo")
        before = alice.get("/v1/invocations", params={"limit": 10_000}).json()
    for http in (
        service.client(None),
        httpx.Client(base_url=service.url, headers={"Authorization": "Bearer x"}),
    ):
        with http:
            r = http.post("/v1/invocations", json={"function": "echo", "args": args(1)})
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "AuthError"
            assert r.headers["www-authenticate"] == "Bearer"
            assert http.get("/v1/functions").status_code == 401
    with service.client() as alice:
        assert alice.get("/v1/invocations", params={"limit": 10_000}).json() == before


def test_tenant_b_cannot_see_or_touch_tenant_a(service: ServiceProc) -> None:
    import faas

    with service.client("alice") as alice, service.client("bob") as bob:
        spec = register(alice, _echo, "echo_a")
        done = alice.post("/v1/invocations", json={"function": "echo_a", "args": args(41), "wait": 60}).json()
        assert value(done["result"]) == 41
        a_id = done["id"]
        # Functions: not listed, not resolvable by name or digest, not invocable.
        assert "echo_a" not in [f["name"] for f in bob.get("/v1/functions").json()]
        for ref in ("echo_a", spec["digest"]):
            assert bob.get(f"/v1/functions/{ref}").status_code == 404
        r = bob.post("/v1/invocations", json={"function": "echo_a", "args": args(1)})
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
        # Invocations: status, result, logs, cancel, events all look like unknown ids.
        for method, path in (
            ("GET", f"/v1/invocations/{a_id}"),
            ("GET", f"/v1/invocations/{a_id}/result?timeout=0"),
            ("GET", f"/v1/invocations/{a_id}/logs"),
            ("POST", f"/v1/invocations/{a_id}/cancel"),
        ):
            assert bob.request(method, path).status_code == 404, path
        assert bob.post("/v1/watch", json={"ids": [a_id]}).status_code == 404
        assert a_id not in [v["id"] for v in bob.get("/v1/invocations").json()]
        # Staged objects: alice's staged argument cannot be named by bob.
        session = alice.get("/v1/session").json()
        from runtime._staging import stage_args
        from runtime._store_factory import store_from_config

        blob, refs = stage_args(store_from_config(session["store"]), (b"x" * 2_000_000,), {}, 1024, what="a")
        body = {"function": "echo_a", "args": __import__("base64").b64encode(blob).decode()}
        body["refs"] = [r.model_dump(mode="json") for r in refs]
        ok = alice.post("/v1/invocations", json={**body, "wait": 60}).json()
        assert ok["result"]["status"] == "succeeded"
        register(bob, _echo, "echo_b")
        r = bob.post("/v1/invocations", json={**body, "function": "echo_b"})
        assert r.status_code == 404 and "not in tenant 'bob'" in r.json()["error"]["message"]
        assert not isinstance(faas.NotFoundError("x"), faas.SubmitError)


def test_quota_errors_at_submit(service: ServiceProc, tmp_path: Path) -> None:
    side = tmp_path / "side"
    side.mkdir()
    with service.client("bob") as bob:
        register(bob, _slow_double, "slow_b")
        accepted = []
        for i in range(5):  # 2 in flight + 3 queued
            r = bob.post("/v1/invocations", json={"function": "slow_b", "args": args(i, str(side), 1.0)})
            assert r.status_code == 200, r.text
            accepted.append(r.json()["id"])
        r = bob.post("/v1/invocations", json={"function": "slow_b", "args": args(99, str(side), 0)})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "QuotaExceededError"
        assert "2 invocations running and 3 queued" in r.json()["error"]["message"]
        r = bob.post(
            "/v1/batches", json={"function": "slow_b", "items": [{"args": args(9, str(side), 0)}] * 2}
        )
        assert r.status_code == 429  # all or nothing
        for invocation_id in accepted:  # the accepted ones all complete
            assert (
                bob.get(f"/v1/invocations/{invocation_id}/result?timeout=60").json()["status"] == "succeeded"
            )
        assert sorted(int(f.name.split("-")[0]) for f in side.iterdir()) == list(range(5))


def test_batch_streams_every_result_once(service: ServiceProc) -> None:
    with service.client() as alice:
        register(alice, _echo, "echo_stream")
        r = alice.post(
            "/v1/batches", json={"function": "echo_stream", "items": [{"args": args(i)} for i in range(300)]}
        )
        batch = r.json()
        seen: list[int] = []
        with alice.stream("GET", f"/v1/batches/{batch['batch_id']}/events") as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "result":
                    import json

                    seen.append(value(json.loads(line.removeprefix("data: "))))
                elif line.startswith("data: ") and event == "end":
                    break
        assert sorted(seen) == list(range(300))
        logs = alice.get(f"/v1/invocations/{batch['ids'][7]}/logs").text
        assert logs == "echo 7\n"


def test_cancel_a_queued_invocation(service: ServiceProc, tmp_path: Path) -> None:
    with service.client("bob") as bob:
        register(bob, _slow_double, "slow_c")
        ids = [
            bob.post(
                "/v1/invocations", json={"function": "slow_c", "args": args(i, str(tmp_path), 0.5)}
            ).json()["id"]
            for i in range(3)
        ]
        r = bob.post(f"/v1/invocations/{ids[2]}/cancel").json()
        assert r == {"id": ids[2], "cancelled": True, "status": "cancelled"}
        view = bob.get(f"/v1/invocations/{ids[2]}/result").json()
        assert view["status"] == "cancelled" and view["error"]["kind"] == "cancelled"
        for invocation_id in ids[:2]:
            assert (
                bob.get(f"/v1/invocations/{invocation_id}/result?timeout=60").json()["status"] == "succeeded"
            )
        assert bob.post(f"/v1/invocations/{ids[0]}/cancel").json()["cancelled"] is False


def test_tokens_never_reach_the_log(service: ServiceProc) -> None:
    for token in TOKENS.values():
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}x"}) as http:
            assert http.get("/v1/session").status_code == 401
    with service.client() as alice:
        assert alice.get("/v1/session").status_code == 200
        alice.get("/v1/invocations/does-not-exist")
    text = service.log.read_text()
    assert "GET /v1/session" in text  # the access log is on, so the check below means something
    for token in TOKENS.values():
        assert token not in text


def test_openapi_and_metrics_are_served(service: ServiceProc) -> None:
    spec = httpx.get(service.url + "/openapi.json").json()
    for path in ("/v1/invocations", "/v1/batches", "/v1/watch", "/v1/invocations/{invocation_id}/result"):
        assert path in spec["paths"]
    metrics = httpx.get(service.url + "/metrics")
    assert metrics.status_code == 200
    assert "faas_service_invocations_total" in metrics.text
    assert "# TYPE faas_model_weights_tier gauge" in metrics.text
    assert "# TYPE faas_model_start_seconds_total counter" in metrics.text
