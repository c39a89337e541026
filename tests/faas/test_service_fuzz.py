"""Schema-based fuzzing of ``faas serve`` over real HTTP: no 5xx, no crash (issue 8).

Schemathesis reads the OpenAPI description the service serves and generates
requests for every operation: its boundary and negative "coverage" cases
(bounded), then a bounded number of random valid and invalid ones. Each generated request is sent
with alice's token and without a token; where the operation names a function,
an invocation or a batch, it is sent once more naming alice's real ones, so
the handlers behind the 404s run too. The fuzzed argument blobs are not valid
serialised values: submitted to the real (instant) function they must fail as
system errors in the worker, never crash it. Afterwards the service must still
be up, its workers all alive, and its log free of unhandled exceptions.

Every response is also checked against the operation's response schema in the
OpenAPI description (status code documented, body of the documented shape).
Each run draws a fresh seed and prints it; ``FAAS_FUZZ_SEED`` replays a run,
and ``FAAS_FUZZ_EXAMPLES`` raises the number of random cases per operation.
The survival check at the end asserts that the fuzzing ran (so it cannot pass
alone, without any fuzzing).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.faas._service_proc import TOKENS, ServiceProc, args, register, value, wait_for

SEED = int(os.environ.get("FAAS_FUZZ_SEED") or secrets.randbelow(2**31))
print(f"test_service_fuzz: FAAS_FUZZ_SEED={SEED} replays this run")
EXAMPLES = int(os.environ.get("FAAS_FUZZ_EXAMPLES", "25"))
COVERAGE_CASES = 60
CALL_TIMEOUT = 30.0
AUTH = {"Authorization": f"Bearer {TOKENS['alice']}"}
FUNCTION = "fuzz_echo"
OPERATIONS = {
    "GET /health",
    "GET /metrics",
    "GET /v1/session",
    "POST /v1/functions",
    "GET /v1/functions",
    "GET /v1/functions/{ref}",
    "POST /v1/functions/{name}/shares",
    "GET /v1/functions/{name}/shares",
    "DELETE /v1/functions/{name}/shares/{tenant}",
    "GET /v1/shared",
    "GET /v1/shared/{owner}/{name}",
    "GET /v1/models",
    "POST /v1/invocations",
    "POST /v1/batches",
    "GET /v1/batches/{batch_id}/events",
    "POST /v1/invocation-batches",
    "GET /v1/invocation-batches/{batch_id}/events",
    "GET /v1/models/{model_id}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /v1/batches",
    "GET /v1/batches/{batch_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "POST /v1/files",
    "GET /v1/files",
    "GET /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
    "DELETE /v1/files/{file_id}",
    "POST /v1/watch",
    "GET /v1/invocations",
    "GET /v1/invocations/{invocation_id}",
    "GET /v1/invocations/{invocation_id}/result",
    "POST /v1/invocations/{invocation_id}/cancel",
    "GET /v1/invocations/{invocation_id}/logs",
    "GET /v1/pool",
    "POST /v1/triggers",
    "GET /v1/triggers",
    "GET /v1/usage",
    "GET /dashboard",
    "GET /dashboard/login",
    "POST /dashboard/login",
    "GET /dashboard/panels/{panel}",
    "GET /dashboard/invocations/{invocation_id}/logs",
    "GET /dashboard/invocations/{invocation_id}/provenance",
}


def _fuzz_echo(x: object) -> object:
    return x


Case = schemathesis.Case[Any]


@dataclass(frozen=True)
class Real:
    """Alice's real function, a finished invocation and a finished batch."""

    digest: str
    invocation_id: str
    batch_id: str
    batch_ids: tuple[str, ...]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = ServiceProc(
        tmp_path_factory.mktemp("fuzz"), limits={"alice": {"max_inflight": 4, "max_queued": 10_000}}
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def real(service: ServiceProc) -> Real:
    with service.client() as alice:
        spec = register(alice, _fuzz_echo, FUNCTION)
        done = alice.post("/v1/invocations", json={"function": FUNCTION, "args": args(1), "wait": 60})
        assert value(done.json()["result"]) == 1
        batch = alice.post(
            "/v1/batches", json={"function": FUNCTION, "items": [{"args": args(2)}] * 2}
        ).json()
        for invocation_id in batch["ids"]:
            view = alice.get(f"/v1/invocations/{invocation_id}/result", params={"timeout": 60}).json()
            assert view["status"] == "succeeded", view
    return Real(spec["digest"], done.json()["id"], batch["batch_id"], tuple(batch["ids"]))


@pytest.fixture(scope="module")
def api_schema(service: ServiceProc, real: Real) -> OpenApiSchema:
    config = schemathesis.Config.from_dict({"seed": SEED})
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config)


