"""Model internals on the one invocation path: decorated functions, real workers, the real CPU engine.

Reads and writes of named hook points from a function, the vector of a write from the object
store, the provenance record of the spec (vectors by digest), and the model's modes refusing
internals before any engine request. (The tenant's ``internals`` scope is tested through the
service in test_service_internals.py; the engine's numbers against plain transformers hooks in
tests/warmpool/test_internals_engine.py.)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import faas
from registry import ModelSpec
from warmpool import ReplicaState

HIDDEN = 64  # the tiny Llama's hidden size
GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
PROMPT = "The quick brown"


@faas.function(model="steerable", timeout=120)
def read(model: faas.Model, prompt: str, hooks: list[str], positions: Any = "all") -> dict[str, Any]:
    spec = faas.Internals(read=[faas.Read(h, positions=positions) for h in hooks])
    out = model.generate(prompt, GREEDY, internals=spec)
    return {"arrays": out.internals, "positions": out.internals_positions, "ids": out.output_ids}


@faas.function(model="steerable", timeout=120)
def steer(model: faas.Model, prompt: str, vector: Any, alpha: float) -> dict[str, Any]:
    write = faas.Write("blocks.1.hook_resid_post", op="add", vector=vector, alpha=alpha, positions="prompt")
    out = model.generate(prompt, GREEDY, return_logprob=True, internals=faas.Internals(write=[write]))
    return {"ids": out.output_ids, "logprobs": out.logprobs}


@faas.function(model="steerable", timeout=120)
def hook_points(model: faas.Model) -> dict[str, tuple[int, ...]]:
    return model.hook_points()


@faas.function(model="reader", timeout=120)
def write_on_reader(model: faas.Model, prompt: str) -> list[int]:
    write = faas.Write("blocks.0.hook_resid_post", vector=np.ones(HIDDEN, np.float32))
    return model.generate(prompt, GREEDY, internals=faas.Internals(write=[write])).output_ids  # type: ignore[union-attr]


@faas.function(model="reader", timeout=120)
def read_on_reader(model: faas.Model, prompt: str) -> tuple[int, ...]:
    spec = faas.Internals(read=[faas.Read("blocks.0.hook_mlp_out", reduce="mean")])
    out = model.generate(prompt, GREEDY, internals=spec)
    return out.internals["blocks.0.hook_mlp_out"].shape  # type: ignore[union-attr,index]


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    c = faas.Client(store=tmp_path_factory.mktemp("store").as_uri(), workers=2)
    path = str(tiny_model_path)
    c.registry.register_model(ModelSpec(name="steerable", model_path=path))
    c.registry.register_model(ModelSpec(name="reader", model_path=path, modes=["generate", "internals_read"]))
    yield c
    c.shutdown()


def generate_requests(client: faas.Client, ref: str) -> int:
    [replica] = [r for r in client.pool.replicas(ref) if r.state is ReplicaState.READY]
    info = httpx.get(f"{replica.url}/server_info", timeout=10).json()
    return int(info["stats"]["generate_requests"])


def test_hook_points_are_listed_with_their_shapes(client: faas.Client) -> None:
    points = hook_points.with_client(client).remote()
    assert points["ln_final.hook_normalized"] == (HIDDEN,)
    assert {
        f"blocks.0.hook_{k}" for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    } <= set(points)
    assert all(shape == (HIDDEN,) for shape in points.values())


def test_a_function_reads_hook_points_with_their_positions(client: faas.Client) -> None:
    out = read.with_client(client).remote(PROMPT, ["blocks.0.hook_resid_post", "ln_final.hook_normalized"])
    arrays, positions = out["arrays"], out["positions"]
    prompt_tokens = 4  # "The quick brown" with BOS
    total = prompt_tokens + len(out["ids"]) - 1  # the last generated token is never fed back
    for hook in ("blocks.0.hook_resid_post", "ln_final.hook_normalized"):
        assert arrays[hook].shape == (total, HIDDEN) and arrays[hook].dtype == np.float32
        assert positions[hook] == list(range(total))
    assert not np.allclose(arrays["blocks.0.hook_resid_post"], arrays["ln_final.hook_normalized"])
    gen = read.with_client(client).remote(PROMPT, ["blocks.1.hook_resid_mid"], positions="generated")
    assert gen["positions"]["blocks.1.hook_resid_mid"] == list(range(prompt_tokens, total))


def test_a_write_from_the_object_store_steers_and_is_recorded_by_digest(
    client: faas.Client, tmp_path: Path
) -> None:
    vector = np.random.default_rng(7).normal(size=HIDDEN).astype(np.float32) * 8
    buf = io.BytesIO()
    np.save(buf, vector)
    (tmp_path / "steer.npy").write_bytes(buf.getvalue())
    ref = faas.ObjectRef(str(tmp_path), "steer.npy")
    fn = steer.with_client(client)
    plain = fn.remote(PROMPT, vector, 0.0)  # alpha 0 adds nothing: the baseline
    future = fn.submit(PROMPT, ref, 1.0)
    steered = future.result(timeout=120)
    assert steered["ids"] != plain["ids"]
    client.flush_records(30)  # records are group-committed after the result is delivered
    record = faas.read_provenance(client.store, future.invocation_id)
    [call] = record.engine_calls
    assert call.internals is not None
    [write] = call.internals["write"]
    digest = hashlib.sha256(vector.astype("<f4").tobytes()).hexdigest()
    assert write["vector_sha256"] == digest and write["vector_shape"] == [HIDDEN]
    assert write["hook"] == "blocks.1.hook_resid_post" and "vector" not in write  # by digest, not value
    assert "steer.npy" in (write["source"] or "")


def test_modes_refuse_internals_before_the_engine(client: faas.Client) -> None:
    assert read_on_reader.with_client(client).remote(PROMPT) == (HIDDEN,)  # reads are allowed
    before = generate_requests(client, "reader@1")
    with pytest.raises(faas.ModeNotAllowedError, match="does not allow internals_write"):
        write_on_reader.with_client(client).remote(PROMPT)
    assert generate_requests(client, "reader@1") == before


def test_bad_specs_are_typed_errors_before_any_work() -> None:
    with pytest.raises(faas.SubmitError, match="not a hook point name"):
        faas.Read("blocks.x.hook_resid_post")
    with pytest.raises(faas.SubmitError, match="positions"):
        faas.Read("blocks.0.hook_resid_post", positions=[-1])
    with pytest.raises(faas.SubmitError, match="reduce"):
        faas.Read("blocks.0.hook_resid_post", reduce="max")  # type: ignore[arg-type]
    with pytest.raises(faas.SubmitError, match="op"):
        faas.Write("blocks.0.hook_resid_post", op="mul", vector=[1.0])  # type: ignore[arg-type]
    with pytest.raises(faas.SubmitError, match="NaN"):
        faas.Write("blocks.0.hook_resid_post", vector=[float("nan")])
    with pytest.raises(faas.SubmitError, match="exactly k positions"):
        faas.Write("blocks.0.hook_resid_post", vector=np.zeros((2, HIDDEN)), positions=[0])
    with pytest.raises(faas.SubmitError, match="read twice"):
        faas.Internals(read=[faas.Read("ln_final.hook_normalized"), faas.Read("ln_final.hook_normalized")])
    with pytest.raises(faas.SubmitError, match="at least one"):
        faas.Internals()
