"""Named hook points (``internals``) and ``input_embeds`` on the CPU engine, over real HTTP.

References come from plain transformers forward hooks on the same weights, loaded as the
engine loads them, run over the whole sequence (prompt + generated[:-1]) in this process.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.warmpool._cpu_engine_proc import running_engine
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

PROMPTS = [*KNOWN_COMPLETIONS, "Hello", "A", "Stars shine by fusing hydrogen into helium."]
POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


# ---- fixtures and helpers ------------------------------------------------------------------


def _engine(model: Path, tmp: Path, *extra: str) -> Iterator[httpx.Client]:
    args = ("--threads", "1", "--max-batch-size", "64", *extra)
    with running_engine(model, tmp, *args) as proc, httpx.Client(base_url=proc.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def kv(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """An engine with the KV cache (prefill + one-column decode forwards)."""
    yield from _engine(tiny_model_path, tmp_path_factory.mktemp("kv"))


@pytest.fixture(scope="module")
def nokv(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """An engine that recomputes the whole batch every step."""
    yield from _engine(tiny_model_path, tmp_path_factory.mktemp("nokv"), "--no-kv-cache")


@pytest.fixture(params=["kv", "nokv"])
def engine(request: pytest.FixtureRequest) -> httpx.Client:
    client: httpx.Client = request.getfixturevalue(request.param)
    assert client.get("/server_info").json()["kv_cache"] is (request.param == "kv")
    return client


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Any:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_path))


def _f32(arr: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _array(entry: dict[str, Any]) -> np.ndarray:
    assert entry["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"])


def _concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for i < n in n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(run, range(n)))


def _gen(client: httpx.Client, *, expect: int = 200, **body: Any) -> Any:
    r = client.post("/generate", json=body)
    assert r.status_code == expect, r.text
    return r.json()


def _greedy(client: httpx.Client, prompt: str, n: int, **body: Any) -> Any:
    params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    return _gen(client, text=prompt, sampling_params=params, return_logprob=True, **body)


def _reference(model: Any, ids: list[int]) -> dict[str, np.ndarray]:
    """Every hook point over ``ids``, from plain forward hooks on the test's own model."""
    import torch

    got: dict[str, np.ndarray] = {}
    handles = []

    def keep(name: str, pick: Callable[..., Any]) -> Callable[..., None]:
        def hook(*a: Any) -> None:
            got[name] = pick(*a)[0].detach().float().numpy().copy()

        return hook

    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        b = f"blocks.{i}."
        handles += [
            layer.register_forward_pre_hook(keep(b + "hook_resid_pre", lambda m, a: a[0])),
            layer.self_attn.register_forward_hook(keep(b + "hook_attn_out", lambda m, a, o: first(o))),
            layer.post_attention_layernorm.register_forward_pre_hook(
                keep(b + "hook_resid_mid", lambda m, a: a[0])
            ),
            layer.mlp.register_forward_hook(keep(b + "hook_mlp_out", lambda m, a, o: first(o))),
            layer.register_forward_hook(keep(b + "hook_resid_post", lambda m, a, o: first(o))),
        ]
    final = keep("ln_final.hook_normalized", lambda m, a, o: o)
    handles.append(model.model.norm.register_forward_hook(final))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _names(client: httpx.Client) -> list[str]:
    info = client.get("/model_info").json()
    assert info["internals"] == {"read": True, "write": True}
    return [p["name"] for p in info["hook_points"]]


# ---- reads equal a plain-transformers reference --------------------------------------------


