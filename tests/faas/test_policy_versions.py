"""Model access policy and model versions, on the real CPU engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import faas
from registry import ModelSpec
from tests.warmpool._pool_helpers import wait_for
from warmpool import ReplicaState


@faas.function(model="guarded", timeout=60)
def hidden(model: faas.Model, prompt: str) -> int:
    out = model.generate(prompt, {"max_new_tokens": 2, "temperature": 0}, return_hidden_states=True)
    return int(out.hidden_states.shape[0])  # type: ignore[union-attr]


@faas.function(model="guarded", timeout=60)
def plain(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 8, "temperature": 0}).text  # type: ignore[union-attr]


@faas.function(model="sci", timeout=120)
def which(model: faas.Model, prompt: str, n: int) -> str:
    model.generate(prompt, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return model.name


@pytest.fixture(scope="module")
def client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    c = faas.Client(store=tmp_path_factory.mktemp("store").as_uri())
    path = str(tiny_model_path)
    c.registry.register_model(ModelSpec(name="guarded", model_path=path, modes=["generate"]))
    c.registry.register_model(ModelSpec(name="sci", version="1", model_path=path))
    c.registry.register_model(ModelSpec(name="sci", version="2", model_path=path), alias=None)
    yield c
    c.shutdown()


def engine_requests(client: faas.Client, ref: str) -> int:
    [replica] = [r for r in client.pool.replicas(ref) if r.state is ReplicaState.READY]
    info = httpx.get(f"{replica.url}/server_info", timeout=10).json()
    return int(info["stats"]["generate_requests"])


def test_forbidden_mode_is_refused_before_the_engine(client: faas.Client) -> None:
    assert plain.with_client(client).remote("Two plus two") == " equals four."
    before = engine_requests(client, "guarded@1")
    with pytest.raises(faas.ModeNotAllowedError, match="does not allow hidden_states") as info:
        hidden.with_client(client).remote("Two plus two")
    assert isinstance(info.value, PermissionError)
    assert engine_requests(client, "guarded@1") == before


def test_alias_move_warms_new_version_before_traffic_moves(client: faas.Client) -> None:
    fn = which.with_client(client)
    assert fn.remote("warm", 1) == "sci@1"
    running = [fn.submit("The quick brown", 200) for _ in range(20)]
    wait_for(lambda: client.pool.replicas("sci@1")[0].inflight == 20, 30, "20 invocations on v1")
    client.set_model_alias("sci", "latest", "2")
    # v2 is cold: this call still runs on warm v1 and starts v2's replica.
    assert fn.remote("Two plus two", 1) == "sci@1"
    wait_for(
        lambda: any(r.state is ReplicaState.READY for r in client.pool.replicas("sci@2")), 60, "v2 ready"
    )
    assert [f.result(120) for f in running] == ["sci@1"] * 20
    assert fn.remote("Two plus two", 1) == "sci@2"
    assert which.with_client(client).remote("Two plus two", 1) == "sci@2"
    pinned = faas.function(model="sci@1", timeout=60)(which.fn).with_client(client)
    assert pinned.remote("Two plus two", 1) == "sci@1"
