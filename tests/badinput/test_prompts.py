"""Prompts over the model's context: through the engine's ``/generate``, a function, and the service.

Every way in answers with the engine's typed refusal (HTTP 400; ``EngineRejectedError``
through a function; 413 where the body is over the service's limit), never a 500,
a hang or a dead engine, and leaves nothing behind: the engine has no request in
flight and still answers, and the store holds at most the failed invocation's
record and its staged argument (no result).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import faas
from faas.service._api import MAX_INLINE_BYTES
from tests.badinput._state import durable_files
from tests.faas._service_proc import ServiceProc, args, register, wait_hot
from tests.warmpool._cpu_engine_proc import running_engine
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

MiB = 1 << 20
CONTEXT = "longer than the model's context length (512 tokens)"
JUST_OVER = "word " * 300  # about 600 tokens of the tiny model's (its context is 512)
HUGE = "word " * (2 * MiB)  # 10 MiB of text (under the service's inline limit: "word " * MiB)
SHORT = "The quick brown"


@faas.function(model="tiny-llama", timeout=120)
def ask(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, sampling_params={"max_new_tokens": 4, "temperature": 0}).text


def answers_normally(text: str) -> bool:
    """A short prompt's completion, as the tiny model always completes it."""
    return bool(text) and KNOWN_COMPLETIONS[SHORT].startswith(text)


# -- the engine's /generate (SGLang's native route) ------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_engine(tiny_model_path, tmp_path_factory.mktemp("engine"), "--threads", "1") as proc:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            yield http
        assert proc.proc.poll() is None, "the engine died"


