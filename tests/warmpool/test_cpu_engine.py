"""The CPU engine as a real server process, driven over HTTP like SGLang."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.warmpool._cpu_engine_proc import START_TIMEOUT_S, running_engine, start, stop, wait_until
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS


@dataclass
class Engine:
    proc: Any
    url: str
    client: httpx.Client
    port_file: Path
    log: Path

    def generate(self, **body: Any) -> httpx.Response:
        return self.client.post("/generate", json=body)

    def greedy(self, text: str | list[str], **params: Any) -> Any:
        r = self.generate(text=text, sampling_params={"temperature": 0, **params})
        assert r.status_code == 200, r.text
        return r.json()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.get("/server_info").json()["stats"]
        return stats


_wait_until = wait_until


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    tmp = tmp_path_factory.mktemp("cpu-engine")
    extra = ("--threads", "1", "--max-batch-size", "64", "--served-model-name", "tiny")
    with (
        running_engine(tiny_model_path, tmp, *extra) as proc,
        httpx.Client(base_url=proc.url, timeout=60) as c,
    ):
        yield Engine(proc.proc, proc.url, c, proc.port_file, proc.log)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_path / "tokenizer.json"))


# ---- shapes and plain generation ---------------------------------------------------------------


def test_port_file_and_single_response_shape(engine: Engine) -> None:
    assert engine.port_file.read_text().strip().isdigit()
    assert [p.name for p in engine.port_file.parent.iterdir() if ".tmp" in p.name] == []
    out = engine.greedy("The quick brown", max_new_tokens=16)
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"} <= set(meta)
    assert isinstance(meta["id"], str) and meta["id"]
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert meta["prompt_tokens"] > 0 and meta["cached_tokens"] == 0
    assert 0 < meta["e2e_latency"] < 60


def test_greedy_known_completions(engine: Engine) -> None:
    for prompt, expected in KNOWN_COMPLETIONS.items():
        out = engine.greedy(prompt, max_new_tokens=32)
        assert out["text"] == expected, prompt
        # Stopped by eos: SGLang reports the token id and keeps it in output_ids, not in text.
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": out["output_ids"][-1]}


def test_batch_text_and_rids(engine: Engine) -> None:
    prompts = list(KNOWN_COMPLETIONS)[:4]
    rids = [f"batch-{i}" for i in range(len(prompts))]
    r = engine.generate(text=prompts, rid=rids, sampling_params={"temperature": 0})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list)
    assert [o["text"] for o in outs] == [KNOWN_COMPLETIONS[p] for p in prompts]
    assert [o["meta_info"]["id"] for o in outs] == rids


def test_input_ids(engine: Engine, tokenizer: Any) -> None:
    prompts = list(KNOWN_COMPLETIONS)[:3]
    ids = [tokenizer.encode(p).ids for p in prompts]
    single = engine.generate(input_ids=ids[0], sampling_params={"temperature": 0}).json()
    assert single["text"] == KNOWN_COMPLETIONS[prompts[0]]
    assert single["meta_info"]["prompt_tokens"] == len(ids[0])
    batch = engine.generate(input_ids=ids, sampling_params={"temperature": 0}).json()
    assert [o["text"] for o in batch] == [KNOWN_COMPLETIONS[p] for p in prompts]


def test_max_new_tokens_gives_length(engine: Engine) -> None:
    out = engine.greedy("The quick brown", max_new_tokens=3)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) == 3
    assert KNOWN_COMPLETIONS["The quick brown"].startswith(out["text"])


def test_stop_string_is_trimmed(engine: Engine) -> None:
    out = engine.greedy("The quick brown", stop=[" lazy", " over"])
    assert out["text"] == " fox jumps"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " over"}
    kept = engine.greedy("The quick brown", stop=" over", no_stop_trim=True)
    assert kept["text"] == " fox jumps over"


# ---- batching ------------------------------------------------------------------------------


def _concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for i < n in n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(run, range(n)))


def test_16_concurrent_requests_share_steps(engine: Engine) -> None:
    before = engine.stats()
    prompts = [list(KNOWN_COMPLETIONS)[i % len(KNOWN_COMPLETIONS)] for i in range(16)]
    outs = _concurrently(16, lambda i: engine.greedy(prompts[i], max_new_tokens=32)["text"])
    assert outs == [KNOWN_COMPLETIONS[p] for p in prompts]
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    rows = after["mean_batch_size"] * after["steps"] - before["mean_batch_size"] * before["steps"]
    assert rows / steps > 1.0, (before, after)
    assert after["mean_batch_size"] > 1.0 and after["max_batch_size_seen"] > 1
    assert after["requests_total"] - before["requests_total"] == 16
    assert after["generate_requests"] - before["generate_requests"] == 16
    assert after["requests_running"] == after["requests_waiting"] == 0


def test_greedy_alone_equals_batched(engine: Engine) -> None:
    # ignore_eos and varied lengths: rows join and leave the batch at different steps.
    prompts = [*KNOWN_COMPLETIONS, "Hello", "A", "Stars shine by fusing hydrogen into helium."]
    lengths = [5 + 7 * i for i in range(len(prompts))]

    def ids(i: int) -> list[int]:
        out = engine.greedy(prompts[i], max_new_tokens=lengths[i], ignore_eos=True)
        assert out["meta_info"]["completion_tokens"] == lengths[i]
        return list(out["output_ids"])

    alone = [ids(i) for i in range(len(prompts))]
    assert _concurrently(len(prompts), ids) == alone
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lengths]
    batch = engine.generate(text=prompts, sampling_params=params).json()
    assert [o["output_ids"] for o in batch] == alone


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    def sample(seed: int, temperature: float = 1.0) -> str:
        r = engine.generate(
            text="Hello",
            sampling_params={"temperature": temperature, "sampling_seed": seed,
                             "max_new_tokens": 24, "ignore_eos": True},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        text: str = r.json()["text"]
        return text

    first = sample(1234)
    assert sample(1234) == first
    # Also inside a batch of other (unseeded, sampled) requests: the row's own generator.
    noise = lambda i: engine.generate(text="The", sampling_params={"max_new_tokens": 20})  # noqa: E731
    together = _concurrently(6, lambda i: sample(1234) if i % 2 == 0 else noise(i))
    assert together[0] == together[2] == together[4] == first
    assert len({sample(s, temperature=2.0) for s in range(6)}) > 1


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "x", "sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"text": "x", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "x", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"text": "x", "sampling_params": {"top_k": 0}}, "top_k"),
        ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"text": "x", "sampling_params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
        ({"text": "x", "sampling_params": {"max_new_tokens": "5"}}, "max_new_tokens"),
        ({"text": "x", "sampling_params": {"bogus_knob": 1}}, "bogus_knob"),
        ({"text": "x", "sampling_params": {"stop": 5}}, "stop"),
        ({"text": "x", "sampling_params": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
        ({"text": "x", "sampling_params": [{}, {}]}, "sampling_params"),
        ({"sampling_params": {}}, "text"),
        ({"text": "x", "input_ids": [1]}, "input_ids"),
        ({"text": 5}, "text"),
        ({"input_ids": [1, 10**9]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"text": "x", "unknown_top_level": 1}, "unknown_top_level"),
        ({"text": "x", "rid": 7}, "rid"),
        ({"text": ["a", "b"], "rid": ["same", "same"]}, "rid"),
    ],
)
def test_bad_request_is_400_naming_the_field(engine: Engine, body: Any, field: str) -> None:
    r = engine.generate(**body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_invalid_json_is_400(engine: Engine) -> None:
    r = engine.client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"sampling_params": {"regex": "[a-z]+"}},
        {"sampling_params": {"json_schema": "{}"}},
        {"sampling_params": {"ebnf": "root ::= 'a'"}},
        {"sampling_params": {"frequency_penalty": 0.5}},
        {"sampling_params": {"n": 2}},
        {"image_data": "http://example.invalid/cat.png"},
        {"logprob_start_len": 0, "return_logprob": True},
    ],
)
def test_unsupported_feature_is_400(engine: Engine, body: dict[str, Any]) -> None:
    r = engine.generate(text="The quick brown", **body)
    assert r.status_code == 400, r.text
    assert "unsupported by the CPU engine" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "unsupported_feature"


# ---- abort ---------------------------------------------------------------------------------


def test_abort_running_request_frees_its_slot(engine: Engine) -> None:
    rid = "long-running-1"
    body = {"text": "Hello", "rid": rid, "sampling_params": {"max_new_tokens": 480, "ignore_eos": True}}
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(engine.client.post, "/generate", json=body)
        _wait_until(lambda: engine.stats()["requests_running"] >= 1, 30, "the request to run")
        # The rid is taken while in flight.
        dup = engine.generate(text="x", rid=rid)
        assert dup.status_code == 400 and rid in dup.json()["error"]["message"]
        assert engine.client.post("/abort_request", json={"rid": rid}).status_code == 200
        r = fut.result(timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["id"] == rid
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 480
    _wait_until(lambda: engine.stats()["requests_running"] == 0, 10, "the slot to be freed")
    # Unknown rids are fine too, and the engine still serves.
    assert engine.client.post("/abort_request", json={"rid": "no-such"}).status_code == 200
    assert engine.greedy("Two plus two")["text"] == KNOWN_COMPLETIONS["Two plus two"]


# ---- logprobs and streaming ----------------------------------------------------------------


def test_return_logprob(engine: Engine) -> None:
    r = engine.generate(
        text="Water boils at", return_logprob=True, top_logprobs_num=3,
        sampling_params={"temperature": 0},
    )  # fmt: skip
    out = r.json()
    meta = out["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[0] <= 0 and e[2] is None for e in meta["output_token_logprobs"])
    assert len(meta["output_top_logprobs"]) == len(out["output_ids"])
    for top, tok in zip(meta["output_top_logprobs"], out["output_ids"], strict=True):
        assert len(top) == 3 and top[0][1] == tok  # greedy picks the top-1 token
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_stream(engine: Engine) -> None:
    body = {"text": "Jupiter is", "stream": True, "sampling_params": {"temperature": 0}}
    with engine.client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) > 1
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == KNOWN_COMPLETIONS["Jupiter is"]
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_stream_holds_back_a_partial_stop_string(engine: Engine) -> None:
    # " lazy" could start the stop string " lazy cat": it is held back until " dog" rules it out.
    body = {
        "text": "The quick brown",
        "stream": True,
        "sampling_params": {"temperature": 0, "stop": [" lazy cat"]},
    }
    with engine.client.stream("POST", "/generate", json=body) as r:
        events = [json.loads(x.removeprefix("data: ")) for x in r.iter_lines() if x and x != "data: [DONE]"]
    texts = [e["text"] for e in events]
    assert texts[-1] == KNOWN_COMPLETIONS["The quick brown"]
    assert all(texts[-1].startswith(t) for t in texts)  # streamed text only ever grows
    assert not any(t.endswith(" lazy") for t in texts[:-1])


# ---- hidden states, /encode, chat ------------------------------------------------------------


def test_hidden_states_match_transformers(engine: Engine, tiny_model_path: Path) -> None:
    import torch
    import transformers

    prompts = ["The quick brown", "Hello", "Stars shine by fusing hydrogen"]
    body = {"text": prompts, "return_hidden_states": True, "sampling_params": {"temperature": 0}}
    outs = engine.generate(**body, rid=[f"hs-{i}" for i in range(3)]).json()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_path))
    for prompt, out in zip(prompts, outs, strict=True):
        meta, ids = out["meta_info"], tok(prompt)["input_ids"]
        hs = meta["hidden_states"]
        # SGLang's layout: the prompt's block, then one vector per later step.
        assert len(hs) == meta["completion_tokens"] and len(hs[0]) == meta["prompt_tokens"] == len(ids)
        assert all(len(v) == 64 and isinstance(v[0], float) for v in hs[1:])
        rows = torch.tensor([*hs[0], *hs[1:]])
        with torch.no_grad():
            want = model(torch.tensor([ids + out["output_ids"][:-1]]), output_hidden_states=True)
        assert torch.allclose(rows, want.hidden_states[-1][0], atol=1e-4)
    plain = engine.greedy("Hello")
    assert "hidden_states" not in plain["meta_info"]
    streamed = engine.generate(text="x", stream=True, return_hidden_states=True)
    assert streamed.status_code == 400 and streamed.json()["error"]["type"] == "unsupported_feature"


def test_encode_endpoint(engine: Engine) -> None:
    single = engine.client.post("/encode", json={"text": "The quick brown fox", "rid": "enc-1"})
    assert single.status_code == 200, single.text
    out = single.json()
    assert set(out) == {"embedding", "meta_info"} and len(out["embedding"]) == 64
    assert out["meta_info"]["id"] == "enc-1" and out["meta_info"]["prompt_tokens"] == 5
    assert abs(sum(x * x for x in out["embedding"]) - 1.0) < 1e-5  # L2-normalised
    batch = engine.client.post("/encode", json={"input_ids": [[1, 5, 9], [1, 7]]}).json()
    assert [len(b["embedding"]) for b in batch] == [64, 64]
    bad = engine.client.post("/encode", json={"text": "x", "dimensions": 8})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "unsupported_feature"
    assert engine.client.post("/encode", json={"txt": "x"}).status_code == 400


def test_chat_endpoint(engine: Engine) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "rid": "chat-1",
    }
    out = engine.client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["id"] == "chat-1" and out["model"] == "tiny"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 4 and out["usage"]["prompt_tokens"] > 3
    with engine.client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "rid": "c2"}
    ) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert deltas == choice["message"]["content"]
    role = engine.client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert role.status_code == 400 and "Roles must be" in role.json()["message"]
    tools = engine.client.post("/v1/chat/completions", json={**body, "tools": [{"type": "function"}]})
    assert tools.status_code == 400 and tools.json()["type"] == "unsupported_feature"
    long = engine.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi " * 600}]}
    )
    assert long.status_code == 400 and "context length" in long.json()["message"]


def test_every_work_request_is_counted(engine: Engine) -> None:
    before = engine.stats()
    engine.client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
    engine.client.post("/generate", json={"text": "x", "sampling_params": {"bogus": 1}})  # refused: counted
    engine.client.post("/encode", json={"text": "x"})
    engine.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    )
    assert engine.client.get("/health_generate").status_code == 200
    after = engine.stats()
    assert after["generate_requests"] - before["generate_requests"] == 4
    assert after["encode_requests"] - before["encode_requests"] == 1
    assert after["chat_requests"] - before["chat_requests"] == 1
    assert after["requests_total"] - before["requests_total"] == 3  # health checks do not count


# ---- info endpoints ------------------------------------------------------------------------


def test_health_endpoints(engine: Engine) -> None:
    assert engine.client.get("/health").status_code == 200
    assert engine.client.get("/health_generate").status_code == 200


def test_model_info(engine: Engine, tiny_model_path: Path) -> None:
    info = engine.client.get("/model_info").json()
    # hook_points, internals and batched_streams are the engine's own (test_internals_engine
    # and test_coalesce_engine check them).
    own = ("hook_points", "internals", "batched_streams")
    assert {k: v for k, v in info.items() if k not in own} == {
        "model_path": str(tiny_model_path),
        "tokenizer_path": str(tiny_model_path),
        "is_generation": True,
        "served_model_name": "tiny",
    }
    assert info["internals"] == {"read": True, "write": True} and info["hook_points"]


def test_server_info(engine: Engine) -> None:
    info = engine.client.get("/server_info").json()
    assert info["pid"] == engine.proc.pid
    assert info["device"] == "cpu" and info["max_batch_size"] == 64
    assert info["served_model_name"] == "tiny" and info["version"]
    startup = info["startup"]
    assert 0 < startup["import_seconds"] <= startup["total_seconds"]
    assert 0 < startup["load_seconds"] <= startup["total_seconds"]
    assert set(info["stats"]) >= {
        "requests_total", "requests_running", "requests_waiting", "generate_requests",
        "steps", "mean_batch_size", "max_batch_size_seen", "tokens_generated",
    }  # fmt: skip


def test_usage_counters_are_exact_and_shares_add_up_to_busy_time(engine: Engine) -> None:
    def idle() -> bool:
        stats = engine.stats()
        return bool(stats["requests_running"] == stats["requests_waiting"] == 0)

    _wait_until(idle, 60, "the engine to be idle")
    before = engine.stats()
    prompts = [f"The quick brown {'fox ' * i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # concurrent: they share forward steps
        outs = list(pool.map(lambda p: engine.greedy(p, max_new_tokens=4 + len(p) % 5), prompts))
    outs += engine.greedy(["Once upon", "a time there"], max_new_tokens=3)
    after = engine.stats()
    metas = [o["meta_info"] for o in outs]
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(
        m["prompt_tokens"] for m in metas
    )
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated == sum(m["completion_tokens"] for m in metas)
    busy = after["busy_seconds"] - before["busy_seconds"]
    assert busy == pytest.approx(sum(m["engine_share_seconds"] for m in metas), rel=1e-6)
    assert all(0 < m["engine_share_seconds"] <= m["e2e_latency"] for m in metas)
    assert after["cached_tokens_total"] == 0


def test_no_kv_cache_mode_gives_the_same_tokens(
    engine: Engine, tiny_model_path: Path, tmp_path: Path
) -> None:
    prompts = [*KNOWN_COMPLETIONS, "Hello"]
    params = [{"temperature": 0, "max_new_tokens": 6 + 5 * i, "ignore_eos": True} for i in range(7)]
    body = {"text": prompts, "sampling_params": params, "return_hidden_states": True}
    first = engine.generate(**body).json()
    expected = [o["output_ids"] for o in first]
    proc = start(tiny_model_path, tmp_path, "--threads", "1", "--no-kv-cache")
    try:
        port_file = tmp_path / "port"
        _wait_until(port_file.exists, START_TIMEOUT_S, "the port file")
        with httpx.Client(base_url=f"http://127.0.0.1:{int(port_file.read_text())}") as client:

            def healthy() -> bool:
                try:
                    return client.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_until(healthy, START_TIMEOUT_S, "/health")
            assert client.get("/server_info").json()["kv_cache"] is False
            got = client.post("/generate", json=body, timeout=60).json()
    finally:
        stop(proc)
    assert [o["output_ids"] for o in got] == expected
    for a, b in zip(first, got, strict=True):
        flat = [np.atleast_2d(np.asarray(x["meta_info"]["hidden_states"][0])) for x in (a, b)]
        assert np.allclose(flat[0], flat[1], atol=1e-4)  # the prompt block, from both paths
        assert np.allclose(
            a["meta_info"]["hidden_states"][1:], b["meta_info"]["hidden_states"][1:], atol=1e-4
        )


def test_bad_model_path_exits_nonzero(tmp_path: Path) -> None:
    proc = start(tmp_path / "missing-model", tmp_path)
    try:
        assert proc.wait(timeout=START_TIMEOUT_S) == 1
    finally:
        stop(proc)
    assert "loading the model failed" in (tmp_path / "engine.log").read_text()
