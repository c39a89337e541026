"""Sharing a function between tenants of a real ``faas serve``: invoke only, as the caller's invocation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import faas
from faas.service._audit import read, verify
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS, ServiceProc

CAROL = "carol-token-0123456789abcdef"


def _shout(text: str) -> dict[str, Any]:
    """Shout ``text`` back (and say which process ran it)."""
    return {"text": text.upper(), "pid": os.getpid()}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    with running_service(tmp_path_factory.mktemp("sharing"), tenants={**TOKENS, "carol": CAROL}) as svc:
        yield svc


@pytest.fixture
def clients(service: ServiceProc) -> Iterator[dict[str, faas.RemoteClient]]:
    made = {name: faas.RemoteClient(service.url, token=token) for name, token in service.tokens_of.items()}
    yield made
    for client in made.values():
        client.shutdown()


def test_a_shared_function_runs_as_the_callers_invocation(
    service: ServiceProc, clients: dict[str, faas.RemoteClient]
) -> None:
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    shout = faas.function(name="shout", timeout=60)(_shout).with_client(alice)
    assert shout.remote("mine")["text"] == "MINE"
    with pytest.raises(faas.NotFoundError):
        bob.submit_by_name("alice/shout", ("hi",), {}).result(60)  # not shared yet
    assert alice.share("shout", "bob")["grantee"] == "bob"
    assert alice.shares("shout") == ["bob"]
    [listed] = bob.shared()
    assert listed.name == "alice/shout" and listed.digest == alice.list_functions()[0].digest
    assert bob.shared("alice/shout")[0].digest == listed.digest
    env = {**os.environ, "FAAS_URL": service.url, "FAAS_TOKEN": TOKENS["bob"]}
    cli = subprocess.run(
        [sys.executable, "-m", "faas.cli", "shared"], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "alice/shout@1" in cli.stdout, cli.stderr
    future = bob.submit_by_name("alice/shout", ("hi",), {})
    assert future.result(60)["text"] == "HI"
    assert bob.invocation(future.invocation_id).function_name == "alice/shout"
    with pytest.raises(faas.NotFoundError):
        alice.invocation(future.invocation_id)  # the owner sees neither arguments nor result
    for stranger in (carol,):
        assert stranger.shared() == []
        with pytest.raises(faas.NotFoundError):
            stranger.submit_by_name("alice/shout", ("x",), {}).result(60)
    with pytest.raises(faas.SubmitError, match="not another tenant"):
        alice.share("shout", "nobody")
    with pytest.raises(faas.NotFoundError):
        bob.share("shout", "carol")  # bob has no function of that name to share
    assert alice.unshare("shout", "bob") is True and alice.shares("shout") == []
    deadline = time.monotonic() + 5  # resolved references are cached for SPEC_CACHE_SECONDS (0.5 s)
    refused = False
    while not refused and time.monotonic() < deadline:
        try:
            bob.submit_by_name("alice/shout", ("again",), {}).result(60)
        except faas.NotFoundError:
            refused = True
    assert refused
    actions = [
        (e["action"], e["actor"], e["detail"].get("grantee")) for e in read(service.state / "audit.jsonl")
    ]
    assert ("share.added", "alice", "bob") in actions and ("share.removed", "alice", "bob") in actions
    assert verify(service.state / "audit.jsonl").ok
