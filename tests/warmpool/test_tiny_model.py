"""Tests for the offline tiny Llama builder (warmpool.cpu_engine._tiny_model)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from warmpool.cpu_engine import _tiny_model as tm

MAX_NEW = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # The build sets HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE; keep that from leaking to other tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield tm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(built: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    model.eval()
    return tok, model


def _split_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return ids, False


def test_files_and_build_info(built: Path) -> None:
    assert built.name == "model"
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        tm.BUILD_INFO_FILE,
    ):
        assert (built / name).is_file(), name
    # Only the finished directory is left beside it: no temp dirs.
    assert [p.name for p in built.parent.iterdir()] == ["model"]

    info = json.loads((built / tm.BUILD_INFO_FILE).read_text())
    assert info["builder_version"] == tm.BUILDER_VERSION
    assert info["seed"] == 0
    assert info["steps"] == tm.DEFAULT_STEPS
    assert info["corpus_sha256"] == tm.corpus_sha256()
    assert len(info["corpus_sha256"]) == 64
    assert 0.0 < info["final_loss"] < 1.0
    assert info["build_seconds"] > 0
    assert set(info["known_completions"]) == set(tm.KNOWN_COMPLETIONS)
    assert all(r["ok"] for r in info["known_completions"].values())

    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] >= 256
    gen = json.loads((built / "generation_config.json").read_text())
    assert {gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]} == {
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    }
    tok_cfg = json.loads((built / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == tm.CHAT_TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
        "<s>",
        "</s>",
        "<pad>",
    )


def test_known_completions_table() -> None:
    assert tm.TINY_MODEL_NAME == "tiny-llama"
    assert tm.KNOWN_COMPLETIONS["The quick brown"] == " fox jumps over the lazy dog."
    assert len(set(tm.KNOWN_COMPLETIONS.values())) >= 4
    corpus = set(tm._CORPUS)
    for prompt, completion in tm.KNOWN_COMPLETIONS.items():
        assert prompt + completion in corpus
        # Unambiguous: no other sentence starts with the prompt.
        assert sum(s.startswith(prompt + " ") for s in corpus) == 1


def test_model_loads_small_float32(loaded: tuple[Any, Any]) -> None:
    import torch

    tok, model = loaded
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert 0 < model.num_parameters() < 1_000_000


@pytest.mark.parametrize("prompt", list(tm.KNOWN_COMPLETIONS))
def test_greedy_completion_then_eos(loaded: tuple[Any, Any], prompt: str) -> None:
    tok, model = loaded
    enc = tok(prompt, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id
    out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW)
    new, saw_eos = _split_at_eos(out[0, enc.input_ids.shape[1] :].tolist(), tok.eos_token_id)
    assert tok.decode(new) == tm.KNOWN_COMPLETIONS[prompt]
    assert saw_eos


def test_batched_left_padded_each_gets_its_own(loaded: tuple[Any, Any]) -> None:
    tok, model = loaded
    prompts = list(tm.KNOWN_COMPLETIONS)
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left"
    out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW)
    for prompt, row in zip(prompts, out, strict=True):
        new, saw_eos = _split_at_eos(row[enc.input_ids.shape[1] :].tolist(), tok.eos_token_id)
        assert (tok.decode(new), saw_eos) == (tm.KNOWN_COMPLETIONS[prompt], True)


def test_tokenizer_keeps_leading_spaces(loaded: tuple[Any, Any]) -> None:
    tok, _ = loaded
    text = " fox jumps over the lazy dog."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.decode(tok("The quick brown").input_ids, skip_special_tokens=True) == ("The quick brown")
    # Byte-level: text never seen in the corpus still round-trips.
    assert tok.decode(tok("Zürich ∑ 42", add_special_tokens=False).input_ids) == "Zürich ∑ 42"


def test_chat_template_renders(loaded: tuple[Any, Any]) -> None:
    tok, _ = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.</s>\n"
        "<|user|>\nWhy is the sky blue?\n<|assistant|>\n"
    )
    ids = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids[1] != tok.bos_token_id  # no double bos
    with pytest.raises(Exception, match="Roles must be"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_ensure_builds_once_concurrently_and_deterministically(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    calls: list[Path] = []
    real_build = tm.build_tiny_model

    def counting_build(out_dir: str | Path, **kwargs: Any) -> Path:
        calls.append(Path(out_dir))
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(tm, "build_tiny_model", counting_build)

    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(tm.ensure_tiny_model(tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    # Two racing callers (separate flock descriptions even within one process).
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = tmp_path / "models" / f"tiny-llama-v{tm.BUILDER_VERSION}"
    assert results == [expected, expected]
    assert calls == [expected]
    stamp = (expected / tm.BUILD_INFO_FILE).stat().st_mtime_ns

    assert tm.ensure_tiny_model(tmp_path) == expected
    assert calls == [expected]  # no rebuild
    assert (expected / tm.BUILD_INFO_FILE).stat().st_mtime_ns == stamp

    # Same seed and steps as the module build: byte-identical weights and tokenizer.
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (expected / name).read_bytes() == (built / name).read_bytes(), name


def test_ensure_defaults_to_faas_cache_dir(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pre-seed the cache by copying the module build, so this checks the path, not a build.
    import shutil

    monkeypatch.setenv("FAAS_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / f"tiny-llama-v{tm.BUILDER_VERSION}"
    shutil.copytree(built, target)
    monkeypatch.setattr(tm, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tm.ensure_tiny_model() == target


def test_failed_build_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="known completions"):
        tm.build_tiny_model(out, steps=1)
    assert list(tmp_path.iterdir()) == []


def test_import_is_cheap() -> None:
    code = (
        "import sys, warmpool.cpu_engine._tiny_model; "
        "heavy = {'torch', 'transformers', 'tokenizers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
