"""The CPU engine accepts every SGLang request field at its default, and real clients work unchanged.

SGLang's field names and defaults come from tests/fixtures/sglang/fields.json. Clients: the
official ``openai`` package on ``/v1/chat/completions``, and SGLang's own frontend
(``sgl.function`` + ``sgl.gen`` on ``RuntimeEndpoint``), run in a subprocess from an
``sglang`` found on ``$FAAS_TEST_SGLANG_PATH`` or in the environment (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from warmpool.cpu_engine import _fields as F
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "sglang"
SGLANG: dict[str, dict[str, Any]] = json.loads((FIXTURES / "fields.json").read_text())
REQUIRED = "<required>"
HI = [{"role": "user", "content": "Hi"}]
PROMPT = "The quick brown"

# Fields the engine knows that SGLang's request models do not declare (SGLang ignores them).
NOT_SGLANG = {
    "GenerateReqInput": {"internals"},  # the CPU engine's hook-point reads and writes
    "EmbeddingReqInput": {"model"},
    "ChatCompletionRequest": {"reasoning"} | {
        "store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_options",
        "prompt_cache_retention", "safety_identifier", "verbosity", "web_search_options",
        "prediction", "audio", "modalities", "functions", "function_call", "moderation",
    },
    "StreamOptions": {"include_obfuscation"},
    "ChatMessage": {"refusal", "annotations", "audio", "function_call"},
}  # fmt: skip
TABLES = {
    "GenerateReqInput": (F.GENERATE_PARSED, F.GENERATE_IGNORED, F.GENERATE_UNSUPPORTED),
    "SamplingParams": (F.SAMPLING_PARSED, frozenset(), F.SAMPLING_UNSUPPORTED),
    "EmbeddingReqInput": (F.ENCODE_PARSED, F.ENCODE_IGNORED, F.ENCODE_UNSUPPORTED),
    "ChatCompletionRequest": (F.CHAT_PARSED, F.CHAT_IGNORED, F.CHAT_UNSUPPORTED),
    "StreamOptions": (F.STREAM_OPTIONS_PARSED, F.STREAM_OPTIONS_IGNORED, F.STREAM_OPTIONS_UNSUPPORTED),
    "ChatMessage": (F.MESSAGE_PARSED, F.MESSAGE_IGNORED, F.MESSAGE_UNSUPPORTED),
    "CompletionRequest": (F.COMPLETION_PARSED, F.COMPLETION_IGNORED, F.COMPLETION_UNSUPPORTED),
    "EmbeddingRequest": (F.EMBEDDING_PARSED, F.EMBEDDING_IGNORED, F.EMBEDDING_UNSUPPORTED),
}


def defaults(kind: str) -> dict[str, Any]:
    return {k: v for k, v in SGLANG[kind].items() if v != REQUIRED}


def non_default(default: Any) -> Any:
    """A value that asks for something, given SGLang's default."""
    if default is None:
        return "x"
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 2
    return {"x": 1.0} if isinstance(default, dict) else ["x"]


