"""Conformance of the OpenAI-compatible API: the official ``openai`` client against a real ``faas serve``.

The service runs as a subprocess with real worker processes and the tiny Llama
on the CPU engine; the client is the official one, sync and async, with the
tenants' service tokens as ``api_key``. Each request must also be an ordinary
invocation of the tenant (index, usage ledger).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.faas._service_proc import TOKENS, ServiceProc
from tests.warmpool._pool_helpers import wait_for

BUDGET_WINDOW_SECONDS = 3  # bob's token budget "minute", shortened for the test
CHAT = [{"role": "user", "content": "Once upon a time"}]


@dataclass
class Service:
    proc: ServiceProc
    first: httpx.Response  # the first chat request, sent while the model was cold
    starting: dict[str, object]  # the model's /v1/models entry once its engine was starting

    @property
    def base_url(self) -> str:
        return self.proc.url + "/v1"

    def client(self, tenant: str = "alice", **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.proc.tokens_of[tenant], **options)  # type: ignore[arg-type]

    def aclient(self, tenant: str = "alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=TOKENS[tenant])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root: Path = tmp_path_factory.mktemp("openai")
    Registry(LocalStore(root / "store")).register_model(ModelSpec(name="plain-llama", modes=["generate"]))
    proc = ServiceProc(
        root,
        limits={"bob": {"tokens_per_minute": 40}},
        tenants={**TOKENS, "carol": "carol-token-0123456789abcdef"},
        no_internals=frozenset({"carol"}),
        extra_env={"FAAS_BUDGET_MINUTE_SECONDS": str(BUDGET_WINDOW_SECONDS)},
    ).start(timeout=120)
    try:
        with proc.client() as alice:
            first = alice.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT})

            def entry() -> dict[str, object]:
                return next(e for e in alice.get("/v1/models").json()["data"] if e["id"] == "tiny-llama")

            starting = wait_for(lambda: (e := entry())["state"] != "cold" and e, 60, "the engine to start")

            def hot() -> bool:
                data = alice.get("/v1/models").json()["data"]
                return any(e["id"] == "tiny-llama" and e["state"] == "hot" for e in data)

            wait_for(hot, 120, "tiny-llama's engine to start")
        yield Service(proc, first, starting)
    finally:
        proc.stop()


def test_a_cold_model_answers_503_with_retry_after_and_starts(service: Service) -> None:
    first = service.first
    assert first.status_code == 503, first.text
    assert 1 <= int(first.headers["retry-after"]) <= 120
    error = first.json()["error"]
    assert error["code"] == "model_not_ready" and set(error) == {"message", "type", "param", "code"}
    assert service.starting["state"] == "starting"  # the 503 started the engine, with an ETA
    assert isinstance(service.starting["eta_seconds"], float) and service.starting["eta_seconds"] >= 1


def test_a_burst_of_first_requests_all_run(service: Service) -> None:
    """carol's first chat requests arrive together: each finds the built-in registered (once) and runs."""

    async def main() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=service.base_url, api_key=service.proc.tokens_of["carol"])
        try:
            create = client.chat.completions.create
            replies = await asyncio.gather(
                *(create(model="tiny-llama", messages=CHAT, max_tokens=2) for _ in range(16))
            )
        finally:
            await client.close()
        return [r.choices[0].message.content for r in replies]

    contents = asyncio.run(main())
    assert len(contents) == 16 and all(contents)


