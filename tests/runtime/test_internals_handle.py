"""The handle's side of model internals: the wire form it sends, and what it does on SGLang.

SGLang needs a GPU, so its side is the recorded ``/generate`` response with hidden states in
tests/fixtures/sglang (the boundary we cannot reach here), served through an httpx mock
transport; the CPU engine's side runs for real in tests/faas/test_internals.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from runtime import Internals, Model, Read, SubmitError, UnsupportedFeatureError, Write

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"
HIDDEN_FIXTURE = json.loads((FIXTURES / "generate_hidden_states.json").read_text())  # P=3, n=3, H=4


def engine(
    info: dict[str, Any], answer: Callable[[dict[str, Any]], Any]
) -> tuple[Model, list[dict[str, Any]]]:
    """A handle on a mock engine; returns it and the list of /generate bodies it receives."""
    bodies: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model_info":
            return httpx.Response(200, json=info)
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=answer(body))

    return Model("http://engine", "m@1", transport=httpx.MockTransport(handle)), bodies


def sglang() -> tuple[Model, list[dict[str, Any]]]:
    return engine({"model_path": "m", "hidden_size": 4}, lambda body: HIDDEN_FIXTURE)


def test_sglang_serves_final_layer_reads_from_its_hidden_states() -> None:
    model, bodies = sglang()
    assert model.hook_points() == {"ln_final.hook_normalized": (4,)}
    spec = Internals(read=[Read("ln_final.hook_normalized")])
    out = model.generate("x", {"max_new_tokens": 3}, internals=spec)
    assert "internals" not in bodies[0] and bodies[0]["return_hidden_states"] is True
    arr = out.internals["ln_final.hook_normalized"]  # type: ignore[union-attr,index]
    assert arr.shape == (5, 4)  # P + n - 1 positions
    assert out.internals_positions == {"ln_final.hook_normalized": [0, 1, 2, 3, 4]}  # type: ignore[union-attr]
    assert out.hidden_states is None  # not asked for: only the read's array comes back
    gen = model.generate(
        "x",
        {"max_new_tokens": 3},
        internals=Internals(read=[Read("ln_final.hook_normalized", positions="generated", reduce="mean")]),
    )
    np.testing.assert_allclose(gen.internals["ln_final.hook_normalized"], arr[3:].mean(axis=0))  # type: ignore[union-attr,index]
    assert gen.internals_positions == {"ln_final.hook_normalized": [3, 4]}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "spec",
    [
        Internals(read=[Read("blocks.0.hook_resid_post")]),
        Internals(write=[Write("ln_final.hook_normalized", vector=[1.0, 0, 0, 0])]),
    ],
    ids=["read-inner-layer", "write"],
)
def test_sglang_refuses_what_it_cannot_serve_naming_the_hook_before_sending(spec: Internals) -> None:
    model, bodies = sglang()
    hook = (spec.read or spec.write)[0].hook
    with pytest.raises(UnsupportedFeatureError, match=hook.replace(".", r"\.")):
        model.generate("x", {"max_new_tokens": 3}, internals=spec)
    assert bodies == []


def test_the_wire_form_carries_vectors_as_base64_and_provenance_by_digest() -> None:
    points = [
        {"name": "blocks.0.hook_resid_post", "shape": [4]},
        {"name": "ln_final.hook_normalized", "shape": [4]},
    ]
    read_back = np.arange(8, dtype="<f4").reshape(2, 4)

    def answer(body: dict[str, Any]) -> Any:
        item = {"hook": "blocks.0.hook_resid_post", "dtype": "float32", "shape": [2, 4], "positions": [0, 1]}
        item["data"] = base64.b64encode(read_back.tobytes()).decode()
        meta = {"prompt_tokens": 2, "completion_tokens": 1, "finish_reason": {"type": "length", "length": 1}}
        return {
            "text": "a",
            "output_ids": [5],
            "meta_info": {**meta, "internals": {"blocks.0.hook_resid_post": item}},
        }

    model, bodies = engine({"model_path": "m", "hook_points": points}, answer)
    vector = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    spec = Internals(
        read=[Read("blocks.0.hook_resid_post", positions=[0, 1])],
        write=[Write("blocks.0.hook_resid_post", op="scale", vector=vector, alpha=2.0, positions="prompt")],
    )
    bound = model.bind("inv-1")
    out = bound.generate(
        input_embeds=np.zeros((2, 4), np.float32), sampling_params={"max_new_tokens": 1}, internals=spec
    )
    [body] = bodies
    assert body["input_embeds"] == [[0.0] * 4, [0.0] * 4] and "text" not in body
    [write] = body["internals"]["write"]
    sent = np.frombuffer(base64.b64decode(write["vector"]["data"]), dtype="<f4")
    assert write["vector"]["shape"] == [4] and np.array_equal(sent, vector)
    assert (write["op"], write["alpha"], write["positions"]) == ("scale", 2.0, "prompt")
    assert body["internals"]["read"] == [
        {"hook": "blocks.0.hook_resid_post", "positions": [0, 1], "reduce": None}
    ]
    np.testing.assert_array_equal(out.internals["blocks.0.hook_resid_post"], read_back)  # type: ignore[union-attr,index]
    [call] = bound.calls
    [recorded] = call["internals"]["write"]
    assert (
        recorded["vector_sha256"] == hashlib.sha256(vector.tobytes()).hexdigest() and "vector" not in recorded
    )


def test_internals_with_stream_or_a_bad_spec_are_refused_in_the_worker() -> None:
    model, bodies = sglang()
    with pytest.raises(SubmitError, match="stream"):
        model.generate(
            "x",
            {"max_new_tokens": 3},
            stream=True,
            internals=Internals(read=[Read("ln_final.hook_normalized")]),
        )
    with pytest.raises(SubmitError, match=r"faas\.Internals"):
        model.generate("x", {"max_new_tokens": 3}, internals={"read": []})  # type: ignore[arg-type]
    with pytest.raises(SubmitError, match="input_embeds"):
        model.generate("x", input_embeds=[[0.0] * 4])
    with pytest.raises(SubmitError, match="NaN"):
        model.generate(input_embeds=[[float("nan")] * 4])
    assert bodies == []
