"""Every mode of the Model handle against the real CPU engine, and the engine's SGLang shapes.

Modes: generate (single, batched, token ids), chat, streaming, encode, logprobs, hidden states.
The shape checks compare the engine's raw responses with the SGLang fixtures in
tests/fixtures/sglang, so the handle sees the same JSON from both engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from runtime import ChatResult, GenerateResult, Model, SubmitError, TextStream, UnsupportedFeatureError
from tests.warmpool._cpu_engine_proc import running_engine, wait_until
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"
HIDDEN = 64  # the tiny Llama's hidden size
GREEDY = {"temperature": 0}
SHORT = {"max_new_tokens": 4}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine_url(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("model-modes")
    with running_engine(tiny_model_path, tmp, "--threads", "1", "--served-model-name", "tiny") as proc:
        yield proc.url


@pytest.fixture(scope="module")
def model(engine_url: str) -> Iterator[Model]:
    m = Model(engine_url, "tiny@1", timeout=60)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_path))


def stats(url: str) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{url}/server_info", timeout=10).json()["stats"]
    return out


# ---- generate ----------------------------------------------------------------------------------


def test_generate_single_is_typed(model: Model) -> None:
    r = model.generate("The quick brown", GREEDY)
    assert isinstance(r, GenerateResult)
    assert r.text == KNOWN_COMPLETIONS["The quick brown"]
    assert r.finish_reason == "stop" and r.matched_stop == r.output_ids[-1]  # eos
    assert r.completion_tokens == len(r.output_ids) and r.prompt_tokens == 4
    assert r.logprobs is None and r.hidden_states is None


def test_generate_batched_and_token_ids(model: Model, tokenizer: Any) -> None:
    prompts = list(KNOWN_COMPLETIONS)[:4]
    outs = model.generate(prompts, GREEDY)
    assert isinstance(outs, list) and [o.text for o in outs] == [KNOWN_COMPLETIONS[p] for p in prompts]
    # One params object per prompt: the second stops after 2 tokens.
    per_prompt = model.generate(prompts[:2], [GREEDY, {**GREEDY, "max_new_tokens": 2}])
    assert isinstance(per_prompt, list) and per_prompt[1].finish_reason == "length"
    assert per_prompt[1].completion_tokens == 2
    ids = [tokenizer(p)["input_ids"] for p in prompts[:2]]
    single = model.generate(input_ids=ids[0], sampling_params=GREEDY)
    assert isinstance(single, GenerateResult) and single.text == KNOWN_COMPLETIONS[prompts[0]]
    batch = model.generate(input_ids=ids, sampling_params=GREEDY)
    assert isinstance(batch, list) and [o.text for o in batch] == [o.text for o in outs[:2]]


def test_seeded_sampling_is_reproducible(model: Model) -> None:
    params = {"temperature": 1.5, "sampling_seed": 2024, "max_new_tokens": 20, "ignore_eos": True}
    first = model.generate("Hello", params).output_ids
    assert model.generate("Hello", params).output_ids == first
    batch = model.generate(["Hello", "The", "Hello"], params)
    assert isinstance(batch, list) and batch[0].output_ids == batch[2].output_ids == first
    others = {tuple(model.generate("Hello", {**params, "sampling_seed": s}).output_ids) for s in range(4)}
    assert len(others) > 1


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_uses_the_models_chat_template(model: Model, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two"}]
    params = {**GREEDY, "max_new_tokens": 12}
    reply = model.chat(messages, params)
    assert isinstance(reply, ChatResult) and reply.finish_reason in ("stop", "length")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert reply.prompt_tokens == len(rendered)
    same = model.generate(input_ids=rendered, sampling_params=params)
    assert isinstance(same, GenerateResult)
    assert reply.text == same.text and reply.completion_tokens == same.completion_tokens
    with pytest.raises(UnsupportedFeatureError, match="regex"):
        model.chat(messages, {"regex": "[0-9]+"})


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_deltas_join_to_the_full_text(model: Model) -> None:
    for prompt in ("Jupiter is", "The mitochondria is"):
        stream = model.generate(prompt, GREEDY, stream=True)
        assert isinstance(stream, TextStream)
        deltas = list(stream)
        assert len(deltas) > 1 and "".join(deltas) == KNOWN_COMPLETIONS[prompt]
        assert isinstance(stream.result, GenerateResult) and stream.result.text == "".join(deltas)
        assert stream.result.finish_reason == "stop"
    with model.generate("The quick brown", {**GREEDY, "stop": " lazy"}, stream=True) as stopped:
        assert "".join(stopped) == " fox jumps over the"
    chat = model.chat([{"role": "user", "content": "Hi"}], {**GREEDY, "max_new_tokens": 8}, stream=True)
    joined = "".join(chat)
    assert isinstance(chat.result, ChatResult) and chat.result.text == joined
    assert joined == model.chat([{"role": "user", "content": "Hi"}], {**GREEDY, "max_new_tokens": 8}).text


def test_closing_a_stream_early_aborts_the_request(model: Model, engine_url: str) -> None:
    params = {"max_new_tokens": 400, "ignore_eos": True}
    stream = model.generate("Hello", params, stream=True, rid_prefix="early")
    assert next(stream)
    assert stats(engine_url)["requests_running"] >= 1
    stream.close()
    wait_until(lambda: stats(engine_url)["requests_running"] == 0, 30, "the aborted stream's slot")
    assert stream.result is None and not any(r.startswith("early") for r in model._active)


# ---- encode ------------------------------------------------------------------------------------


def test_encode_shapes_and_similarity(model: Model) -> None:
    one = model.encode("The quick brown fox jumps over the lazy dog.")
    assert type(one) is np.ndarray and one.shape == (HIDDEN,) and one.dtype == np.float32
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A quick brown fox jumped over a lazy dog.",
        "Water boils at one hundred degrees Celsius.",
        "Protons carry a positive electric charge.",
        "Electrons carry a negative electric charge.",
        "Frogs start their lives as tadpoles.",
    ]
    e = model.encode(texts)
    assert e.shape == (len(texts), HIDDEN) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.allclose(e[0], one, atol=1e-5)  # batching does not change an embedding
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2]  # similar sentences are closer than unrelated ones
    assert sim[3, 4] > sim[3, 5]


# ---- internals: logprobs and hidden states -------------------------------------------------------


def test_logprobs_shapes_and_values(model: Model) -> None:
    r = model.generate("Water boils at", GREEDY, return_logprob=True, top_logprobs_num=3)
    n = r.completion_tokens
    assert r.logprobs is not None and r.top_logprobs is not None and r.top_logprob_ids is not None
    assert r.logprobs.shape == (n,) and r.logprobs.dtype == np.float32 and (r.logprobs <= 0).all()
    assert r.top_logprobs.shape == r.top_logprob_ids.shape == (n, 3)
    assert (np.diff(r.top_logprobs, axis=1) <= 0).all()  # best first
    assert r.top_logprob_ids[:, 0].tolist() == r.output_ids  # greedy picks the best token
    assert np.allclose(r.top_logprobs[:, 0], r.logprobs)
    only = model.generate("Water boils at", GREEDY, return_logprob=True)
    assert only.logprobs is not None and only.top_logprobs is None
    assert np.allclose(only.logprobs, r.logprobs)
    chat = model.chat(
        [{"role": "user", "content": "Hi"}], {**GREEDY, "max_new_tokens": 5}, return_logprob=True
    )
    assert chat.logprobs is not None and chat.logprobs.shape == (chat.completion_tokens,)
    assert (
        (chat.logprobs <= 0).all() and chat.tokens is not None and len(chat.tokens) == chat.completion_tokens
    )


def test_hidden_states_shape(model: Model) -> None:
    r = model.generate("The quick brown", {**GREEDY, "max_new_tokens": 5}, return_hidden_states=True)
    assert r.hidden_states is not None and r.hidden_states.dtype == np.float32
    # One layer (the last, after the final norm) x every consumed position x hidden size.
    assert r.hidden_states.shape == (r.prompt_tokens + r.completion_tokens - 1, HIDDEN) == (4 + 5 - 1, HIDDEN)
    last = model.generate("The quick brown", {**GREEDY, "max_new_tokens": 5}, return_hidden_states="last")
    assert last.hidden_states is not None and last.hidden_states.shape == (HIDDEN,)
    assert np.allclose(last.hidden_states, r.hidden_states[-1], atol=1e-5)
    batch = model.generate(
        ["Hello", "The quick brown"], {**GREEDY, "max_new_tokens": 5}, return_hidden_states=True
    )
    assert isinstance(batch, list) and batch[1].hidden_states is not None
    assert np.allclose(batch[1].hidden_states, r.hidden_states, atol=1e-4)  # padding does not leak in
    with pytest.raises(SubmitError):
        model.generate("x", stream=True, return_hidden_states=True)  # type: ignore[call-overload]


def test_invalid_params_never_reach_the_engine(model: Model, engine_url: str) -> None:
    before = stats(engine_url)["generate_requests"]
    for params in ({"temperature": -1}, {"max_new_tokens": "5"}, {"bogus": 1}):
        with pytest.raises(SubmitError):
            model.generate("x", params)
    assert stats(engine_url)["generate_requests"] == before
    with pytest.raises(UnsupportedFeatureError, match="json_schema"):
        model.generate("x", {"json_schema": '{"type": "object"}'})
    assert stats(engine_url)["generate_requests"] == before + 1  # reached the engine, refused there


# ---- the engine answers in SGLang's shapes -------------------------------------------------------


def assert_same_shape(want: Any, got: Any, where: str = "$") -> None:
    """Every key SGLang's fixture has, with the same JSON type (null matches anything)."""
    if want is None or got is None:
        return
    if where.endswith(".finish_reason") and isinstance(want, dict):
        # {"type": "stop", "matched": ...} or {"type": "length", "length": n}: the type decides.
        assert isinstance(got, dict) and got["type"] in ("stop", "length", "abort"), f"{where}: {got!r}"
        return
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: expected an object, got {got!r:.80}"
        missing = sorted(set(want) - set(got))
        assert not missing, f"{where}: missing {missing}"
        for key in want:
            assert_same_shape(want[key], got[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{where}: expected a list, got {got!r:.80}"
        for i in range(min(len(want), len(got), 2)):  # hidden states: a block, then vectors
            assert_same_shape(want[i], got[i], f"{where}[{i}]")
    elif isinstance(want, bool | str):
        assert type(got) is type(want), f"{where}: expected {type(want).__name__}, got {got!r:.80}"
    else:
        assert isinstance(got, int | float) and not isinstance(got, bool), f"{where}: expected a number"


def _sse(text: str) -> list[Any]:
    return [json.loads(x.removeprefix("data: ")) for x in text.splitlines() if x and x != "data: [DONE]"]


@pytest.mark.parametrize(
    ("fixture", "path", "body"),
    [
        ("generate_single.json", "/generate", {"text": "The quick brown", "sampling_params": GREEDY}),
        ("generate_batch.json", "/generate", {"text": ["Hello", "The"], "sampling_params": GREEDY}),
        ("generate_logprobs.json", "/generate",
         {"text": "Hello", "return_logprob": True, "top_logprobs_num": 2, "sampling_params": SHORT}),
        ("generate_hidden_states.json", "/generate",
         {"text": "Hello", "return_hidden_states": True, "sampling_params": SHORT}),
        ("encode_single.json", "/encode", {"text": "Hello"}),
        ("encode_batch.json", "/encode", {"text": ["Hello", "The"]}),
        ("chat_completion.json", "/v1/chat/completions",
         {"messages": HI, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
        ("error_generate.json", "/generate", {"text": "x", "sampling_params": {"top_p": 5}}),
        ("error_openai.json", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
    ],
)  # fmt: skip
def test_engine_responses_have_sglangs_shape(engine_url: str, fixture: str, path: str, body: Any) -> None:
    want = json.loads((FIXTURES / fixture).read_text())
    got = httpx.post(f"{engine_url}{path}", json=body, timeout=60)
    assert (got.status_code == 400) == fixture.startswith("error"), got.text
    assert_same_shape(want, got.json())


@pytest.mark.parametrize(
    ("fixture", "path", "body"),
    [
        ("generate_stream.sse", "/generate",
         {"text": "Jupiter is", "stream": True, "sampling_params": GREEDY}),
        ("chat_stream.sse", "/v1/chat/completions",
         {"messages": HI, "max_tokens": 4, "stream": True,
          "stream_options": {"include_usage": True}}),
    ],
)  # fmt: skip
def test_engine_streams_have_sglangs_shape(engine_url: str, fixture: str, path: str, body: Any) -> None:
    want = _sse((FIXTURES / fixture).read_text())
    with httpx.stream("POST", f"{engine_url}{path}", json=body, timeout=60) as r:
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    got = _sse(text)
    assert_same_shape(want[0], got[0], "first event")
    assert_same_shape(want[-1], got[-1], "last event")
    if path == "/generate":
        assert all(e["meta_info"]["finish_reason"] is None for e in got[:-1])
