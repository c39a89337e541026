"""The tenant's ``internals`` scope, through ``faas serve``: refused in the worker before any engine request.

alice has the scope (the default); bob's token file entry says ``internals = false``. Both run
the same function on the same shared engine; bob's hook-point reads, hidden states and
logprobs are refused with MissingScopeError while the engine's request counter stays put.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import faas
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS, ServiceProc

GREEDY = {"max_new_tokens": 3, "temperature": 0}


def _probe(model: faas.Model, what: str) -> Any:
    if what == "internals":
        spec = faas.Internals(read=[faas.Read("blocks.0.hook_resid_post", reduce="last")])
        return (
            model.generate("Two plus two", GREEDY, internals=spec).internals["blocks.0.hook_resid_post"].shape
        )  # type: ignore[union-attr,index]
    if what == "hidden_states":
        return model.generate("Two plus two", GREEDY, return_hidden_states="last").hidden_states.shape  # type: ignore[union-attr]
    if what == "logprobs":
        return len(model.generate("Two plus two", GREEDY, return_logprob=True).logprobs)  # type: ignore[union-attr,arg-type]
    return model.generate("Two plus two", GREEDY).text  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    with running_service(tmp_path_factory.mktemp("internals"), no_internals=frozenset({"bob"})) as svc:
        yield svc


def engine_requests(service: ServiceProc) -> int:
    with service.client("alice") as http:
        pool = http.get("/v1/pool").json()
    [replica] = [r for r in pool["models"]["tiny-llama@1"]["replicas"] if r["state"] == "ready"]
    stats = httpx.get(f"{replica['url']}/server_info", timeout=10).json()["stats"]
    return int(stats["generate_requests"])


def test_a_token_without_the_internals_scope_is_refused_before_the_engine(service: ServiceProc) -> None:
    alice = faas.RemoteClient(service.url, token=TOKENS["alice"])
    bob = faas.RemoteClient(service.url, token=TOKENS["bob"])
    try:
        probe = faas.function(model="tiny-llama", name="probe", timeout=120)(_probe)
        assert probe.with_client(alice).remote("internals") == (64,)
        assert probe.with_client(bob).remote("plain")  # plain generation is not internals
        with service.client("bob") as http:
            assert http.get("/v1/session").json()["internals"] is False
        before = engine_requests(service)
        for what in ("internals", "hidden_states", "logprobs"):
            with pytest.raises(faas.MissingScopeError, match="lacks the 'internals' scope") as info:
                probe.with_client(bob).remote(what)
            assert isinstance(info.value, faas.ModeNotAllowedError)
        assert engine_requests(service) == before
    finally:
        alice.shutdown()
        bob.shutdown()


def test_the_token_file_refuses_a_non_boolean_scope(tmp_path: Path) -> None:
    from faas.service._auth import TokenAuth

    path = tmp_path / "tokens.toml"
    path.write_text('[[tenants]]\nname = "carol"\ntokens = ["t-0123456789"]\ninternals = "no"\n')
    with pytest.raises(faas.AuthConfigError, match="internals = 'no'; it must be true or false"):
        TokenAuth.from_file(path)
