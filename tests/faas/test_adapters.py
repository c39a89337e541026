"""LoRA adapters as model versions, end to end: registry, workers, the CPU engine, alias moves."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import faas
from registry import ModelSpec
from tests.lora_adapters import write_adapter
from tests.warmpool._pool_helpers import wait_for
from warmpool import AdapterMove, ReplicaState

GREEDY = {"max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True}
PROMPT = "Once upon a time"


@faas.function(model="sci", timeout=120)
def once(model: faas.Model, prompt: str, adapter: str | None) -> list[int]:
    return list(model.generate(prompt, GREEDY, adapter=adapter).output_ids)  # type: ignore[union-attr]


@faas.function(model="sci", timeout=120)
def gated(model: faas.Model, prompt: str, gate: str) -> list[int]:
    deadline = time.monotonic() + 90  # poll the gate file with a deadline
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    return list(model.generate(prompt, GREEDY, adapter="chem").output_ids)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    root = tmp_path_factory.mktemp("adapters")
    c = faas.Client(store=tmp_path_factory.mktemp("store").as_uri())
    c.registry.register_model(ModelSpec(name="sci", version="1", model_path=str(tiny_model_path)))
    c.add_adapter(write_adapter(root / "chem1", tiny_model_path, seed=11), "chem", "sci")
    c.add_adapter(write_adapter(root / "chem2", tiny_model_path, seed=12), "chem", "sci", alias=None)
    yield c
    c.shutdown()


def _engine_adapters(client: faas.Client) -> dict[str, Any]:
    [replica] = [r for r in client.pool.replicas("sci@1") if r.state is ReplicaState.READY]
    lora: dict[str, Any] = httpx.get(f"{replica.url}/server_info", timeout=10).json()["lora"]
    return lora


def test_adapter_versions_are_registered(client: faas.Client) -> None:
    [(v1, a1), (v2, a2)] = client.registry.adapters.versions()
    assert (v1.ref, a1, v2.ref, a2) == ("chem@1", ["latest"], "chem@2", [])
    assert v1.base_model == "sci@1" and v1.rank == 4 and v1.sha256 != v2.sha256
    assert client.registry.adapters.snapshot("sci@1") == {"chem": "chem@1"}
    with pytest.raises(faas.UnknownAdapterError):
        client.registry.adapters.get("chem@9")


def test_adapter_changes_output_and_provenance_records_it(client: faas.Client) -> None:
    fn = once.with_client(client)
    base, alias, pinned = fn.remote(PROMPT, None), fn.remote(PROMPT, "chem"), fn.remote(PROMPT, "chem@2")
    assert base != alias and alias != pinned and base != pinned
    future = fn.submit(PROMPT, "chem@1")
    assert future.result(60) == alias
    client.flush_records(30)
    record = faas.read_provenance(client.store, future.invocation_id)
    sha = client.registry.adapters.get("chem@1").sha256
    assert [(c.adapter, c.adapter_sha256) for c in record.engine_calls] == [("chem@1", sha)]
    assert record.model is not None and record.model.adapters == {"chem@1": sha}
    with pytest.raises(faas.UnknownAdapterError, match="no adapter alias 'law'"):
        fn.remote(PROMPT, "law")


def test_tampered_adapter_files_are_refused(
    client: faas.Client, tiny_model_path: Path, tmp_path: Path
) -> None:
    spec = client.add_adapter(write_adapter(tmp_path / "bad", tiny_model_path, seed=5), "bad", "sci")
    client.store.put(spec.uri, client.store.get(spec.uri) + b"tampered")
    with pytest.raises(faas.IntegrityError):
        once.with_client(client).remote(PROMPT, "bad")


def _move_under_load(client: faas.Client, tmp: Path, old: str, new: str, version: str) -> None:
    """50 invocations resolve ``chem`` to ``old`` and wait; the alias moves; new ones run on ``new``."""
    expected = {ref: once.with_client(client).remote(PROMPT, ref) for ref in (old, new)}
    fn = gated.with_client(client)
    gate_old, gate_new = tmp / f"{old}-to-{new}.old", tmp / f"{old}-to-{new}.new"
    in_flight = [fn.submit(PROMPT, str(gate_old)) for _ in range(50)]
    wait_for(lambda: sum(r.inflight for r in client.pool.replicas("sci@1")) >= 50, 60, "50 in flight")
    moved: list[AdapterMove] = []
    mover = threading.Thread(target=lambda: moved.append(client.set_adapter_alias("chem", version)))
    mover.start()
    wait_for(lambda: client.registry.adapters.get("chem").ref == new, 60, "the alias to move")
    gate_new.touch()
    later = [fn.submit(PROMPT, str(gate_new)) for _ in range(10)]
    assert [f.result(120) for f in later] == [expected[new]] * 10
    assert mover.is_alive() and not any(f.done() for f in in_flight)  # draining: old ones still wait
    gate_old.touch()
    assert [f.result(120) for f in in_flight] == [expected[old]] * 50
    mover.join(60)
    [move] = moved
    assert (move.old, move.new, move.drained) == (old, new, 50)
    assert move.loaded_on and move.unloaded_from == move.loaded_on
    client.flush_records(30)
    for f in in_flight[:3] + later[:3]:
        record = faas.read_provenance(client.store, f.invocation_id)
        assert [c.adapter for c in record.engine_calls] == [old if f in in_flight else new]
    loaded = _engine_adapters(client)["loaded_adapters"]
    assert not any(name.startswith(f"{old}-") for name in loaded) and any(
        n.startswith(f"{new}-") for n in loaded
    )


def test_alias_move_under_load_and_rollback(client: faas.Client, tmp_path: Path) -> None:
    _move_under_load(client, tmp_path, "chem@1", "chem@2", "2")
    _move_under_load(client, tmp_path, "chem@2", "chem@1", "1")  # the rollback
    assert once.with_client(client).remote(PROMPT, "chem@2") == once.with_client(client).remote(
        PROMPT, "chem@2"
    )


def test_cli_adapter_add_ls_alias(tiny_model_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from faas.cli._main import app
    from registry import Registry
    from runtime import store_from_url

    store = (tmp_path / "store").as_uri()
    Registry(store_from_url(store)).register_model(ModelSpec(name="sci", model_path=str(tiny_model_path)))
    runner = CliRunner()
    for seed in (1, 2):
        path = write_adapter(tmp_path / f"a{seed}", tiny_model_path, seed=seed)
        out = runner.invoke(
            app, ["models", "adapter", "add", "chem", str(path), "--base", "sci", "--store", store]
        )
        assert out.exit_code == 0, out.output
        assert out.output.startswith(f"chem@{seed}\tbase sci@1\trank 4\tsha256 ")
    out = runner.invoke(app, ["models", "adapter", "ls", "--store", store])
    lines = out.output.splitlines()
    assert [line.split("\t")[:4] for line in lines] == [
        ["chem@1", "sci@1", "rank 4", "-"],
        ["chem@2", "sci@1", "rank 4", "latest"],
    ]
    out = runner.invoke(app, ["models", "adapter", "alias", "chem", "1", "--store", store])
    assert out.exit_code == 0 and out.output.strip() == "chem@latest: chem@2 -> chem@1"
    out = runner.invoke(app, ["models", "adapter", "alias", "chem", "7", "--store", store])
    assert out.exit_code == 2 and "Unknown adapter 'chem@7'" in out.output
    bad = runner.invoke(
        app, ["models", "adapter", "add", "x", str(tmp_path), "--base", "sci", "--store", store]
    )
    assert bad.exit_code == 2 and "not a PEFT LoRA adapter directory" in bad.output