@pytest.mark.parametrize(
    ("body", "size"),
    [({"text": JUST_OVER}, "603 tokens"), ({"text": HUGE}, "10485760 characters"),
     ({"text": [SHORT, "x" * (200 * MiB)]}, "209715200 characters"),
     ({"input_ids": [7] * 513}, "513 tokens"), ({"input_ids": [7] * 512}, "512 tokens")],
    ids=["just-over", "10MiB", "200MiB-in-a-batch", "513-token-ids", "512-token-ids-no-room"],
)  # fmt: skip
def test_prompt_over_the_context_through_generate_is_a_400(
    engine: httpx.Client, body: dict[str, object], size: str
) -> None:
    """A 200 MiB prompt used to be tokenized whole (the engine was OOM-killed); now it is refused unread."""
    r = engine.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400, r.text[:300]
    message = r.json()["error"]["message"]
    assert f"the input ({size}" in message and CONTEXT in message, message
    stats = engine.get("/server_info").json()["stats"]
    assert (stats["requests_running"], stats["requests_waiting"]) == (0, 0), stats
    ok = engine.post(
        "/generate", json={"text": SHORT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    )
    assert ok.status_code == 200 and answers_normally(ok.json()["text"]), ok.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/encode"])
def test_prompt_over_the_context_through_the_other_engine_routes_is_a_400(
    engine: httpx.Client, route: str
) -> None:
    body: dict[str, object] = {"model": "x", "prompt": JUST_OVER}
    if route == "/v1/chat/completions":
        body = {"model": "x", "messages": [{"role": "user", "content": HUGE}]}
    elif route == "/encode":
        body = {"text": HUGE}
    r = engine.post(route, json=body)
    assert r.status_code == 400, r.text[:300]
    data = r.json()
    assert CONTEXT in (data["error"]["message"] if "error" in data else data["message"]), data


# -- a function calling model.generate (embedded client) --------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_model_path: Path) -> Iterator[faas.Client]:
    with tempfile.TemporaryDirectory(prefix="badprompt-") as store, faas.Client(store=store, workers=1) as c:
        yield c


@pytest.mark.parametrize(("prompt", "staged"), [(JUST_OVER, 0), (HUGE, 1)], ids=["just-over", "10MiB"])
def test_prompt_over_the_context_through_a_function_is_engine_rejected(
    client: faas.Client, prompt: str, staged: int
) -> None:
    fn = ask.with_client(client)
    assert answers_normally(fn.remote(SHORT))  # the engine is up, so the next call reaches it
    root = Path(client.store.config()["options"]["root"])
    before = durable_files(root)
    future = fn.submit(prompt)
    with pytest.raises(faas.EngineRejectedError, match=re.escape(CONTEXT)) as raised:
        future.result(timeout=120)
    assert "rejected /generate with HTTP 400: the input (" in str(raised.value)
    new = durable_files(root) - before
    assert all(f.startswith(("invocations/", "staging/")) for f in new), new
    assert len([f for f in new if f.startswith("staging/")]) == staged, new  # the argument; no result
    assert answers_normally(fn.remote(SHORT))


# -- the service: its OpenAI routes and a registered function -----------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = ServiceProc(tmp_path_factory.mktemp("badprompt-svc")).start(timeout=120)
    try:
        with proc.client() as alice:
            register(alice, ask.fn, "ask", model="tiny-llama", model_param="model")
            alice.post("/v1/completions", json={"model": "tiny-llama", "prompt": SHORT, "max_tokens": 1})
            wait_hot(alice, "tiny-llama", 120)
        yield proc
    finally:
        proc.stop()


def settled(service: ServiceProc, before: set[str]) -> list[dict[str, object]]:
    """The invocations made since ``before``, each in a terminal state (none left queued or running)."""
    with service.client() as alice:
        views = [
            v for v in alice.get("/v1/invocations", params={"limit": 10_000}).json() if v["id"] not in before
        ]
    assert all(v["status"] in ("failed", "succeeded") for v in views), views
    return views


def invocation_ids(service: ServiceProc) -> set[str]:
    with service.client() as alice:
        return {v["id"] for v in alice.get("/v1/invocations", params={"limit": 10_000}).json()}


@pytest.mark.parametrize("prompt", [JUST_OVER, "word " * MiB], ids=["just-over", "5MiB"])
def test_prompt_over_the_context_through_the_completions_route_is_a_400(
    service: ServiceProc, prompt: str
) -> None:
    before = invocation_ids(service)
    with service.client() as alice:
        r = alice.post("/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and CONTEXT in error["message"], error
    assert all(v["status"] == "failed" for v in settled(service, before))


def test_prompt_over_the_inline_limit_through_the_completions_route_is_413(service: ServiceProc) -> None:
    before = invocation_ids(service)
    with service.client() as alice:
        r = alice.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "w" * (MAX_INLINE_BYTES + 1)}
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    assert invocation_ids(service) == before


def test_prompt_over_the_context_through_a_function_over_http_fails_typed(service: ServiceProc) -> None:
    before = invocation_ids(service)
    with service.client() as alice:
        r = alice.post("/v1/invocations", json={"function": "ask", "args": args(JUST_OVER), "wait": 120})
        assert r.status_code == 200, r.text[:300]
        view = alice.get(f"/v1/invocations/{r.json()['id']}/result", params={"wait": 120}).json()
    assert (
        view["status"] == "failed" and view["error"]["type_name"] == "runtime._errors.EngineRejectedError"
    ), view
    assert CONTEXT in view["error"]["message"], view
    assert [v["status"] for v in settled(service, before)] == ["failed"]


def test_huge_prompt_through_a_function_with_the_remote_client_is_engine_rejected(
    service: ServiceProc,
) -> None:
    before = invocation_ids(service)
    with faas.RemoteClient(service.url, token=service.tokens_of["alice"]) as remote:
        with pytest.raises(faas.EngineRejectedError, match="characters, so more than 512 tokens"):
            ask.with_client(remote).remote(HUGE)  # the 10 MiB argument is staged by the client itself
        assert answers_normally(ask.with_client(remote).remote(SHORT))
    assert sorted(str(v["status"]) for v in settled(service, before)) == ["failed", "succeeded"]
