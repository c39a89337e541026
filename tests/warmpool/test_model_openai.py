"""``Model.openai`` and ``Model.openai_stream`` against the real CPU engine's OpenAI routes.

What the built-in OpenAI functions rely on: the engine's own response bodies,
engine-call records with the tokens (usage and provenance), the model's policy
checked before anything is sent, engine refusals typed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runtime import EngineRejectedError, Model, ModeNotAllowedError, SubmitError, UnsupportedFeatureError

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def model(url: str) -> Iterator[Model]:
    handle = Model(url, "tiny@1", timeout=60)
    yield handle.bind("inv-test-0")
    handle.close()


def test_openai_returns_the_engines_body_and_records_the_call(model: Model) -> None:
    chat = model.openai("/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0})
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    call = model.calls[-1]
    assert call["path"] == "/v1/chat/completions" and call["rid"].startswith("inv-test-0-")
    assert call["prompt_tokens"] == chat["usage"]["prompt_tokens"] > 0
    assert call["completion_tokens"] == chat["usage"]["completion_tokens"] > 0
    assert call["sampling_params"] == {"max_tokens": 4, "temperature": 0}
    embeddings = model.openai("/v1/embeddings", {"input": ["a", "b"]})
    assert [d["index"] for d in embeddings["data"]] == [0, 1]


def test_openai_stream_yields_chunks_and_fills_the_record_at_the_end(model: Model) -> None:
    chunks = list(model.openai_stream("/v1/completions", {"prompt": "The cat", "max_tokens": 5}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5  # always asked for
    call = model.calls[-1]
    assert call["completion_tokens"] == 5 and call["prompt_tokens"] > 0 and call["ttft_seconds"] is not None


def test_policy_and_refusals_are_typed(url: str) -> None:
    plain = Model(url, "tiny@1", timeout=60, allowed_modes=frozenset({"generate"}))
    try:
        with pytest.raises(ModeNotAllowedError):
            plain.openai("/v1/chat/completions", {"messages": HI, "logprobs": True})
        with pytest.raises(ModeNotAllowedError):
            plain.openai("/v1/embeddings", {"input": "a"})
        with pytest.raises(ModeNotAllowedError):
            next(iter(plain.openai_stream("/v1/completions", {"prompt": "a", "logprobs": 0})))
        assert plain.calls == []  # nothing reached the engine
        with pytest.raises(EngineRejectedError, match="max_tokens"):
            plain.openai("/v1/chat/completions", {"messages": HI, "max_tokens": 100_000})
        with pytest.raises(UnsupportedFeatureError):
            plain.openai("/v1/chat/completions", {"messages": HI, "frequency_penalty": 0.5})
        with pytest.raises(SubmitError):
            plain.openai("/generate", {})  # type: ignore[arg-type]
    finally:
        plain.close()
