"""Bad input over HTTP: bodies, headers, names, ids and references sent to a real ``faas serve``.

Every case asserts the status, the error body's shape and type, and that no
partial state remains: no invocation in the tenant's index, no new file under
the store's invocation records, staging area, registry or trigger state.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from faas.service._api import MAX_BATCH_BYTES, MAX_BODY_BYTES, MAX_INLINE_BYTES
from runtime import dumps, loads
from tests.badinput._state import durable_files
from tests.faas._service_proc import TOKENS, ServiceProc, args, b64, register

MiB = 1 << 20
FUNCTION = "bad_echo"


def _echo(x: object) -> object:
    return x


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = ServiceProc(tmp_path_factory.mktemp("badhttp")).start()
    with proc.client() as alice:
        register(alice, _echo, FUNCTION)
    yield proc
    proc.stop()


@pytest.fixture
def alice(service: ServiceProc) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


class Unchanged:
    """Snapshot of what a request could leave behind; ``check()`` asserts it is all still the same."""

    def __init__(self, service: ServiceProc) -> None:
        self.service = service
        self.files = durable_files(service.store)
        self.ids = self._ids()

    def _ids(self) -> list[str]:
        with self.service.client() as alice:
            return [v["id"] for v in alice.get("/v1/invocations", params={"limit": 10_000}).json()]

    def check(self) -> None:
        assert self._ids() == self.ids, "an invocation was accepted"
        assert durable_files(self.service.store) == self.files, "something was written to the store"


@pytest.fixture
def unchanged(service: ServiceProc) -> Iterator[Unchanged]:
    snapshot = Unchanged(service)
    yield snapshot
    snapshot.check()


def expect(response: httpx.Response, status: int, error_type: str | None = None) -> dict[str, Any]:
    """The error body, after checking the status and the service's error shape."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert isinstance(body["error"], dict) and isinstance(body["error"]["message"], str), body
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return dict(body)


# -- sizes ------------------------------------------------------------------------------------------
def test_body_over_the_limit_by_content_length_is_413(alice: httpx.Client, unchanged: Unchanged) -> None:
    body = b"{" + b" " * MAX_BODY_BYTES + b"}"
    r = alice.post("/v1/invocations", content=body, headers={"Content-Type": "application/json"})
    assert str(MAX_BODY_BYTES) in expect(r, 413, "PayloadTooLargeError")["error"]["message"]


