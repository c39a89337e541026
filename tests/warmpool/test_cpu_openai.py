"""The official ``openai`` client, unchanged, on the CPU engine's OpenAI-compatible routes.

``/v1/completions``, ``/v1/models`` (and ``/v1/models/{id}``) and ``/v1/embeddings``, against
a real engine subprocess: results agree with the native ``/generate`` and ``/encode``,
responses have SGLang's shapes (tests/fixtures/sglang), bad requests are typed
``openai.BadRequestError`` naming the field. ``/v1/chat/completions`` is covered in
test_engine_fidelity.py.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.warmpool._cpu_engine_proc import wait_until
from tests.warmpool.test_model_modes import assert_same_shape
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"
PROMPTS = list(KNOWN_COMPLETIONS)[:3]
FOX = "The quick brown"


@pytest.fixture(scope="module")
def oai(url: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def token_ids(tiny_model_path: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_path / "tokenizer.json"))
    return lambda text: tok.encode(text).ids  # BOS added, as the engine tokenizes


def events(text: str) -> list[Any]:
    """The JSON events of an SSE body, ``[DONE]`` left out."""
    return [json.loads(x.removeprefix("data: ")) for x in text.splitlines() if x and x != "data: [DONE]"]


def generate(http: httpx.Client, text: Any, **params: Any) -> Any:
    r = http.post("/generate", json={"text": text, "sampling_params": params})
    assert r.status_code == 200, r.text
    return r.json()


# ---- /v1/completions -----------------------------------------------------------------------


def test_greedy_completion_equals_generate(oai: openai.OpenAI, http: httpx.Client) -> None:
    for prompt in PROMPTS:
        native = generate(http, prompt, temperature=0, max_new_tokens=32)
        out = oai.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0)
        [choice] = out.choices
        assert choice.text == native["text"] == KNOWN_COMPLETIONS[prompt]
        assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
        assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
        assert out.usage is not None
        assert out.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]
        assert out.usage.completion_tokens == native["meta_info"]["completion_tokens"]
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    short = oai.completions.create(model="tiny", prompt=FOX, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3  # type: ignore[union-attr]
    default = oai.completions.create(model="tiny", prompt=FOX, temperature=0)  # max_tokens 16
    assert default.choices[0].text == KNOWN_COMPLETIONS[FOX]


def test_batch_of_prompts_and_token_ids(oai: openai.OpenAI, token_ids: Any) -> None:
    want = [KNOWN_COMPLETIONS[p] for p in PROMPTS]
    out = oai.completions.create(model="tiny", prompt=PROMPTS, max_tokens=32, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == want
    ids = [token_ids(p) for p in PROMPTS]
    assert out.usage is not None and out.usage.prompt_tokens == sum(len(i) for i in ids)
    one = oai.completions.create(model="tiny", prompt=ids[0], max_tokens=32, temperature=0)
    assert one.choices[0].text == want[0]
    many = oai.completions.create(model="tiny", prompt=ids, max_tokens=32, temperature=0)
    assert [c.text for c in many.choices] == want


def test_n_completions_per_prompt(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model="tiny", prompt=PROMPTS[:2], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]  # prompt by prompt, n each
    assert texts[0] == texts[1] and KNOWN_COMPLETIONS[PROMPTS[0]].startswith(texts[0])
    assert texts[2] == texts[3] and KNOWN_COMPLETIONS[PROMPTS[1]].startswith(texts[2])
    one = oai.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert out.usage is not None and one.usage is not None
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # each prompt counted once
    assert out.usage.completion_tokens == 4 * 4
    named = oai.completions.create(model="tiny", prompt=FOX, n=2, max_tokens=1, extra_body={"rid": "r1"})
    assert named.id == "r1-0"  # each of the n sequences gets its own rid, as in SGLang
    assert oai.completions.create(model="tiny", prompt=FOX, max_tokens=1, extra_body={"rid": "r2"}).id == "r2"
    sampled = oai.completions.create(model="tiny", prompt=FOX, n=2, max_tokens=8, temperature=1.5, seed=7)
    again = oai.completions.create(model="tiny", prompt=FOX, n=2, max_tokens=8, temperature=1.5, seed=7)
    assert len(sampled.choices) == 2
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded


def test_stop_matches_generate(oai: openai.OpenAI, http: httpx.Client) -> None:
    native = generate(http, FOX, temperature=0, stop=[" lazy", " over"])
    out = oai.completions.create(
        model="tiny", prompt=FOX, max_tokens=16, temperature=0, stop=[" lazy", " over"]
    )
    assert out.choices[0].text == native["text"] == " fox jumps"
    assert out.choices[0].finish_reason == "stop"
    assert out.model_dump()["choices"][0]["matched_stop"] == " over"  # SGLang's extra field
    single = oai.completions.create(model="tiny", prompt=FOX, max_tokens=16, temperature=0, stop=" over")
    assert single.choices[0].text == " fox jumps"


def test_logprobs_in_the_legacy_shape(oai: openai.OpenAI, http: httpx.Client) -> None:
    out = oai.completions.create(model="tiny", prompt=FOX, max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [-1] * 4  # as SGLang: offsets are not filled
    assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == pytest.approx(logprob)  # greedy: the top token
    native = http.post(
        "/generate",
        json={
            "text": FOX,
            "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4},
        },
    ).json()
    want = [e[0] for e in native["meta_info"]["output_token_logprobs"]]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    zero = oai.completions.create(model="tiny", prompt=FOX, max_tokens=2, temperature=0, logprobs=0)
    assert zero.choices[0].logprobs is not None and zero.choices[0].logprobs.top_logprobs == []


def test_echo(oai: openai.OpenAI, token_ids: Any) -> None:
    out = oai.completions.create(
        model="tiny", prompt=[FOX, "Two plus two"], max_tokens=32, temperature=0, echo=True
    )
    assert [c.text for c in out.choices] == [p + KNOWN_COMPLETIONS[p] for p in (FOX, "Two plus two")]
    ids = oai.completions.create(model="tiny", prompt=token_ids(FOX), max_tokens=3, temperature=0, echo=True)
    assert ids.choices[0].text.startswith(FOX + " fox")  # token ids echo decoded, BOS skipped
    with_lp = oai.completions.create(
        model="tiny", prompt=FOX, max_tokens=2, temperature=0, echo=True, logprobs=0
    )
    assert with_lp.choices[0].text.startswith(FOX) and len(with_lp.choices[0].logprobs.tokens) == 2  # type: ignore[union-attr, arg-type]
    with pytest.raises(openai.BadRequestError, match=r"echo with logprobs .* unsupported by the CPU engine"):
        oai.completions.create(model="tiny", prompt=FOX, max_tokens=2, echo=True, logprobs=1)


def test_streaming_with_usage(oai: openai.OpenAI, http: httpx.Client) -> None:
    whole = oai.completions.create(model="tiny", prompt=FOX, max_tokens=16, temperature=0, logprobs=1)
    chunks = list(
        oai.completions.create(
            model="tiny", prompt=FOX, max_tokens=16, temperature=0, logprobs=1,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text == KNOWN_COMPLETIONS[FOX]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    tokens = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []
    ]
    assert whole.choices[0].logprobs is not None and tokens == whole.choices[0].logprobs.tokens
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Several prompts, n each, echo: every choice's deltas join to its non-streamed text.
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": PROMPTS[:2],
        "n": 2,
        "max_tokens": 6,
        "temperature": 0,
        "echo": True,
    }
    plain = oai.completions.create(**body)
    joined = [""] * 4
    for c in oai.completions.create(**body, stream=True):
        for choice in c.choices:
            joined[choice.index] += choice.text
    assert joined == [c.text for c in plain.choices]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_closing_a_stream_early_aborts_it(oai: openai.OpenAI, http: httpx.Client) -> None:
    stream = oai.completions.create(
        model="tiny", prompt=FOX, max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    stream.close()

    def idle() -> bool:
        stats = http.get("/server_info").json()["stats"]
        return bool(stats["requests_running"] == stats["requests_waiting"] == 0)

    wait_until(idle, 30, "the aborted stream to leave the batch")


# ---- /v1/models ----------------------------------------------------------------------------


def test_models_list_and_retrieve(oai: openai.OpenAI, http: httpx.Client) -> None:
    context = http.get("/server_info").json()["context_length"]
    [card] = oai.models.list().data
    assert (card.id, card.object, card.owned_by) == ("tiny", "model", "sglang")
    extra = card.model_dump()
    assert extra["root"] == "tiny" and extra["max_model_len"] == context and card.created > 0
    got = oai.models.retrieve("tiny")
    assert got.id == "tiny" and got.model_dump()["max_model_len"] == context
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4' does not exist"):
        oai.models.retrieve("gpt-4")


# ---- /v1/embeddings ------------------------------------------------------------------------


def test_embeddings_float_and_base64_equal_encode(
    oai: openai.OpenAI, http: httpx.Client, token_ids: Any
) -> None:
    inputs = ["Hello", "The quick brown fox"]
    native = http.post("/encode", json={"text": inputs}).json()
    want = [np.array(n["embedding"]) for n in native]
    floats = oai.embeddings.create(model="tiny", input=inputs, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and all(d.object == "embedding" for d in floats.data)
    for d, w in zip(floats.data, want, strict=True):
        np.testing.assert_allclose(d.embedding, w, atol=1e-5)
    assert (
        floats.usage.prompt_tokens
        == floats.usage.total_tokens
        == sum(n["meta_info"]["prompt_tokens"] for n in native)
    )
    # The client's default: it asks for base64 and decodes it itself.
    default = oai.embeddings.create(model="tiny", input=inputs)
    for d, w in zip(default.data, want, strict=True):
        np.testing.assert_allclose(d.embedding, w, atol=1e-5)
    raw = oai.embeddings.create(model="tiny", input=inputs[0], encoding_format="base64")
    packed = base64.b64decode(raw.data[0].embedding)  # type: ignore[arg-type]
    np.testing.assert_allclose(struct.unpack(f"<{len(packed) // 4}f", packed), want[0], atol=1e-5)
    by_ids = oai.embeddings.create(model="tiny", input=token_ids(inputs[1]), encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-5)
    by_id_lists = oai.embeddings.create(
        model="tiny", input=[token_ids(t) for t in inputs], encoding_format="float"
    )
    assert len(by_id_lists.data) == 2


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "kwargs", "message"),
    [
        ("completions", {"frequency_penalty": 0.5}, "frequency_penalty is unsupported by the CPU engine"),
        ("completions", {"suffix": "!"}, "suffix is unsupported by the CPU engine"),
        ("completions", {"best_of": 3}, "best_of is unsupported by the CPU engine"),
        ("completions", {"logprobs": 50}, "logprobs must be an integer between 0 and 20"),
        ("completions", {"max_tokens": 0}, "max_tokens must be at least 1"),
        ("completions", {"max_tokens": 10**6}, "max_tokens must be between"),
        ("completions", {"n": 0}, "n must be an integer >= 1"),
        ("completions", {"prompt": ""}, "prompt cannot be empty"),
        ("completions", {"prompt": [[1, 2], [10**9]]}, "prompt must be"),
        ("completions", {"temperature": -1}, "temperature must be >= 0"),
        ("completions", {"extra_body": {"temprature": 0}}, "unknown field 'temprature'"),
        ("completions", {"extra_body": {"stream_options": {"continuous_usage_stats": True}}},
         "stream_options.continuous_usage_stats is unsupported"),
        ("embeddings", {"dimensions": 8}, "dimensions is unsupported by the CPU engine"),
        ("embeddings", {"input": " "}, "input[0] cannot be empty or whitespace only"),
        ("embeddings", {"extra_body": {"encoding_format": "int8"}}, "encoding_format must be either"),
        ("embeddings", {"input": [{"text": "x"}]}, "input as multimodal objects is unsupported"),
    ],
)  # fmt: skip
def test_bad_requests_are_typed_and_name_the_field(
    oai: openai.OpenAI, route: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if route == "completions":
            oai.completions.create(**{"model": "tiny", "prompt": FOX, "max_tokens": 2, **kwargs})
        else:
            oai.embeddings.create(**{"model": "tiny", "input": "x", "encoding_format": "float", **kwargs})
    assert info.value.status_code == 400 and message in info.value.message
    assert isinstance(info.value.body, dict) and message in info.value.body["message"]


# ---- SGLang's shapes -----------------------------------------------------------------------


def test_responses_have_sglangs_shape(http: httpx.Client) -> None:
    body = {"prompt": "Hello", "max_tokens": 2, "logprobs": 2}
    want, got = (
        json.loads((FIXTURES / "completion.json").read_text()),
        http.post("/v1/completions", json=body).json(),
    )
    # top_logprobs is {token: logprob}: its keys are the tokens, so only its types compare.
    tops = got["choices"][0]["logprobs"].pop("top_logprobs")
    want["choices"][0]["logprobs"].pop("top_logprobs")
    assert_same_shape(want, got)
    assert all(isinstance(k, str) and isinstance(v, float) for top in tops for k, v in top.items())
    want = json.loads((FIXTURES / "embeddings.json").read_text())
    assert_same_shape(want, http.post("/v1/embeddings", json={"input": ["Hello", "The"]}).json())
    assert_same_shape(json.loads((FIXTURES / "models.json").read_text()), http.get("/v1/models").json())
    missing = http.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert_same_shape(json.loads((FIXTURES / "error_model_not_found.json").read_text()), missing.json())
    error = http.post("/v1/completions", json={"prompt": "x", "top_p": 5})
    assert error.status_code == 400
    assert_same_shape(json.loads((FIXTURES / "error_openai.json").read_text()), error.json())
    stream = {"prompt": "Hello", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=stream) as r:
        text = r.read().decode()
    want_events = events((FIXTURES / "completion_stream.sse").read_text())
    got_events = events(text)
    assert_same_shape(want_events[0], got_events[0], "first event")
    assert_same_shape(want_events[-1], got_events[-1], "last event")
    assert set(got_events[-1]["usage"]) == set(want_events[-1]["usage"])  # null fields left out


def test_requests_are_counted(http: httpx.Client) -> None:
    before = http.get("/server_info").json()["stats"]
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    http.post("/v1/embeddings", json={"input": "x"})
    after = http.get("/server_info").json()["stats"]
    assert after["completion_requests"] - before["completion_requests"] == 1
    assert after["embedding_requests"] - before["embedding_requests"] == 1
    assert after["generate_requests"] - before["generate_requests"] == 2
