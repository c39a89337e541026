"""Scopes, revocation and the audit log, through a real ``faas serve``.

alice has the ``internals`` scope (the default); bob's token file entry says ``internals =
false``. Both run the same function on the same shared engine; bob's hook-point reads, hidden
states and logprobs are refused with MissingScopeError while the engine's request counter
stays put. carol's token is revoked by editing the token file while the service runs. The
audit log records alice's use of internals and the revocation, and verifies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import faas
from faas.service._audit import read, verify
from faas.service._auth import token_digest
from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS, ServiceProc

GREEDY = {"max_new_tokens": 3, "temperature": 0}
CAROL = "carol-token-0123456789abcdef"
DAVE = "dave-token-0123456789abcdef"
ALICE_READER = "alice-reader-token-0123456789"


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
    tenants = {**TOKENS, "carol": CAROL, "dave": DAVE}
    root = tmp_path_factory.mktemp("scopes")
    Registry(LocalStore(root / "store")).register_model(ModelSpec(name="plain-llama", modes=["generate"]))
    reader = f'[[tenants]]\nname = "alice"\ntokens = [{{token = "{ALICE_READER}", scopes = ["read"]}}]\n'
    grants = {"dave": ['models = {"tiny-llama" = ["generate", "hidden_states"]}']}
    with running_service(
        root, tenants=tenants, no_internals=frozenset({"bob"}), tenant_toml=grants, extra_toml=reader
    ) as svc:
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


def test_a_revoked_token_gets_401_within_a_second_and_the_audit_log_verifies(service: ServiceProc) -> None:
    alice_client = faas.RemoteClient(service.url, token=TOKENS["alice"])
    try:
        probe = faas.function(model="tiny-llama", name="probe", timeout=120)(_probe)
        assert probe.with_client(alice_client).remote("internals") == (64,)  # a privileged use to audit
    finally:
        alice_client.shutdown()
    with service.client("carol") as carol:
        assert carol.get("/v1/session").status_code == 200
        pid = service.proc.pid if service.proc else None
        text = service.tokens.read_text()
        service.tokens.write_text(f'revoked = ["{token_digest(CAROL)}"]\n' + text)
        written = time.monotonic()
        status = 200
        while status != 401 and time.monotonic() < written + 5.0:
            status = carol.get("/v1/session").status_code
        took = time.monotonic() - written
        assert status == 401 and took < 1.0, (status, took)
        assert service.proc is not None and service.proc.pid == pid and service.proc.poll() is None
    with service.client("alice") as alice:
        assert alice.get("/v1/session").status_code == 200  # the others are untouched

    path = service.state / "audit.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # internals use is recorded when its usage row commits
        if path.exists() and {"internals.use", "tokens.revoked"} <= {e["action"] for e in read(path)}:
            break
        time.sleep(0.1)  # polling a file another process appends to
    entries = list(read(path))
    uses = [e for e in entries if e["action"] == "internals.use"]
    assert uses and {e["actor"] for e in uses} == {"alice"}
    assert "internals_read" in uses[-1]["detail"]["modes"]
    [revoked] = [e for e in entries if e["action"] == "tokens.revoked"]
    assert revoked["actor"] == "operator" and revoked["detail"]["token"] == token_digest(CAROL)[:19]
    assert "carol-token" not in path.read_text()  # digests, never tokens
    assert verify(path).ok


def test_a_read_only_token_reads_but_cannot_invoke(service: ServiceProc) -> None:
    import openai

    headers = {"Authorization": f"Bearer {ALICE_READER}"}
    with service.client(None) as http:
        session = http.get("/v1/session", headers=headers)
        assert session.status_code == 200 and session.json()["tenant"] == "alice"
        assert http.get("/v1/invocations", headers=headers).status_code == 200
        refused = http.post("/v1/invocations", headers=headers, json={"function": "probe", "items": []})
        assert refused.status_code == 403 and "lacks the 'invoke' scope" in refused.text
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=ALICE_READER, max_retries=0)
    assert [m.id for m in client.models.list()]  # reading the catalogue is a read
    with pytest.raises(openai.PermissionDeniedError, match="'invoke' scope"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}])


def test_grants_limit_models_and_modes_before_any_engine_work(service: ServiceProc) -> None:
    dave = faas.RemoteClient(service.url, token=DAVE)
    try:
        probe = faas.function(model="tiny-llama", name="probe", timeout=120)(_probe)
        assert probe.with_client(dave).remote("hidden_states") == (64,)  # granted
        before = engine_requests(service)
        with pytest.raises(faas.ModeNotAllowedError, match="not granted logprobs"):
            probe.with_client(dave).remote("logprobs")
        with pytest.raises(faas.ModeNotAllowedError, match="not granted internals_read"):
            probe.with_client(dave).remote("internals")
        assert engine_requests(service) == before
        other = faas.function(model="plain-llama", name="other", timeout=120)(_probe)
        with pytest.raises(faas.ForbiddenError, match="not granted model 'plain-llama'"):
            other.with_client(dave).remote("plain")
    finally:
        dave.shutdown()