def test_chunked_body_over_the_limit_is_413(alice: httpx.Client, unchanged: Unchanged) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"function": "bad_echo", "args": "'
        for _ in range(MAX_BODY_BYTES // MiB + 1):
            yield b"A" * MiB
        yield b'"}'

    r = alice.post("/v1/invocations", content=chunks(), headers={"Content-Type": "application/json"})
    expect(r, 413, "PayloadTooLargeError")


def test_chunked_body_over_the_limit_on_an_openai_route_is_413_and_logs_no_error(
    service: ServiceProc, alice: httpx.Client, unchanged: Unchanged
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // MiB + 1):
            yield b"A" * MiB
        yield b'"}]}'

    before = service.log.read_text(errors="replace")
    r = alice.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    expect(r, 413, "PayloadTooLargeError")  # the service's body limit, before the route parses
    logged = service.log.read_text(errors="replace")[len(before) :]
    assert "unhandled error" not in logged and "Traceback" not in logged, logged[-2000:]


def test_inline_argument_over_its_limit_is_413(alice: httpx.Client, unchanged: Unchanged) -> None:
    blob = b64(b"x" * (MAX_INLINE_BYTES + 1))
    r = alice.post("/v1/invocations", json={"function": FUNCTION, "args": blob})
    body = expect(r, 413, "PayloadTooLargeError")
    assert "args" in body["error"]["message"] and "xxxx" not in r.text  # the input is never echoed


def test_schema_valid_batch_over_the_total_limit_is_413(alice: httpx.Client, unchanged: Unchanged) -> None:
    per_item = 7 * MiB
    count = MAX_BATCH_BYTES // per_item + 1  # each item under MAX_INLINE_BYTES, the batch over the total
    items = [{"args": b64(b"y" * per_item)}] * count
    for route in ("/v1/invocation-batches", "/v1/batches"):
        r = alice.post(route, json={"function": FUNCTION, "items": items})
        assert "batch" in expect(r, 413, "PayloadTooLargeError")["error"]["message"]


def test_batch_of_1000_large_items_is_refused_before_parsing(
    service: ServiceProc, unchanged: Unchanged
) -> None:
    """1,000 x 8 MiB is schema-valid; its Content-Length alone is refused (nothing is sent or parsed)."""
    size = 1000 * (MAX_INLINE_BYTES * 4 // 3 + 20)
    head = (
        f"POST /v1/invocation-batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Length: {size}"
    )
    answer = raw_request(service, head.encode()).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert "PayloadTooLargeError" in answer


def test_huge_prompt_through_the_openai_route_is_413(alice: httpx.Client, unchanged: Unchanged) -> None:
    messages = [{"role": "user", "content": "word " * (MAX_INLINE_BYTES // 5 + 10)}]
    r = alice.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large"


# -- encodings and shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [b'{"function": "\xff\xfe", "args": ""}', b"\xff" * 64, b'{"function": "bad_echo", "args": "\xc3\x28"}'],
    ids=["non-utf8-string", "binary", "invalid-utf8-sequence"],
)
def test_non_utf8_json_body_is_a_client_error(alice: httpx.Client, unchanged: Unchanged, body: bytes) -> None:
    r = alice.post("/v1/invocations", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    expect(r, r.status_code)


@pytest.mark.parametrize(
    "body",
    [
        {"function": FUNCTION, "args": "not base64!"},
        {"function": FUNCTION, "args": 12},
        {"function": FUNCTION, "args": args(1), "wait": -1},
        {"function": FUNCTION, "args": args(1), "wait": 1e9},
        {"function": FUNCTION, "args": args(1), "priority": "urgent"},
        {"function": FUNCTION, "args": args(1), "surprise": True},
        {"function": "", "args": args(1)},
        {"function": ["bad_echo"], "args": args(1)},
        [1, 2, 3],
    ],
    ids=["bad-base64", "int-args", "negative-wait", "huge-wait", "unknown-priority", "extra-field",
         "empty-function", "list-function", "array-body"],
)  # fmt: skip
def test_wrong_typed_submit_fields_are_422(alice: httpx.Client, unchanged: Unchanged, body: object) -> None:
    r = alice.post("/v1/invocations", json=body)
    payload = expect(r, 422, "InvalidParameterError")
    assert all(set(d) == {"type", "loc", "msg"} for d in payload["detail"]), payload


@pytest.mark.parametrize(
    ("field", "bad"),
    [("timeout", -1), ("timeout", 0), ("retries", -1), ("retries", 101), ("model_param_index", 5)],
)
def test_negative_timeout_or_retries_over_http_are_422(
    alice: httpx.Client, unchanged: Unchanged, field: str, bad: int
) -> None:
    artifact = b64(b"TPMF" + b"\0" * 40)
    r = alice.post("/v1/functions", json={"name": "neg", "artifact": artifact, field: bad})
    assert field in expect(r, 422, "InvalidParameterError")["error"]["message"]


# -- names -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "status"),
    [("", 422), (".", 400), ("..", 400), ("fé", 422), ("a" * 129, 400), ("a" * 201, 422), ("a/b", 422),
     ("f\n", 422), ("-x", 400)],
    ids=["empty", "dot", "dotdot", "unicode", "129", "201", "slash", "newline", "leading-dash"],
)  # fmt: skip
def test_bad_function_names_are_refused(
    alice: httpx.Client, unchanged: Unchanged, name: str, status: int
) -> None:
    artifact = dumps(_echo)
    r = alice.post("/v1/functions", json={"name": name, "artifact": b64(artifact)})
    expect(r, status, "SubmitError" if status == 400 else "InvalidParameterError")


def test_unknown_model_on_register_is_a_typed_404(alice: httpx.Client, unchanged: Unchanged) -> None:
    artifact = dumps(_echo)
    r = alice.post("/v1/functions", json={"name": "m", "artifact": b64(artifact), "model": "no-such-model"})
    expect(r, 404, "UnknownModelError")


def test_malformed_artifact_is_refused_and_never_stored(alice: httpx.Client, unchanged: Unchanged) -> None:
    r = alice.post("/v1/functions", json={"name": "garbage", "artifact": b64(b"not a pickle at all")})
    expect(r, 400, "SerializationError")


# -- ids and references ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["/v1/invocations/..", "/v1/invocations/..%2F..%2Fregistry", "/v1/invocations/%2e%2e/result",
     "/v1/invocations/a%00b", "/v1/functions/..", "/v1/functions/..%2Fbob",
     "/v1/invocation-batches/../events",
     "/v1/invocations/" + "9" * 5000],
)  # fmt: skip
def test_dotdot_in_ids_and_refs_is_not_found(alice: httpx.Client, unchanged: Unchanged, path: str) -> None:
    r = alice.get(path)
    expect(r, 404)


def test_dotdot_in_a_staged_reference_is_not_found(alice: httpx.Client, unchanged: Unchanged) -> None:
    for key in ("../bob/staging/" + "0" * 64, "staging/../../bob/x", "/etc/passwd"):
        ref = {"key": key, "size": 1, "sha256": "0" * 64}
        r = alice.post("/v1/invocations", json={"function": FUNCTION, "args": args(1), "refs": [ref]})
        expect(r, 404, "NotFoundError")


def test_dotdot_in_a_trigger_binding_is_a_binding_error(alice: httpx.Client, unchanged: Unchanged) -> None:
    for options in (
        {"bucket": "../bob", "output_prefix": "out/"},
        {"bucket": "in", "output_prefix": "../../o/"},
    ):
        r = alice.post("/v1/triggers", json={"function": FUNCTION, "options": options})
        expect(r, 400, "BindingError")


def test_dotdot_in_watched_ids_is_not_found(alice: httpx.Client, unchanged: Unchanged) -> None:
    expect(alice.post("/v1/watch", json={"ids": ["../x"]}), 404, "NotFoundError")


# -- authorization headers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "header",
    [b"Basic YWxpY2U6cGFzcw==", b"Bearer", b"Bearer    ", b"Token " + TOKENS["alice"].encode(),
     b"Bearer " + TOKENS["bob"].encode() + b"x", b"Bearer \xff\xfe", b"Bearer " + b"a" * 8000],
    ids=["basic", "bare-bearer", "blank-bearer", "token-scheme", "wrong", "non-utf8", "huge"],
)  # fmt: skip
def test_malformed_authorization_is_401(service: ServiceProc, unchanged: Unchanged, header: bytes) -> None:
    answer = raw_request(service, b"GET /v1/session HTTP/1.1\r\nHost: x\r\nAuthorization: " + header)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split()[1]
    assert status in (b"401", b"400"), answer[:300]  # 400: the HTTP server refused the header itself
    if status == b"401":
        assert b'"AuthError"' in body and b"www-authenticate: bearer" in head.lower()
        assert TOKENS["alice"].encode() not in body and TOKENS["bob"].encode() not in body


def raw_request(service: ServiceProc, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes no well-behaved client would send; the whole answer (the connection is closed)."""
    with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bearer_scheme_is_case_insensitive(service: ServiceProc) -> None:
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = httpx.get(service.url + "/v1/session", headers={"Authorization": f"{scheme} {TOKENS['alice']}"})
        assert r.status_code == 200 and r.json()["tenant"] == "alice"


# -- last: cases that run an invocation (their records are written in the background) --------------
def test_non_utf8_in_captured_logs_reads_back_as_text(alice: httpx.Client) -> None:
    def noisy() -> int:
        import sys

        print(b"bytes \xff\xfe not utf-8".decode("utf-8", "surrogateescape"))
        print("caf\udce9", file=sys.stderr)
        return 1

    register(alice, noisy, "noisy")
    done = alice.post("/v1/invocations", json={"function": "noisy", "args": args(), "wait": 60}).json()
    assert done["result"]["status"] == "succeeded", done
    logs = alice.get(f"/v1/invocations/{done['id']}/logs")
    assert logs.status_code == 200 and "not utf-8" in logs.text and "caf" in logs.text


def test_unicode_and_control_characters_in_arguments_round_trip(alice: httpx.Client) -> None:
    text = "naïve \x00 \u202e \U0001f600 \udcff"
    done = alice.post("/v1/invocations", json={"function": FUNCTION, "args": args(text), "wait": 60}).json()
    value = loads(base64.urlsafe_b64decode(done["result"]["value"]))
    assert value == text
