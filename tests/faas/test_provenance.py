"""Provenance records and replay, on the real CPU engine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import faas
from faas._provenance import read_provenance
from runtime import ProvenanceRecord
from runtime._staging import is_marker, parse_marker


@faas.function(model="tiny-llama", timeout=60)
def complete(model: faas.Model, prompt: str, n: int = 16) -> str:
    return model.generate(prompt, {"max_new_tokens": n, "temperature": 0}).text  # type: ignore[union-attr]


@faas.function(model="tiny-llama", timeout=60)
def sample(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 8, "temperature": 1.0}).text  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    c = faas.Client(store=tmp_path_factory.mktemp("store").as_uri())
    yield c
    c.shutdown()


def stored_digest(client: faas.Client, wire: bytes) -> str:
    if is_marker(wire):
        ref = parse_marker(wire)
        return hashlib.sha256(client.store.get(ref.key)).hexdigest()
    return hashlib.sha256(wire).hexdigest()


def test_provenance_record_validates_and_digests_match(client: faas.Client) -> None:
    fut = complete.with_client(client).submit("The quick brown")
    assert fut.result(60) == " fox jumps over the lazy dog."
    client.flush_records(30)
    prov = read_provenance(client.store, fut.invocation_id)
    raw = json.loads(client.store.get(f"invocations/{fut.invocation_id}/result.json"))["provenance"]
    assert ProvenanceRecord.model_validate(raw) == prov
    record = client.record(fut.invocation_id)
    assert record.args is not None and record.result is not None
    assert prov.input_digest == stored_digest(client, record.args.to_wire())
    assert prov.output_digest == stored_digest(client, record.result.to_wire())
    assert prov.function.name == "complete" and len(prov.function.digest) == 64
    assert prov.model is not None and (prov.model.name, prov.model.version) == ("tiny-llama", "1")
    assert prov.model.engine_kind == "cpu" and prov.model.engine_version
    assert prov.model.weights_path and Path(prov.model.weights_path).is_dir()
    [call] = prov.engine_calls
    assert call.path == "/generate" and call.sampling_params["temperature"] == 0
    assert prov.completion_tokens == call.completion_tokens > 0 and prov.prompt_tokens > 0
    assert prov.timings.execution_s is not None and prov.timings.engine_s > 0
    assert prov.worker_pid in client.pool.worker_pids() and prov.worker_host
    assert prov.determinism.greedy and prov.determinism.reproducible


def test_unseeded_sampling_is_not_marked_reproducible(client: faas.Client) -> None:
    fut = sample.with_client(client).submit("Water boils at")
    fut.result(60)
    client.flush_records(30)
    det = read_provenance(client.store, fut.invocation_id).determinism
    assert not det.greedy and not det.seeded and not det.reproducible


def test_replay_reproduces_greedy_output_via_cli(client: faas.Client) -> None:
    fut = complete.with_client(client).submit("Jupiter is", 12)
    original = fut.result(60)
    client.flush_records(30)
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "faas._cli", "replay", fut.invocation_id, "--store", client.store.url()],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["matches"] is True and report["value"] == original
    assert report["replay"] != fut.invocation_id
    shown = subprocess.run(
        [sys.executable, "-m", "faas._cli", "provenance", report["replay"], "--store", client.store.url()],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["output_digest"] == report["original_output_digest"]