def test_openapi_is_served_and_lists_every_operation(api_schema: OpenApiSchema) -> None:
    results = list(api_schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    assert {result.ok().label for result in results if isinstance(result, Ok)} == OPERATIONS


def _describe(case: Case, response: Any, service: ServiceProc, why: str) -> str:
    request = response.request
    body = request.body if isinstance(request.body, (str, type(None))) else request.body[:1000]
    return (
        f"{why}: {request.method} {request.url}\n  body: {body!r}\n"
        f"  -> {response.status_code} {response.text[:1000]}\n--- service log tail ---\n{_log_tail(service)}"
    )


def _log_tail(service: ServiceProc, chars: int = 4000) -> str:
    """The end of the service's log without its access lines (tracebacks stay).

    Uvicorn logs a handler's traceback just after it sent the 500, so this first
    waits (briefly) until every 500 in the access log has its traceback.
    """

    def text() -> str:
        return service.log.read_text(errors="replace")

    def complete() -> bool:
        log = text()
        return log.count("Exception in ASGI application") >= log.count('" 500 ')

    with contextlib.suppress(AssertionError):
        wait_for(complete, 5, "the service to log its tracebacks")
    lines = [line for line in text().splitlines() if not line.startswith("INFO:     127.0.0.1:")]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return "\n".join(lines)[-chars:] + "\n--- errors ---\n" + "\n".join(errors[-10:])


def _name_real_data(case: Case, real: Real) -> bool:
    """Make ``case`` name alice's real function, invocation or batch; False if it names none."""
    params = dict(case.path_parameters or {})
    body = case.body
    changed = False
    if "ref" in params:
        params["ref"] = FUNCTION if len(str(params["ref"])) % 2 else real.digest
    if "invocation_id" in params:
        params["invocation_id"] = real.invocation_id
    if "batch_id" in params:
        params["batch_id"] = real.batch_id
    if params:
        case.path_parameters = params
        changed = True
    if isinstance(body, dict) and "function" in body:
        body = copy.deepcopy(body)
        items = body.get("items")
        if isinstance(items, list) and len(items) > 3:  # keep the pool quiet
            body["items"] = items[:3]
        body["function"] = FUNCTION
        case.body = body
        changed = True
    if isinstance(body, dict) and isinstance(body.get("ids"), list):
        case.body = {**body, "ids": [real.invocation_id, *real.batch_ids]}
        changed = True
    return changed


SENT: dict[str, int] = {}
"""Requests sent per operation (the survival check asserts the fuzzing ran)."""


def _conforms(case: Case, response: Any, service: ServiceProc) -> None:
    """The response's status is documented and its body matches the documented schema."""
    if "text/event-stream" in str(response.headers.get("content-type", "")):
        return  # streams are checked by their own tests
    try:
        case.operation.validate_response(response)
    except Exception as exc:  # schemathesis raises its own failure types
        raise AssertionError(_describe(case, response, service, f"response off its schema: {exc}")) from None


def _exercise(case: Case, service: ServiceProc, real: Real) -> None:
    """Send ``case`` with alice's token, without a token, and naming alice's real data."""
    for headers in (AUTH, {}):
        response = case.call(headers=headers, timeout=CALL_TIMEOUT)
        SENT[case.operation.label] = SENT.get(case.operation.label, 0) + 1
        assert response.status_code < 500, _describe(case, response, service, "server error")
        _conforms(case, response, service)
        if not headers and case.path.startswith("/v1/"):
            assert response.status_code >= 400, _describe(case, response, service, "served without a token")
    if _name_real_data(case, real):
        response = case.call(headers=AUTH, timeout=CALL_TIMEOUT)
        assert response.status_code < 500, _describe(case, response, service, "server error")
        _conforms(case, response, service)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_fuzzed_requests_never_get_a_server_error(
    label: str, api_schema: OpenApiSchema, service: ServiceProc, real: Real
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    # Boundary and negative cases derived from the schema (bounded), then random ones.
    modes = list(GenerationMode)
    generation = api_schema.config.generation_for(operation=operation, phase="coverage")
    coverage = api_schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=generation)
    for case in itertools.islice(coverage, COVERAGE_CASES):
        _exercise(case, service, real)

    @hypothesis.seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes)))
    def fuzz(case: Case) -> None:
        _exercise(case, service, real)

    fuzz()