# ---- the tables cover SGLang's fields ------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_every_sglang_field_is_parsed_ignored_or_unsupported(kind: str) -> None:
    parsed, ignored, unsupported = TABLES[kind]
    groups = [set(parsed), set(ignored), set(unsupported)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    known = set().union(*groups)
    assert set(SGLANG[kind]) <= known, sorted(set(SGLANG[kind]) - known)
    assert known - set(SGLANG[kind]) == NOT_SGLANG.get(kind, set())
    for name, default in unsupported.items():
        if name in SGLANG[kind]:
            assert default == SGLANG[kind][name], name


# ---- every field at its default is accepted ------------------------------------------------


def test_generate_with_every_field_at_its_default(http: httpx.Client) -> None:
    params = {**defaults("SamplingParams"), "max_new_tokens": 16, "temperature": 0}
    body = {**defaults("GenerateReqInput"), "text": PROMPT, "sampling_params": params}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == KNOWN_COMPLETIONS[PROMPT]


def test_encode_with_every_field_at_its_default(http: httpx.Client) -> None:
    plain = http.post("/encode", json={"text": PROMPT}).json()
    r = http.post("/encode", json={**defaults("EmbeddingReqInput"), "text": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["embedding"] == pytest.approx(plain["embedding"], abs=1e-5)


def test_chat_with_every_field_at_its_default(http: httpx.Client) -> None:
    message = {**defaults("ChatMessage"), "role": "user", "content": "Hi"}
    base = {"messages": HI, "max_tokens": 8, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    body = {**defaults("ChatCompletionRequest"), **base, "messages": [message]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain
    streamed = {**body, "stream": True, "stream_options": defaults("StreamOptions")}
    with http.stream("POST", "/v1/chat/completions", json=streamed) as s:
        assert s.status_code == 200
        lines = [x for x in s.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == plain


def test_completion_and_embedding_with_every_field_at_its_default(http: httpx.Client) -> None:
    body = {**defaults("CompletionRequest"), "prompt": PROMPT, "temperature": 0, "max_tokens": 32}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == KNOWN_COMPLETIONS[PROMPT]
    plain = http.post("/encode", json={"text": PROMPT}).json()
    r = http.post("/v1/embeddings", json={**defaults("EmbeddingRequest"), "input": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"] == pytest.approx(plain["embedding"], abs=1e-5)


def test_sglang_client_generate_body(http: httpx.Client) -> None:
    """The exact body SGLang's RuntimeEndpoint sends for ``sgl.gen(max_tokens=16, temperature=0)``.

    Its ``SglSamplingParams`` default ``stop_regex=()`` arrives as ``"stop_regex": []``,
    which the engine used to refuse as an unsupported feature.
    """
    body = json.loads((FIXTURES / "lang_generate_body.json").read_text())
    assert body["sampling_params"]["stop_regex"] == []
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == KNOWN_COMPLETIONS[body["text"]]


def test_per_prompt_logprob_options_that_agree(http: httpx.Client) -> None:
    body = {"text": ["Hi", "Jupiter is"], "sampling_params": {"max_new_tokens": 2}}
    r = http.post("/generate", json={**body, "return_logprob": [True, True], "logprob_start_len": [-1, -1]})
    assert r.status_code == 200, r.text
    assert all(len(o["meta_info"]["output_token_logprobs"]) == 2 for o in r.json())
    mixed = http.post("/generate", json={**body, "return_logprob": [True, False]})
    assert mixed.status_code == 400 and "return_logprob" in mixed.json()["error"]["message"]


# ---- a feature actually used is refused, naming the field ----------------------------------


def _cases() -> list[Any]:
    cases = []
    for name, default in F.GENERATE_UNSUPPORTED.items():
        cases.append(pytest.param("/generate", {"text": "x", name: non_default(default)}, name, id=name))
    for name, default in F.SAMPLING_UNSUPPORTED.items():
        body = {"text": "x", "sampling_params": {name: non_default(default)}}
        cases.append(pytest.param("/generate", body, f"sampling_params.{name}", id=f"sampling_params.{name}"))
    for name, default in F.ENCODE_UNSUPPORTED.items():
        cases.append(
            pytest.param("/encode", {"text": "x", name: non_default(default)}, name, id=f"encode.{name}")
        )
    # Sorted: the ids must come in one order in every process (pytest-xdist compares them).
    chat_sampling = {
        k: F.SAMPLING_UNSUPPORTED[k] for k in sorted(F.CHAT_PARSED & F.SAMPLING_UNSUPPORTED.keys())
    }
    for name, default in {**F.CHAT_UNSUPPORTED, **chat_sampling}.items():
        body = {"messages": HI, name: non_default(default)}
        cases.append(pytest.param("/v1/chat/completions", body, name, id=f"chat.{name}"))
    for name, default in F.MESSAGE_UNSUPPORTED.items():
        body = {"messages": [{**HI[0], name: non_default(default)}]}
        cases.append(pytest.param("/v1/chat/completions", body, f"messages[0].{name}", id=f"message.{name}"))
    body = {"messages": HI, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    cases.append(pytest.param("/v1/chat/completions", body, "stream_options.continuous_usage_stats", id="so"))
    # n is implemented on /v1/completions (n copies of each prompt), so it is no case there.
    completion_sampling = {
        k: F.SAMPLING_UNSUPPORTED[k]
        for k in sorted(F.COMPLETION_PARSED & F.SAMPLING_UNSUPPORTED.keys() - {"n"})
    }
    for name, default in {**F.COMPLETION_UNSUPPORTED, **completion_sampling}.items():
        body = {"prompt": "x", name: non_default(default)}
        cases.append(pytest.param("/v1/completions", body, name, id=f"completion.{name}"))
    for name, default in F.EMBEDDING_UNSUPPORTED.items():
        body = {"input": "x", name: non_default(default)}
        cases.append(pytest.param("/v1/embeddings", body, name, id=f"embedding.{name}"))
    return cases


@pytest.mark.parametrize(("path", "body", "field"), _cases())
def test_unsupported_feature_in_use_is_400_naming_it(
    http: httpx.Client, path: str, body: Any, field: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json() if path.startswith("/v1") else r.json()["error"]
    assert error["type"] == "unsupported_feature"
    assert error["message"].startswith(f"{field} ") and "unsupported by the CPU engine" in error["message"]


def test_unknown_fields_are_still_refused(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": HI, "temprature": 0})
    assert r.status_code == 400 and "temprature" in r.json()["message"]
    r = http.post("/generate", json={"text": "x", "sampling_params": {"max_tokens": 3}})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


# ---- the official openai client ------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(url: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def test_openai_client_chat(oai: openai.OpenAI, http: httpx.Client) -> None:
    raw = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 8, "temperature": 0}).json()
    out = oai.chat.completions.create(
        model="tiny", messages=HI, max_tokens=8, temperature=0, seed=3, logprobs=True, top_logprobs=2
    )
    [choice] = out.choices
    assert (
        choice.message.role == "assistant"
        and choice.message.content == raw["choices"][0]["message"]["content"]
    )
    assert out.model == "tiny" and choice.finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens == len(choice.logprobs.content)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    # max_completion_tokens (the newer spelling), stop, and the reply sent back as the client returns it
    reply = choice.message.model_dump()
    again = oai.chat.completions.create(
        model="tiny", messages=[*HI, reply, {"role": "user", "content": "Again"}],
        max_completion_tokens=4, temperature=0, stop=["\n"],
    )  # fmt: skip
    assert again.usage is not None and again.usage.completion_tokens <= 4


def test_openai_client_stream(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
    stream = oai.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_openai_client_sees_unsupported_features_as_bad_requests(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=4, frequency_penalty=0.5)
    assert "frequency_penalty is unsupported by the CPU engine" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="n is unsupported"):
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=4, n=2)
    # OpenAI parameters SGLang does not declare are ignored, as SGLang does.
    ok = oai.chat.completions.create(
        model="tiny", messages=HI, max_tokens=2, store=False, metadata={"a": "b"}
    )
    assert ok.choices[0].message.content is not None


# ---- SGLang's own client -------------------------------------------------------------------


def test_sglang_frontend_client(url: str) -> None:
    # The README's test command installs SGLang's client (--no-deps) into .venv/sglang-client.
    default = ROOT / ".venv" / "sglang-client"
    extra = os.environ.get("FAAS_TEST_SGLANG_PATH", str(default) if default.is_dir() else "")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra, os.environ.get("PYTHONPATH")) if p),
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.warmpool._sglang_lang_client", url],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    if out.returncode == 3:
        if os.environ.get("CI"):  # CI installs it: a skip there would hide a broken client test
            pytest.fail(out.stderr)
        pytest.skip(
            f"{out.stderr.strip()}. Install it with `pip install --no-deps --target DIR sglang==0.5.23` "
            "and `pip install --target DIR aiohttp msgspec pybase64`, then set FAAS_TEST_SGLANG_PATH=DIR."
        )
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads(out.stdout)
    assert got["version"].startswith("0.5.")
    assert got["gen"] == KNOWN_COMPLETIONS["The quick brown"]
    assert got["meta"]["finish_reason"]["type"] == "stop" and got["meta"]["completion_tokens"] > 0
    assert got["batch"] == [KNOWN_COMPLETIONS["Jupiter is"], KNOWN_COMPLETIONS["Two plus two"]]
    assert got["stream"] == KNOWN_COMPLETIONS["Water boils at"]
    # A feature the engine lacks, actually used: a clear error that names it.
    assert "sampling_params.regex is unsupported by the CPU engine" in got["regex_error"]