def test_models_list_and_retrieve(service: Service) -> None:
    client = service.client()
    models = {m.id: m for m in client.models.list()}
    assert {"tiny-llama", "tiny-llama@1", "plain-llama", "plain-llama@1"} <= set(models)
    tiny = models["tiny-llama"].model_dump()
    assert tiny["state"] == "hot" and tiny["root"] == "tiny-llama@1" and tiny["aliases"] == ["latest"]
    assert models["plain-llama"].model_dump()["state"] == "cold"
    assert tiny["tier"] == "hot"  # its engine is up
    assert models["plain-llama"].model_dump()["tier"] == "staged"  # no engine; its weights are local files
    assert client.models.retrieve("tiny-llama@1").id == "tiny-llama@1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_is_an_invocation_of_the_tenant(service: Service) -> None:
    raw = service.client().chat.completions.with_raw_response.create(
        model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0, seed=7
    )
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.model == "tiny-llama"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    invocation_id = raw.headers["x-faas-invocation-id"]
    with service.proc.client() as alice:
        view = alice.get(f"/v1/invocations/{invocation_id}").json()
        assert view["function_name"] == "openai.chat" and view["status"] == "succeeded"
        rows = alice.get("/v1/usage").json()["rows"]
    row = next(r for r in rows if r["invocation_id"] == invocation_id)
    assert row["tenant"] == "alice" and row["completion_tokens"] == reply.usage.completion_tokens


def test_chat_streamed_with_usage(service: Service) -> None:
    client = service.client()
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    plain = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=4, stream=True))
    assert plain and all(c.choices and c.usage is None for c in plain)


def test_chat_n_and_stop(service: Service) -> None:
    client = service.client()
    two = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=6, n=2, temperature=1.0
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    full = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=12, temperature=0)
    text = full.choices[0].message.content or ""
    stop = text.strip().split()[1] if len(text.split()) > 1 else text[2:4]
    cut = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in (cut.choices[0].message.content or "")
    assert text.startswith(cut.choices[0].message.content or "")


def test_completions_plain_and_streamed(service: Service) -> None:
    client = service.client()
    done = client.completions.create(model="tiny-llama", prompt="The little cat", max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text and done.model == "tiny-llama"
    streamed = list(
        client.completions.create(
            model="tiny-llama", prompt="The little cat", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text


def test_embeddings(service: Service) -> None:
    client = service.client()
    out = client.embeddings.create(model="tiny-llama", input=["a cat", "a dog"])
    assert [d.index for d in out.data] == [0, 1]
    assert len(out.data[0].embedding) > 8 and out.data[0].embedding != out.data[1].embedding
    assert out.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model="tiny-llama", input="a cat")  # the client asks for base64
    assert b64.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-5)


def test_logprobs_are_a_scope_checked_mode(service: Service) -> None:
    client = service.client()
    out = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert content and len(content[0].top_logprobs) == 2
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="plain-llama", messages=CHAT, max_tokens=3, logprobs=True)
    assert denied.value.code == "mode_not_allowed"
    # carol's token lacks the internals scope: refused before anything is accepted.
    carol = service.client("carol")
    with pytest.raises(openai.PermissionDeniedError, match="lacks the 'internals' scope"):
        carol.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=3, logprobs=True)
    assert carol.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2).choices


def test_errors_are_openai_shaped(service: Service) -> None:
    client = service.client(max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, temperature=5)
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-llama", prompt="x", extra_body={"priority": "urgent"})
    assert bad.value.param == "priority"
    batch = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=2, extra_body={"priority": "batch"}
    )
    assert batch.choices[0].message.content is not None  # the extension is accepted
    for key in ("", "not-a-token-0123456789"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=service.base_url, api_key=key or "x", max_retries=0).models.list()
    no_token = httpx.post(
        service.base_url + "/chat/completions", json={"model": "tiny-llama", "messages": CHAT}
    )
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "invalid_api_key"


def test_over_budget_answers_429_with_a_retry_after_the_client_honours(service: Service) -> None:
    bob = service.client("bob", max_retries=0)
    bob.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=48, temperature=0
    )  # uses the budget
    with pytest.raises(openai.RateLimitError) as limited:
        bob.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2)
    wait = int(limited.value.response.headers["retry-after"])
    assert 1 <= wait <= BUDGET_WINDOW_SECONDS + 2  # the window's buckets round up
    started = time.monotonic()
    again = service.client("bob", max_retries=4).chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=2
    )
    assert again.choices  # accepted once the window had room: the client waited as told
    assert time.monotonic() - started >= wait - 1.0


