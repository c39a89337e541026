"""Provenance records and replay, on the real CPU engine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
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


@faas.function(model="tiny-llama", timeout=60)
def complete_with_details(model: faas.Model, prompt: str) -> object:
    return model.generate(
        prompt,
        {"max_new_tokens": 8, "temperature": 0},
        return_logprob=True,
        top_logprobs_num=3,
        return_hidden_states=True,
    )


@faas.function(timeout=60)
def clock(label: str) -> dict[str, object]:
    return {"label": label, "ns": [0, time.time_ns()]}


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
        [sys.executable, "-m", "faas.cli", "replay", fut.invocation_id, "--store", client.store.url()],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["matches"] is True and report["value"] == original
    assert report["replay"] != fut.invocation_id
    shown = subprocess.run(
        [sys.executable, "-m", "faas.cli", "provenance", report["replay"], "--store", client.store.url()],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["output_digest"] == report["original_output_digest"]


def test_replay_of_greedy_logprobs_and_hidden_states_matches_via_cli(client: faas.Client) -> None:
    fut = complete_with_details.with_client(client).submit("The quick brown")
    original = fut.result(60)
    assert original.logprobs.shape == (8,) and original.top_logprobs.shape == (8, 3)
    assert original.hidden_states.shape[0] == original.prompt_tokens + 7
    client.flush_records(30)
    out = subprocess.run(
        [sys.executable, "-m", "faas.cli", "replay", fut.invocation_id, "--store", client.store.url()],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["matches"] is True and report["differences"] == []
    # The stored bytes differ (latency, request id), so the fields were compared one by one.
    assert report["original_output_digest"] != report["replay_output_digest"]
    assert report["compared_by"] == "fields"
    assert {"meta_info.e2e_latency", "meta_info.id"} <= set(report["ignored"])
    assert report["tolerance"] == {"rtol": 1e-3, "atol": 1e-4}


def test_replay_mismatch_exits_1_and_names_the_field(client: faas.Client) -> None:
    fut = clock.with_client(client).submit("now")
    fut.result(60)
    client.flush_records(30)
    out = subprocess.run(
        [sys.executable, "-m", "faas.cli", "replay", fut.invocation_id, "--store", client.store.url(),
         "--rtol", "0", "--atol", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["matches"] is False and report["tolerance"] == {"rtol": 0.0, "atol": 0.0}
    assert [(d["path"], d["reason"]) for d in report["differences"]] == [("ns[1]", "value")]
    assert "differs: ns[1] (value)" in out.stderr