def test_model_info_lists_hook_points(kv: httpx.Client, model: Any) -> None:
    info = kv.get("/model_info").json()
    hidden = model.config.hidden_size
    want = [f"blocks.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in POINTS]
    want.append("ln_final.hook_normalized")
    assert info["hook_points"] == [{"name": n, "shape": [hidden]} for n in want]
    # Nothing to read: an empty object; no field at all: no key.
    assert _greedy(kv, "Hello", 2, internals={})["meta_info"]["internals"] == {}
    assert _greedy(kv, "Hello", 2, internals={"read": [], "write": None})["meta_info"]["internals"] == {}
    assert "internals" not in _greedy(kv, "Hello", 2)["meta_info"]


def test_every_hook_point_read_in_a_batch_equals_reference(
    engine: httpx.Client, model: Any, tokenizer: Any
) -> None:
    names = _names(engine)
    reads = [{"hook": n, "positions": "all"} for n in names]
    prompt, n = "Stars shine by fusing hydrogen into helium.", 9

    def run(i: int) -> Any:
        if i == 0:
            return _greedy(engine, prompt, n, internals={"read": reads})
        return _greedy(engine, PROMPTS[i % len(PROMPTS)], 5 + i)

    before = engine.get("/server_info").json()["stats"]["max_batch_size_seen"]
    out = _concurrently(16, run)[0]
    assert engine.get("/server_info").json()["stats"]["max_batch_size_seen"] >= max(before, 2)
    ids = tokenizer(prompt)["input_ids"] + out["output_ids"][:-1]
    ref = _reference(model, ids)
    got = out["meta_info"]["internals"]
    assert sorted(got) == sorted(names)
    for name in names:
        assert got[name]["positions"] == list(range(len(ids))), name
        arr = _array(got[name])
        assert arr.shape == ref[name].shape, name
        assert np.abs(arr - ref[name]).max() <= 1e-4, name
    # Reading changes nothing: the same request without reads gives the same tokens.
    assert _greedy(engine, prompt, n)["output_ids"] == out["output_ids"]


def test_reductions_and_explicit_positions(engine: httpx.Client, model: Any, tokenizer: Any) -> None:
    prompt, n = "The quick brown", 6
    p = len(tokenizer(prompt)["input_ids"])
    reads = [
        {"hook": "blocks.0.hook_resid_post", "positions": "all", "reduce": "mean"},
        {"hook": "blocks.1.hook_resid_mid", "positions": "generated", "reduce": "last"},
        {"hook": "blocks.1.hook_attn_out", "positions": [p + 1, 0, 2, p + 40]},
        {"hook": "blocks.0.hook_mlp_out", "positions": "prompt"},
        {"hook": "ln_final.hook_normalized", "positions": [p + 40], "reduce": "mean"},
    ]
    out = _greedy(engine, prompt, n, internals={"read": reads})
    ids = tokenizer(prompt)["input_ids"] + out["output_ids"][:-1]
    ref = _reference(model, ids)
    got = out["meta_info"]["internals"]

    def close(name: str, want: np.ndarray) -> None:
        arr = _array(got[name])
        assert arr.shape == want.shape, name
        assert np.abs(arr - want).max() <= 1e-4, name

    close("blocks.0.hook_resid_post", ref["blocks.0.hook_resid_post"].mean(axis=0))
    assert got["blocks.1.hook_resid_mid"]["positions"] == list(range(p, p + n - 1))
    close("blocks.1.hook_resid_mid", ref["blocks.1.hook_resid_mid"][p + n - 2])
    # Sorted, and a position never reached (generation stopped first) is simply absent.
    assert got["blocks.1.hook_attn_out"]["positions"] == [0, 2, p + 1]
    close("blocks.1.hook_attn_out", ref["blocks.1.hook_attn_out"][[0, 2, p + 1]])
    close("blocks.0.hook_mlp_out", ref["blocks.0.hook_mlp_out"][:p])
    assert got["ln_final.hook_normalized"] == {"dtype": "float32", "shape": [0], "data": "", "positions": []}


# ---- writes stay in their own rows ---------------------------------------------------------


def test_writes_do_not_leak_into_other_rows(kv: httpx.Client, model: Any) -> None:
    rng = np.random.default_rng(0)
    hidden = model.config.hidden_size
    vec = rng.standard_normal(hidden).astype(np.float32) * 20
    write = {"hook": "blocks.0.hook_resid_post", "op": "add", "vector": _f32(vec), "positions": "all"}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    lengths = [6 + (i % 5) * 3 for i in range(16)]
    solo = [_greedy(kv, prompts[i], lengths[i]) for i in range(16)]

    def run(i: int) -> Any:
        extra = {"internals": {"write": [write]}} if i % 2 else {}
        return _greedy(kv, prompts[i], lengths[i], **extra)

    together = _concurrently(16, run)
    assert kv.get("/server_info").json()["stats"]["max_batch_size_seen"] >= 8
    for i, (a, b) in enumerate(zip(solo, together, strict=True)):
        lp_a = np.array([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lp_b = np.array([x[0] for x in b["meta_info"]["output_token_logprobs"]])
        if i % 2 == 0:
            assert b["output_ids"] == a["output_ids"], i
            assert np.abs(lp_a - lp_b).max() <= 1e-5, i
        else:
            assert b["output_ids"] != a["output_ids"] or np.abs(lp_a - lp_b).max() > 1e-2, i


def test_writes_in_both_modes_agree(kv: httpx.Client, nokv: httpx.Client, model: Any) -> None:
    hidden = model.config.hidden_size
    vec = np.random.default_rng(1).standard_normal((2, hidden)).astype(np.float32) * 5
    writes = [
        {"hook": "blocks.0.hook_resid_mid", "op": "add", "vector": _f32(vec), "positions": [1, 6]},
        {"hook": "blocks.1.hook_mlp_out", "op": "scale", "vector": _f32(vec[0]), "alpha": 0.5,
         "positions": "generated"},
        {"hook": "blocks.1.hook_attn_out", "op": "set", "vector": _f32(vec[1]), "positions": [2]},
    ]  # fmt: skip
    reads = [
        {"hook": "blocks.0.hook_resid_mid"},
        {"hook": "ln_final.hook_normalized"},
        {"hook": "blocks.1.hook_attn_out", "positions": [2]},
        {"hook": "blocks.0.hook_mlp_out"},
        {"hook": "blocks.0.hook_resid_post"},
    ]
    body = {"internals": {"write": writes, "read": reads}}
    a, b = (_greedy(c, "The quick brown", 8, **body) for c in (kv, nokv))
    assert a["output_ids"] == b["output_ids"] != _greedy(kv, "The quick brown", 8)["output_ids"]
    for name in ("blocks.0.hook_resid_mid", "ln_final.hook_normalized", "blocks.1.hook_attn_out"):
        ga, gb = a["meta_info"]["internals"][name], b["meta_info"]["internals"][name]
        assert ga["positions"] == gb["positions"]
        assert np.abs(_array(ga) - _array(gb)).max() <= 1e-4
    # A read sees the value after its own request's writes at that point (what flows on).
    assert np.array_equal(_array(a["meta_info"]["internals"]["blocks.1.hook_attn_out"]), vec[1:2])
    mid = "blocks.0.hook_resid_mid"
    plain = _greedy(kv, "The quick brown", 8, internals={"read": reads[:1]})
    diff = _array(a["meta_info"]["internals"][mid]) - _array(plain["meta_info"]["internals"][mid])
    assert np.abs(diff[1] - vec[0]).max() <= 1e-4  # position 1 sees only its own write
    assert np.abs(diff[0]).max() == 0.0
    # The residual stream carries the resid_mid write: resid_post = resid_mid + mlp_out.
    got = {k: _array(v) for k, v in a["meta_info"]["internals"].items()}
    carried = got["blocks.0.hook_resid_post"] - got["blocks.0.hook_mlp_out"] - got[mid]
    assert np.abs(carried).max() <= 1e-5


def test_write_equals_reference_with_the_same_edit(engine: httpx.Client, model: Any, tokenizer: Any) -> None:
    import torch

    prompt, n, hidden = "Hello", 7, model.config.hidden_size
    vec = np.random.default_rng(2).standard_normal(hidden).astype(np.float32) * 12
    write = {"hook": "blocks.0.hook_resid_post", "op": "add", "vector": _f32(vec), "alpha": 0.5}
    read = {"hook": "ln_final.hook_normalized"}
    out = _greedy(engine, prompt, n, internals={"write": [write], "read": [read]})
    assert out["output_ids"] != _greedy(engine, prompt, n)["output_ids"]
    ids = tokenizer(prompt)["input_ids"] + out["output_ids"][:-1]

    def edit(module: Any, args: Any, output: Any) -> Any:
        x = output[0] if isinstance(output, tuple) else output
        y = x + 0.5 * torch.from_numpy(vec)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = model.model.layers[0].register_forward_hook(edit)
    try:
        ref = _reference(model, ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()
    got = _array(out["meta_info"]["internals"]["ln_final.hook_normalized"])
    assert np.abs(got - ref["ln_final.hook_normalized"]).max() <= 1e-4
    # Greedy under the edit: each generated token is the edited model's argmax.
    prompt_len = len(ids) - (n - 1)
    assert logits[prompt_len - 1 :].argmax(dim=-1).tolist() == out["output_ids"]


def test_steering_vector_raises_target_token(kv: httpx.Client, model: Any, tokenizer: Any) -> None:
    import torch

    prompt = "The quick brown"
    p = len(tokenizer(prompt)["input_ids"])
    plain = _greedy(kv, prompt, 4)
    reads = [{"hook": "ln_final.hook_normalized", "positions": [p - 1], "reduce": "last"},
             {"hook": "blocks.1.hook_resid_post", "positions": [p - 1], "reduce": "last"}]  # fmt: skip
    base = _greedy(kv, prompt, 4, internals={"read": reads})
    # Reads change nothing: exactly the plain run's tokens and logprobs.
    assert base["output_ids"] == plain["output_ids"]
    assert base["meta_info"]["output_token_logprobs"] == plain["meta_info"]["output_token_logprobs"]
    unembed = model.lm_head.weight.detach().float().numpy()

    def probs(out: Any) -> np.ndarray:
        h = _array(out["meta_info"]["internals"]["ln_final.hook_normalized"])
        return torch.softmax(torch.from_numpy(unembed @ h), dim=-1).numpy()

    before = probs(base)
    target = int(np.argsort(before)[-10])  # a plausible token, not the one chosen
    resid = _array(base["meta_info"]["internals"]["blocks.1.hook_resid_post"])
    direction = unembed[target] / np.linalg.norm(unembed[target]) * np.linalg.norm(resid)
    write = {"hook": "blocks.1.hook_resid_post", "op": "add", "vector": _f32(direction)}
    write["positions"] = [p - 1]
    steered = _greedy(kv, prompt, 4, internals={"read": reads, "write": [write]})
    after = probs(steered)
    print(f"p(target={target}) first token: {before[target]:.4f} -> {after[target]:.4f}")
    assert after[target] > before[target] + 0.2
    first = steered["meta_info"]["output_token_logprobs"][0]
    assert abs(np.exp(first[0]) - after[first[1]]) <= 1e-4  # the read is what was sampled from


# ---- validation ----------------------------------------------------------------------------


def _bad_bodies(hidden: int) -> list[tuple[dict[str, Any], str]]:
    good = _f32(np.ones(hidden, dtype=np.float32))
    w = {"hook": "blocks.0.hook_resid_post", "op": "add", "vector": good}
    nan = _f32(np.full(hidden, np.nan, dtype=np.float32))
    return [
        ({"read": [{"hook": "blocks.9.hook_nope"}]}, "blocks.9.hook_nope"),
        ({"write": [{**w, "vector": _f32(np.ones(hidden + 1, dtype=np.float32))}]}, "write[0].vector.shape"),
        ({"write": [{**w, "vector": _f32(np.ones((2, hidden), dtype=np.float32))}]}, "explicit list"),
        ({"write": [{**w, "vector": {**good, "dtype": "float16"}}]}, "vector.dtype"),
        ({"write": [{**w, "vector": {**good, "data": good["data"][:-8]}}]}, "vector.data"),
        ({"write": [{**w, "vector": nan}]}, "non-finite"),
        ({"write": [{**w, "op": "mul"}]}, "internals.write[0].op"),
        ({"read": [{"hook": "ln_final.hook_normalized", "reduce": "max"}]}, "reduce"),
        ({"read": [{"hook": "ln_final.hook_normalized", "positions": "some"}]}, "positions"),
        ({"read": [{"hook": "ln_final.hook_normalized", "positions": [10**6]}]}, "context length"),
        ({"read": [{"hook": "ln_final.hook_normalized"}] * 2}, "read twice"),
    ]


def test_bad_internals_are_400_and_not_counted(kv: httpx.Client, model: Any) -> None:
    before = kv.get("/server_info").json()["stats"]["requests_total"]
    for internals, needle in _bad_bodies(model.config.hidden_size):
        r = kv.post("/generate", json={"text": "Hello", "internals": internals})
        assert r.status_code == 400, (internals, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.text)
    read = {"read": [{"hook": "ln_final.hook_normalized"}]}
    r = kv.post("/generate", json={"text": "Hello", "stream": True, "internals": read})
    assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_feature"
    unknown = kv.post("/generate", json={"text": "Hello", "internals": {"read": [{"hook": "nope"}]}})
    message = unknown.json()["error"]["message"]
    assert "'nope'" in message and "/model_info" in message
    assert kv.get("/server_info").json()["stats"]["requests_total"] == before


# ---- input_embeds --------------------------------------------------------------------------


def test_input_embeds_equal_input_ids(engine: httpx.Client, model: Any, tokenizer: Any) -> None:
    table = model.get_input_embeddings().weight.detach().float().numpy()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    want = [_gen(engine, input_ids=i, sampling_params=params) for i in ids]

    def run(i: int) -> Any:
        j = i % 4
        if i < 4:
            embeds = table[ids[j]].tolist()
            read = {"read": [{"hook": "blocks.0.hook_resid_pre", "positions": "prompt"}]}
            return _gen(engine, input_embeds=embeds, sampling_params=params, internals=read)
        return _gen(engine, input_ids=ids[j], sampling_params={**params, "max_new_tokens": 4 + i})

    got = _concurrently(8, run)[:4]
    for j in range(4):
        assert got[j]["output_ids"] == want[j]["output_ids"], j
        assert got[j]["text"] == want[j]["text"]
        assert got[j]["meta_info"]["prompt_tokens"] == len(ids[j])
        read = _array(got[j]["meta_info"]["internals"]["blocks.0.hook_resid_pre"])
        assert np.array_equal(read, table[ids[j]])
    batch = _gen(engine, input_embeds=[table[i].tolist() for i in ids[:2]], sampling_params=params)
    assert [o["output_ids"] for o in batch] == [w["output_ids"] for w in want[:2]]


def test_bad_input_embeds_are_400(kv: httpx.Client, model: Any) -> None:
    hidden = model.config.hidden_size
    for embeds, needle in [
        ([[0.0] * (hidden - 1)], "input_embeds"),
        ([], "input_embeds"),
        ([[float("nan")] * hidden], "finite"),
        ([["x"] * hidden], "finite"),
    ]:
        r = kv.post("/generate", content=json.dumps({"input_embeds": embeds}))  # NaN passes as JSON here
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"], r.text
    both = kv.post("/generate", json={"text": "Hi", "input_embeds": [[0.0] * hidden]})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
