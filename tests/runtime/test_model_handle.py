"""The Model handle against SGLang's documented shapes (tests/fixtures/sglang), no engine needed.

Requests are captured by an httpx MockTransport and checked against SGLang's field names;
responses are SGLang-shaped fixtures that the handle must parse.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from runtime import (
    ChatResult,
    EngineError,
    EngineLost,
    GenerateResult,
    Model,
    SamplingParams,
    SerializationError,
    SubmitError,
    TextStream,
    UnsupportedFeatureError,
    dumps,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"
FIELDS: dict[str, list[str]] = json.loads((FIXTURES / "fields.json").read_text())


def fixture(name: str) -> Any:
    text = (FIXTURES / name).read_text()
    return text if name.endswith(".sse") else json.loads(text)


class Recorder:
    """A MockTransport handler: records each request, answers from ``replies[path]``."""

    def __init__(self, replies: dict[str, Any] | None = None, status: int = 200) -> None:
        self.replies = replies or {}
        self.status = status
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.url.path, body))
        reply = self.replies.get(request.url.path, {})
        if isinstance(reply, str):  # an SSE fixture
            return httpx.Response(
                self.status, content=reply.encode(), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(self.status, json=reply)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [b for _, b in self.requests]


def handle(rec: Recorder) -> Model:
    return Model("http://engine.invalid:30000", "m@1", transport=httpx.MockTransport(rec))


# ---- requests use SGLang's names -----------------------------------------------------------


def test_sampling_params_fields_are_sglangs() -> None:
    assert set(SamplingParams.model_fields) <= set(FIELDS["SamplingParams"])
    assert {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "sampling_seed"} <= set(
        SamplingParams.model_fields
    )


def test_generate_requests_use_sglang_fields() -> None:
    rec = Recorder({"/generate": fixture("generate_single.json")})
    m = handle(rec)
    params = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
              "stop": ["\n"], "stop_token_ids": [2], "sampling_seed": 7, "ignore_eos": False}  # fmt: skip
    m.generate("Hi", params, return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
    m.generate("Hi", params, return_hidden_states="last")
    rec.replies["/generate"] = fixture("generate_batch.json")
    m.generate(["a", "b"], [params, {"max_new_tokens": 2}])
    m.generate(input_ids=[[1, 2], [3]])
    rec.replies["/generate"] = fixture("generate_stream.sse")
    list(m.generate("Hi", params, stream=True))
    for body in rec.bodies:
        assert set(body) <= set(FIELDS["GenerateReqInput"]), body
        for p in (
            body["sampling_params"]
            if isinstance(body["sampling_params"], list)
            else [body["sampling_params"]]
        ):
            assert set(p) <= set(FIELDS["SamplingParams"])
    first, hidden, batch, ids, stream = rec.bodies
    assert first["return_logprob"] is True and first["top_logprobs_num"] == 2 and first["text"] == "Hi"
    assert first["sampling_params"] == params and isinstance(first["rid"], str)
    assert hidden["return_hidden_states"] is True  # SGLang's field is a bool; "last" is sliced locally
    assert batch["text"] == ["a", "b"] and len(batch["rid"]) == 2 and len(batch["sampling_params"]) == 2
    assert ids["input_ids"] == [[1, 2], [3]]
    assert stream["stream"] is True


def test_chat_requests_use_sglang_chat_fields() -> None:
    rec = Recorder({"/v1/chat/completions": fixture("chat_completion.json")})
    m = handle(rec)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    params = {"max_new_tokens": 16, "min_new_tokens": 1, "sampling_seed": 3, "temperature": 0.5, "top_k": 5,
              "json_schema": '{"type": "object"}'}  # fmt: skip
    m.chat(messages, params, return_logprob=True, top_logprobs_num=2)
    rec.replies["/v1/chat/completions"] = fixture("chat_stream.sse")
    list(m.chat(messages, {"max_new_tokens": 4}, stream=True))
    for body in rec.bodies:
        assert set(body) <= set(FIELDS["ChatCompletionRequest"]), body
        assert all(set(msg) <= set(FIELDS["ChatMessage"]) for msg in body["messages"])
    plain, streamed = rec.bodies
    # SGLang's own mapping run backwards: the engine sees the same sampling params.
    assert plain["max_tokens"] == 16 and plain["min_tokens"] == 1 and plain["seed"] == 3
    assert plain["top_k"] == 5 and plain["logprobs"] is True and plain["top_logprobs"] == 2
    assert plain["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert plain["messages"] == messages
    assert streamed["stream"] is True and set(streamed["stream_options"]) <= set(FIELDS["StreamOptions"])


def test_encode_requests_use_sglang_fields() -> None:
    rec = Recorder({"/encode": fixture("encode_single.json")})
    m = handle(rec)
    m.encode("one")
    rec.replies["/encode"] = fixture("encode_batch.json")
    m.encode(["a", "b"])
    m.encode(input_ids=[[1, 2], [3, 4]])
    for path, body in rec.requests:
        assert path == "/encode" and set(body) <= set(FIELDS["EmbeddingReqInput"])
    assert rec.bodies[0]["text"] == "one" and rec.bodies[1]["text"] == ["a", "b"]


# ---- responses in SGLang's shapes parse ----------------------------------------------------


def test_parse_generate_single_and_batch() -> None:
    m = handle(Recorder({"/generate": fixture("generate_single.json")}))
    r = m.generate("What is the capital of France?")
    assert isinstance(r, GenerateResult)
    assert (r.text, r.finish_reason, r.matched_stop) == (" The capital of France is Paris.", "stop", 151645)
    assert (r.prompt_tokens, r.completion_tokens, len(r.output_ids)) == (7, 8, 8)
    assert r.logprobs is None and r.hidden_states is None and r.meta_info["weight_version"] == "default"
    m = handle(Recorder({"/generate": fixture("generate_batch.json")}))
    outs = m.generate(["a", "b"])
    assert isinstance(outs, list) and [o.finish_reason for o in outs] == ["stop", "length"]
    assert outs[1].completion_tokens == 6 and outs[1].matched_stop is None


def test_parse_logprobs() -> None:
    m = handle(Recorder({"/generate": fixture("generate_logprobs.json")}))
    r = m.generate("x", return_logprob=True, top_logprobs_num=2)
    assert r.logprobs is not None and r.top_logprobs is not None and r.top_logprob_ids is not None
    assert r.logprobs.shape == (3,) and r.logprobs.dtype == np.float32 and (r.logprobs <= 0).all()
    assert r.top_logprobs.shape == r.top_logprob_ids.shape == (3, 2)
    assert r.top_logprob_ids[:, 0].tolist() == r.output_ids
    assert np.allclose(r.top_logprobs[:, 0], r.logprobs)


def test_parse_hidden_states() -> None:
    m = handle(Recorder({"/generate": fixture("generate_hidden_states.json")}))
    r = m.generate("x", return_hidden_states=True)
    assert r.hidden_states is not None
    # prompt_tokens + completion_tokens - 1 rows: the last output token is never fed back.
    assert r.hidden_states.shape == (3 + 3 - 1, 4) and r.hidden_states.dtype == np.float32
    assert r.hidden_states[3].tolist() == [1.0, -0.75, 0.125, 0.5]
    assert "hidden_states" not in r.meta_info  # moved to the array, not kept twice
    last = m.generate("x", return_hidden_states="last").hidden_states
    assert last is not None and last.tolist() == [0.25, 0.5, -0.125, 1.75]


def test_parse_generate_stream() -> None:
    rec = Recorder({"/generate": fixture("generate_stream.sse")})
    m = handle(rec)
    stream = m.generate("x", stream=True)
    assert isinstance(stream, TextStream) and stream.result is None
    deltas = list(stream)
    assert deltas == [" Paris", " is", " lovely."] and "".join(deltas) == stream.text
    assert isinstance(stream.result, GenerateResult) and stream.result.text == "".join(deltas)
    assert stream.result.finish_reason == "stop" and stream.result.completion_tokens == 5
    assert not m._active  # the request id is released once the stream ends


def test_streamed_calls_record_their_tokens_and_time_to_first_text() -> None:
    m = handle(Recorder({"/generate": fixture("generate_stream.sse")}))
    assert "".join(m.generate("x", stream=True)) == " Paris is lovely."
    [call] = m.calls
    assert (call["prompt_tokens"], call["completion_tokens"], call["engine_seconds"]) == (6, 5, 0.083)
    assert call["ttft_seconds"] is not None and 0 <= call["ttft_seconds"] <= call["wall_seconds"]
    assert call["engine_share_seconds"] is None  # SGLang reports no share of its busy time
    m = handle(Recorder({"/v1/chat/completions": fixture("chat_stream.sse")}))
    "".join(m.chat([{"role": "user", "content": "x"}], stream=True))
    assert (m.calls[0]["prompt_tokens"], m.calls[0]["completion_tokens"]) == (24, 5)
    # A call's share is recorded when the engine reports one per sequence (the CPU engine does).
    m = handle(Recorder({"/generate": fixture("generate_batch.json")}))
    m.generate(["a", "b"])
    assert m.calls[0]["engine_share_seconds"] is None
    shared = fixture("generate_batch.json")
    for i, item in enumerate(shared):
        item["meta_info"]["engine_share_seconds"] = 0.25 * (i + 1)
    m = handle(Recorder({"/generate": shared}))
    m.generate(["a", "b"])
    assert m.calls[0]["engine_share_seconds"] == pytest.approx(0.75)


def test_parse_chat_and_chat_stream() -> None:
    m = handle(Recorder({"/v1/chat/completions": fixture("chat_completion.json")}))
    r = m.chat([{"role": "user", "content": "Capital of France?"}], return_logprob=True, top_logprobs_num=2)
    assert isinstance(r, ChatResult) and r.text == "Paris." and r.finish_reason == "stop"
    assert (r.prompt_tokens, r.completion_tokens, r.matched_stop) == (24, 3, 151645)
    assert r.logprobs is not None and r.logprobs.shape == (2,) and r.tokens == ["Paris", "."]
    assert r.top_logprobs is not None and r.top_logprobs.shape == (2, 2)
    m = handle(Recorder({"/v1/chat/completions": fixture("chat_stream.sse")}))
    stream = m.chat([{"role": "user", "content": "x"}], stream=True)
    assert "".join(stream) == "Paris is lovely."
    assert isinstance(stream.result, ChatResult) and stream.result.text == "Paris is lovely."
    assert stream.result.completion_tokens == 5 and stream.result.finish_reason == "stop"


def test_parse_encode() -> None:
    m = handle(Recorder({"/encode": fixture("encode_single.json")}))
    one = m.encode("x")
    assert type(one) is np.ndarray and one.shape == (4,) and one.dtype == np.float32
    m = handle(Recorder({"/encode": fixture("encode_batch.json")}))
    many = m.encode(["x", "y"])
    assert many.shape == (2, 4) and np.allclose(np.linalg.norm(many, axis=1), 1.0)


@pytest.mark.parametrize(
    ("path", "name", "call"),
    [
        ("/generate", "error_generate.json", lambda m: m.generate("x")),
        ("/v1/chat/completions", "error_openai.json", lambda m: m.chat([{"role": "robot", "content": "x"}])),
    ],
)
def test_error_bodies_become_engine_errors(path: str, name: str, call: Callable[[Model], Any]) -> None:
    body = fixture(name)
    m = handle(Recorder({path: body}, status=400))
    with pytest.raises(EngineError, match="HTTP 400") as info:
        call(m)
    assert not isinstance(info.value, UnsupportedFeatureError)
    assert (body.get("error") or body)["message"] in str(info.value)


def test_a_rejected_stream_raises_at_the_call() -> None:
    m = handle(Recorder({"/generate": fixture("error_generate.json")}, status=400))
    with pytest.raises(EngineError, match="Only one of regex"):
        m.generate("x", stream=True)
    assert not m._active


def test_unsupported_feature_type_becomes_its_own_error() -> None:
    body = {
        "error": {
            "message": "sampling_params.regex is unsupported by the CPU engine",
            "type": "unsupported_feature",
        }
    }
    m = handle(Recorder({"/generate": body}, status=400))
    with pytest.raises(UnsupportedFeatureError, match="regex"):
        m.generate("x", {"regex": "[a-z]+"})


def test_unreachable_engine_is_engine_lost() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    m = Model("http://engine.invalid:1", "m@1", transport=httpx.MockTransport(refuse))
    with pytest.raises(EngineLost, match="unreachable"):
        m.generate("x")
    with pytest.raises(EngineLost):
        m.generate("x", stream=True)
    assert not m._active


# ---- validation happens before anything is sent -----------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"regex": "a", "ebnf": "b"}, "only one of"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 5}, "unknown sampling parameter"),
        ({"seed": 1}, "unknown sampling parameter"),
    ],
)
def test_bad_sampling_params_never_leave_the_worker(params: dict[str, Any], field: str) -> None:
    rec = Recorder()
    m = handle(rec)
    with pytest.raises(SubmitError, match="Invalid sampling_params") as info:
        m.generate("x", params)
    assert field in str(info.value)
    with pytest.raises(SubmitError):
        m.chat([{"role": "user", "content": "x"}], params)
    assert rec.requests == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.generate(42), "prompt must be"),
        (lambda m: m.generate([]), "prompt must be"),
        (lambda m: m.generate("x", input_ids=[1]), "exactly one"),
        (lambda m: m.generate(["a", "b"], [{}]), "2 prompts"),
        (lambda m: m.generate("x", {"n": 2}), "n > 1"),
        (lambda m: m.generate(["a", "b"], stream=True), "one prompt"),
        (lambda m: m.generate("x", stream=True, return_hidden_states=True), "stream"),
        (lambda m: m.generate("x", return_hidden_states="first"), "return_hidden_states"),
        (lambda m: m.generate("x", top_logprobs_num=-1), "top_logprobs_num"),
        (lambda m: m.generate("x", return_logprob="yes"), "return_logprob"),
        (lambda m: m.chat("hello"), "messages"),
        (lambda m: m.chat([{"content": "x"}]), "role"),
        (lambda m: m.chat([{"role": "user", "content": "x"}], {"max_new_tokens": 0}), "max_new_tokens >= 1"),
        (lambda m: m.chat([{"role": "user", "content": "x"}], {"stream_interval": 2}), "chat()"),
        (lambda m: m.encode(5), "prompt must be"),
    ],
)
def test_bad_calls_never_leave_the_worker(call: Callable[[Model], Any], match: str) -> None:
    rec = Recorder()
    with pytest.raises(SubmitError, match=match):
        call(handle(rec))
    assert rec.requests == []


def test_sampling_params_object_is_accepted() -> None:
    rec = Recorder({"/generate": fixture("generate_single.json")})
    handle(rec).generate("x", SamplingParams(max_new_tokens=3, temperature=0.0))
    assert rec.bodies[0]["sampling_params"] == {"max_new_tokens": 3, "temperature": 0.0}


# ---- streams stay where they were made ---------------------------------------------------------


def test_a_stream_cannot_be_pickled_into_a_result() -> None:
    m = handle(Recorder({"/generate": fixture("generate_stream.sse")}))
    stream = m.generate("x", stream=True)
    with pytest.raises(SerializationError, match="TextStream cannot be pickled"):
        dumps(stream, what="return value of 'fn'")
    stream.close()
    assert not m._active and list(stream) == []


def test_a_generator_result_cannot_be_pickled_either() -> None:
    def deltas() -> Any:
        yield "a"

    with pytest.raises(SerializationError, match="generator"):
        dumps(deltas(), what="return value of 'fn'")