def test_streams_answer_unknown_ids_and_bad_bodies_at_once(service: ServiceProc, real: Real) -> None:
    with service.client() as alice:
        assert alice.get("/v1/batches/0123456789abcdef/events", timeout=10).status_code == 404
        assert alice.get("/v1/batches/not-an-id!/events", timeout=10).status_code == 404
        assert alice.post("/v1/watch", json={"ids": ["0123456789abcdef"]}, timeout=10).status_code == 404
        assert (
            alice.post("/v1/watch", json={"ids": [real.invocation_id, "nope"]}, timeout=10).status_code == 404
        )
        bad: object
        for bad in ({"ids": []}, {"ids": "x"}, {"ids": [1]}, {}, {"ids": ["a"], "extra": 1}):
            assert alice.post("/v1/watch", json=bad, timeout=10).status_code == 422, bad
        assert alice.post("/v1/watch", content=b"{not json", timeout=10).status_code == 422
        # Finished ids: every result, then ``end``, without waiting.
        text = alice.post("/v1/watch", json={"ids": [real.invocation_id]}, timeout=10).text
        assert text.count("event: result") == 1 and "event: end" in text
        text = alice.get(f"/v1/batches/{real.batch_id}/events", timeout=10).text
        assert text.count("event: result") == 2 and "event: end" in text
    with service.client("bob") as bob:  # alice's batch is unknown to bob
        assert bob.get(f"/v1/batches/{real.batch_id}/events", timeout=10).status_code == 404


def test_overlong_references_are_not_found(service: ServiceProc) -> None:
    """Names no store can hold (longer than a file name may be) are unknown, not server errors."""
    staged = {"key": "k" * 400, "size": 1, "sha256": "0" * 64}
    requests = [
        ("GET", f"/v1/functions/{'a' * 300}", None),
        ("GET", f"/v1/functions/{FUNCTION}@{'9' * 290}", None),
        ("POST", "/v1/invocations", {"function": "0" * 300, "args": args(1)}),
        ("POST", "/v1/batches", {"function": "0" * 300, "items": [{"args": args(1)}]}),
        ("POST", "/v1/invocations", {"function": FUNCTION, "args": args(1), "refs": [staged]}),
    ]
    failures = []
    for method, path, body in requests:
        with service.client() as alice:  # a fresh connection each: the server drops one after a 500
            r = alice.request(method, path, json=body)
        if r.status_code != 404:
            failures.append(f"{method} {path[:80]} {str(body)[:80]} -> {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures) + "\n--- service log tail ---\n" + _log_tail(service)


def test_garbage_arguments_fail_as_system_errors(service: ServiceProc) -> None:
    with service.client() as alice:
        for blob in ("", "AA==", "gAVLAS4=", "////"):
            r = alice.post("/v1/invocations", json={"function": FUNCTION, "args": blob, "wait": 60})
            assert r.status_code == 200, r.text
            result = r.json()["result"]
            assert result["status"] == "failed" and result["error"]["kind"] == "system", result


def test_service_survives_the_fuzzing(service: ServiceProc, real: Real) -> None:
    fuzzed = {label for label, count in SENT.items() if count >= 2}
    assert fuzzed == OPERATIONS, (
        f"the fuzzing did not run for {sorted(OPERATIONS - fuzzed)} (run the module whole)"
    )
    assert service.proc is not None and service.proc.poll() is None, service.log.read_text()[-3000:]
    health = httpx.get(service.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    with service.client() as alice:
        done = alice.post("/v1/invocations", json={"function": FUNCTION, "args": args(7), "wait": 60})
        assert value(done.json()["result"]) == 7  # the pool's workers still run work
        pool = alice.get("/v1/pool").json()
    assert pool["counters"]["workers_lost"] == 0, pool
    log = service.log.read_text(errors="replace")
    assert "Exception in ASGI application" not in log and '" 500 ' not in log, _log_tail(service)
