"""The bodies the Model handle sends for LoRA adapters (SGLang's routes and field), without an engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from runtime import AdapterRef, Model, SubmitError


def _handle(seen: list[tuple[str, dict[str, Any]]], *, lose_once: bool = False) -> Model:
    lost = [lose_once]

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/generate" and lost[0]:
            lost[0] = False  # the engine restarted and forgot the adapter
            return httpx.Response(400, json={"error": {"message": "lora_path names no loaded LoRA adapter"}})
        if request.url.path == "/generate":
            meta = {"id": body["rid"], "finish_reason": {"type": "length"}, "prompt_tokens": 3,
                    "completion_tokens": 1, "e2e_latency": 0.01}  # fmt: skip
            return httpx.Response(200, json={"text": "x", "output_ids": [7], "meta_info": meta})
        return httpx.Response(200, json={"success": True, "error_message": "", "loaded_adapters": {}})

    refs = {"chem": AdapterRef("chem@1", "ab" * 32, "/cache/adapters/abab")}
    base = Model("http://engine", "sci@1", transport=httpx.MockTransport(answer))
    return base.with_adapters(lambda name: refs[name]).bind("inv-1-0")


def test_generate_loads_once_and_sends_lora_path() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    model = _handle(seen)
    model.generate("hi", {"max_new_tokens": 1}, adapter="chem")
    model.generate("hi", {"max_new_tokens": 1}, adapter="chem")
    name = "chem@1-" + "ab" * 6
    assert seen[0] == ("/load_lora_adapter", {"lora_name": name, "lora_path": "/cache/adapters/abab"})
    assert [p for p, _ in seen] == ["/load_lora_adapter", "/generate", "/generate"]
    assert seen[1][1]["lora_path"] == name
    assert [(c["adapter"], c["adapter_sha256"]) for c in model.calls] == [("chem@1", "ab" * 32)] * 2
    model.generate("hi", {"max_new_tokens": 1})
    assert "lora_path" not in seen[-1][1] and "adapter" not in model.calls[-1]


def test_an_engine_that_lost_the_adapter_gets_it_again() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    model = _handle(seen, lose_once=True)
    assert model.generate("hi", {"max_new_tokens": 1}, adapter="chem").output_ids == [7]
    assert [p for p, _ in seen] == ["/load_lora_adapter", "/generate", "/load_lora_adapter", "/generate"]


def test_a_handle_without_adapters_refuses() -> None:
    model = Model("http://engine", "sci@1", transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    with pytest.raises(SubmitError, match="cannot resolve adapters"):
        model.generate("hi", adapter="chem")
