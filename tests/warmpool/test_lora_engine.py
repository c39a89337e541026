"""LoRA adapters in the CPU engine: many adapters in one batch, on-demand loads, LRU eviction.

A real engine process over a real socket; adapters are random PEFT files for the tiny Llama.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.lora_adapters import write_adapter
from tests.warmpool._cpu_engine_proc import EngineProc, running_engine

PROMPTS = ["The quick brown", "Once upon a time", "In the beginning", "A small model"]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_adapter(root / name, tiny_model_path, seed=seed, rank=rank)
        for name, seed, rank in (("chem", 1, 4), ("bio", 2, 8), ("law", 3, 2), ("art", 4, 4))
    }


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProc]:
    """Three slots: three adapters and the base model fit one batch."""
    tmp = tmp_path_factory.mktemp("lora-engine")
    with running_engine(tiny_model_path, tmp, "--max-loras", "3", "--max-batch-size", "16") as proc:
        yield proc


@pytest.fixture(scope="module")
def small_engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProc]:
    """Two slots for four adapters: evictions."""
    tmp = tmp_path_factory.mktemp("lora-engine-2")
    with running_engine(tiny_model_path, tmp, "--max-loras", "2", "--max-batch-size", "16") as proc:
        yield proc


def _load(client: httpx.Client, name: str, path: Path) -> dict[str, Any]:
    r = client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] and name in body["loaded_adapters"]
    return body


def _gen(client: httpx.Client, prompt: str, lora: str | None) -> list[int]:
    body: dict[str, Any] = {"text": prompt, "sampling_params": GREEDY}
    if lora is not None:
        body["lora_path"] = lora
    r = client.post("/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["output_ids"]
    return ids


def _lora_stats(client: httpx.Client) -> dict[str, Any]:
    info: dict[str, Any] = client.get("/server_info").json()["lora"]
    return info


def test_load_checks_the_adapter(engine: EngineProc, tmp_path: Path) -> None:
    with httpx.Client(base_url=engine.url, timeout=30) as c:
        r = c.post("/load_lora_adapter", json={"lora_name": "ghost", "lora_path": str(tmp_path)})
        assert r.status_code == 400 and not r.json()["success"]
        assert "cannot read" in r.json()["error_message"]
        r = c.post("/generate", json={"text": "hi", "lora_path": "ghost"})
        assert r.status_code == 400 and "lora_path" in r.text
        r = c.post("/unload_lora_adapter", json={"lora_name": "ghost"})
        assert r.status_code == 400


def test_mixed_batch_of_16_matches_solo_runs(engine: EngineProc, adapters: dict[str, Path]) -> None:
    """Three adapters and the base model in one batch of 16: each row equals its solo run."""
    with httpx.Client(base_url=engine.url, timeout=120) as c:
        for name in ("chem", "bio", "law"):
            _load(c, name, adapters[name])
        rows = [(PROMPTS[i % 4], [None, "chem", "bio", "law"][i // 4]) for i in range(16)]
        solo = {row: _gen(c, *row) for row in set(rows)}
        for prompt in PROMPTS:  # the adapters change the output
            assert all(solo[(prompt, None)] != solo[(prompt, a)] for a in ("chem", "bio", "law")), prompt
        # One body of 16 prompts is one batch, each row with its own adapter.
        r = c.post(
            "/generate",
            json={"text": [p for p, _ in rows], "lora_path": [a for _, a in rows], "sampling_params": GREEDY},
        )
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == [solo[row] for row in rows]
        stats = c.get("/server_info").json()["stats"]
        assert stats["max_batch_size_seen"] == 16  # the solo runs were batches of one
        # And as 16 concurrent requests.
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda row: _gen(c, *row), rows))
        assert got == [solo[row] for row in rows]


def test_eviction_and_reload_under_load(small_engine: EngineProc, adapters: dict[str, Path]) -> None:
    """Four adapters on two slots, 48 concurrent requests: evictions and reloads, no error."""
    with httpx.Client(base_url=small_engine.url, timeout=120) as c:
        for name, path in adapters.items():
            if name not in _lora_stats(c)["loaded_adapters"]:
                _load(c, name, path)
        names = list(adapters)
        expected = {(p, a): _gen(c, p, a) for p in PROMPTS[:2] for a in names}
        before = _lora_stats(c)
        work = [(PROMPTS[i % 2], names[i % 4]) for i in range(48)]
        with ThreadPoolExecutor(24) as pool:
            got = list(pool.map(lambda row: _gen(c, *row), work))
        assert got == [expected[w] for w in work]
        after = _lora_stats(c)
        assert after["lora_evictions_total"] > before["lora_evictions_total"]
        assert after["lora_reloads_total"] > before["lora_reloads_total"]
        assert len(after["resident"]) <= 2
        # A batch mixing more adapters than slots: the rows that find no slot wait, none fails.
        r = c.post("/generate", json={"text": ["Hi"] * 8, "lora_path": names * 2, "sampling_params": GREEDY})
        assert r.status_code == 200, r.text


def test_unload_then_requests_are_refused(
    engine: EngineProc, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        _load(c, "tmp-adapter", adapters["chem"])
        r = c.post("/load_lora_adapter", json={"lora_name": "tmp-adapter", "lora_path": str(tmp_path)})
        assert r.status_code == 400 and "already loaded" in r.json()["error_message"]
        r = c.post("/unload_lora_adapter", json={"lora_name": "tmp-adapter"})
        assert r.status_code == 200 and "tmp-adapter" not in r.json()["loaded_adapters"]
        r = c.post("/generate", json={"text": "hi", "lora_path": "tmp-adapter"})
        assert r.status_code == 400