def test_the_async_client(service: Service) -> None:
    async def main() -> None:
        client = service.aclient()
        try:
            models, chat, embed = await asyncio.gather(
                client.models.list(),
                client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5),
                client.embeddings.create(model="tiny-llama", input="hello"),
            )
            assert "tiny-llama" in {m.id for m in models.data}
            assert chat.choices[0].message.content and embed.data[0].embedding
            stream = await client.chat.completions.create(
                model="tiny-llama",
                messages=CHAT,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            assert chunks[-1].usage is not None and any(c.choices for c in chunks)
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="nope", prompt="x")
        finally:
            await client.close()

    asyncio.run(main())


def test_reserved_names_and_the_native_api_beside_it(service: Service) -> None:
    with service.proc.client() as alice:
        taken = alice.post("/v1/functions", json={"name": "openai.chat", "artifact": "AA=="})
        assert taken.status_code == 400 and "reserved" in taken.json()["error"]["message"]
        openai_batch = alice.post(
            "/v1/batches", json={"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}
        )
        # An OpenAI body goes to the batch API (here refused: no completion_window), OpenAI-shaped.
        assert openai_batch.status_code == 400, openai_batch.text
        assert openai_batch.json()["error"]["param"] == "completion_window"


def test_a_stream_relays_chunks_while_the_invocation_runs(service: Service) -> None:
    """Token streaming: the first chunk arrives before the invocation has finished."""
    body = {
        "model": "tiny-llama",
        "messages": CHAT,
        "max_tokens": 400,
        "ignore_eos": True,  # an SGLang field the engine takes: a long reply, whatever the text
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with service.proc.client() as alice, alice.stream("POST", "/v1/chat/completions", json=body) as stream:
        invocation_id = stream.headers["x-faas-invocation-id"]
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        status_at_first_chunk = alice.get(f"/v1/invocations/{invocation_id}").json()["status"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[len("data: ") :])["object"] == "chat.completion.chunk"
    assert status_at_first_chunk == "running"
    assert rest[-1] == "data: [DONE]"
    usage = json.loads(rest[-2][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == 400
    chunks = [json.loads(line[len("data: ") :]) for line in [first, *rest[:-2]]]
    assert (
        all(c["choices"] for c in chunks)
        and sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 10
    )


def test_a_stream_the_client_leaves_cancels_its_invocation(service: Service) -> None:
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 440, "ignore_eos": True, "stream": True}
    with service.proc.client() as alice:
        with alice.stream("POST", "/v1/chat/completions", json=body) as stream:
            invocation_id = stream.headers["x-faas-invocation-id"]
            next(line for line in stream.iter_lines() if line.startswith("data: "))
        # the connection is closed here, long before 440 tokens

        def cancelled() -> bool:
            return alice.get(f"/v1/invocations/{invocation_id}").json()["status"] == "cancelled"

        wait_for(cancelled, 30, "the abandoned stream's invocation to be cancelled")


def test_a_request_the_client_leaves_cancels_its_invocation(service: Service) -> None:
    """Not streamed: the client gives up (a read timeout) and the engine's work stops."""
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 440, "ignore_eos": True}
    with service.proc.client() as alice:
        before = {v["id"] for v in alice.get("/v1/invocations", params={"limit": 1000}).json()}
        with pytest.raises(httpx.ReadTimeout):
            alice.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.2))

        def cancelled() -> bool:
            views = alice.get("/v1/invocations", params={"limit": 1000}).json()
            new = [v for v in views if v["id"] not in before and v["function_name"] == "openai.chat"]
            return len(new) == 1 and new[0]["status"] == "cancelled"

        wait_for(cancelled, 30, "the abandoned request's invocation to be cancelled")
