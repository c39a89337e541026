"""Globus Auth tokens, introspected against a local stand-in of Globus Auth's introspection API.

The Globus cloud cannot be reached here; the stand-in follows the documented API
(``POST /v2/oauth2/token/introspect``, HTTP Basic client credentials, form fields ``token``
and ``include``; ``{"active": false}`` for unknown tokens; ``active``, ``scope``, ``sub``,
``username``, ``exp``, ``identity_set`` otherwise) on 127.0.0.1. Then a real ``faas serve``
authenticates with it.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import faas
from faas.service._auth import OpenAuth, ReloadingTokenAuth, TokenAuth
from faas.service._globus_auth import GlobusIntrospection
from faas.service._tenant import Tenant
from tests._json_http import send_json
from tests.faas._service_helpers import running_service

CLIENT, SECRET = "faas-client-id", "faas-client-secret"
SCOPE = "https://auth.globus.org/scopes/faas-client-id/faas"
ALICE_ID, ALICE_LINKED = "1b2c3d4e-0000-0000-0000-00000000a11c", "9f8e7d6c-0000-0000-0000-00000000a11c"


@dataclass
class GlobusStandIn:
    """The introspection endpoint: tokens it knows, and how often it was asked."""

    url: str = ""
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: int = 0


@pytest.fixture
def globus() -> Iterator[GlobusStandIn]:
    state = GlobusStandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.calls += 1
            expected = "Basic " + base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
            if self.path != "/v2/oauth2/token/introspect" or self.headers.get("Authorization") != expected:
                self._send(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                return
            form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            info = state.tokens.get(form["token"][0])
            if info is None:
                self._send(200, {"active": False})
                return
            body = {"active": True, "client_id": "some-app", "iss": "https://auth.globus.org", **info}
            if "identity_set" not in form.get("include", [""])[0]:
                body.pop("identity_set", None)
            self._send(200, body)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            send_json(self, status, body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v2/oauth2/token/introspect"
    yield state
    server.shutdown()
    server.server_close()


def token_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[globus]\nclient_id = "{CLIENT}"\nrequired_scope = "{SCOPE}"\nintrospect_url = "{url}"\n'
        '[[tenants]]\nname = "alice"\n'
        f'globus_identities = ["{ALICE_LINKED}"]\n'
        '[[tenants]]\nname = "bob"\ntokens = ["bob-token-0123456789abcdef"]\n'
    )
    return path


def grant(globus: GlobusStandIn, token: str, *, exp: float, scope: str = SCOPE) -> None:
    globus.tokens[token] = {
        "scope": scope,
        "sub": ALICE_ID,
        "username": "alice@uchicago.edu",
        "exp": int(exp),
        "identity_set": [ALICE_ID, ALICE_LINKED],
    }


@pytest.fixture
def clocked(
    globus: GlobusStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[TokenAuth, list[float]]:
    """The token file's auth on a clock the test moves, with ``AgAlice`` granted for 100 s."""
    monkeypatch.setenv("FAAS_GLOBUS_CLIENT_SECRET", SECRET)
    now = [1_000_000.0]
    auth = TokenAuth.from_file(token_file(tmp_path, globus.url), clock=lambda: now[0])
    grant(globus, "AgAlice", exp=now[0] + 100)
    return auth, now


def test_tokens_are_introspected_once_until_they_expire(
    globus: GlobusStandIn, clocked: tuple[TokenAuth, list[float]]
) -> None:
    auth, now = clocked
    globus.tokens["AgNoScope"] = {
        **globus.tokens["AgAlice"],
        "scope": "urn:globus:auth:scope:transfer.api.globus.org:all",
    }
    for _ in range(5):
        tenant = auth.authenticate("AgAlice")
        assert tenant is not None and tenant.name == "alice"  # through a linked identity
    assert globus.calls == 1  # cached by the token's hash
    assert auth.authenticate("AgNoScope") is None  # lacks the service's scope
    assert auth.authenticate("AgUnknown") is None and auth.authenticate("AgUnknown") is None
    assert globus.calls == 3  # the inactive answer is cached too
    del globus.tokens["AgAlice"]  # revoked at Globus Auth: seen once the cached answer expires
    now[0] += 101
    assert auth.authenticate("AgAlice") is None and globus.calls == 4
    bob = auth.authenticate("bob-token-0123456789abcdef")
    assert bob is not None and bob.name == "bob" and globus.calls == 4  # static tokens never ask


def test_only_a_token_globus_must_be_asked_about_may_block_the_event_loop(
    globus: GlobusStandIn, clocked: tuple[TokenAuth, list[float]], tmp_path: Path
) -> None:
    """Routes authenticate on the event loop unless ``may_block``: then on a thread (issue 15)."""
    auth, now = clocked
    assert not auth.may_block("bob-token-0123456789abcdef")  # a static token: no network
    assert not auth.may_block(None) and not auth.may_block("")
    assert auth.may_block("AgAlice") and globus.calls == 0  # asking is not introspecting
    assert auth.authenticate("AgAlice") is not None and globus.calls == 1
    assert not auth.may_block("AgAlice")  # cached now
    now[0] += 101  # the cached answer expired: Globus Auth must be asked again
    assert auth.may_block("AgAlice")
    assert not OpenAuth().may_block("anything")
    # An expired static token is introspected by authenticate, so it may block too.
    introspection = GlobusIntrospection(CLIENT, SECRET, url=globus.url, required_scope=SCOPE)
    expired = TokenAuth(
        [(Tenant("bob"), "bob-token-0123456789abcdef", now[0] - 1)],
        clock=lambda: now[0],
        globus=introspection,
    )
    assert expired.may_block("bob-token-0123456789abcdef")
    static = tmp_path / "static.toml"
    static.write_text('[[tenants]]\nname = "bob"\ntokens = ["bob-token-0123456789abcdef"]\n')
    reloading = ReloadingTokenAuth(static, check_every=3600)
    assert not reloading.may_block("bob-token-0123456789abcdef")  # not due a check of its file
    reloading = ReloadingTokenAuth(static, check_every=0)
    assert reloading.may_block("bob-token-0123456789abcdef")  # due: a stat, maybe a re-read


def test_bad_client_credentials_deny_and_a_missing_secret_is_a_config_error(
    globus: GlobusStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = token_file(tmp_path, globus.url)
    monkeypatch.delenv("FAAS_GLOBUS_CLIENT_SECRET", raising=False)
    with pytest.raises(faas.AuthConfigError, match="FAAS_GLOBUS_CLIENT_SECRET"):
        TokenAuth.from_file(path)
    wrong = GlobusIntrospection(CLIENT, "not-the-secret", url=globus.url, required_scope=SCOPE)
    grant(globus, "AgAlice", exp=time.time() + 100)
    assert wrong.identify("AgAlice") is None and globus.calls == 1


def test_faas_serve_authenticates_globus_tokens(globus: GlobusStandIn, tmp_path: Path) -> None:
    grant(globus, "AgAliceServe", exp=time.time() + 3600)
    with running_service(tmp_path / "svc", extra_env={"FAAS_GLOBUS_CLIENT_SECRET": SECRET}) as service:
        service.tokens.write_text(token_file(tmp_path, globus.url).read_text())  # re-read within 0.25 s
        deadline = time.monotonic() + 10
        status = 0
        while status != 200 and time.monotonic() < deadline:
            with service.client(None) as anon:
                status = anon.get("/v1/session", headers={"Authorization": "Bearer AgAliceServe"}).status_code
        assert status == 200
        with service.client(None) as anon:
            session = anon.get("/v1/session", headers={"Authorization": "Bearer AgAliceServe"}).json()
            assert session["tenant"] == "alice"
            assert anon.get("/v1/session", headers={"Authorization": "Bearer AgStranger"}).status_code == 401
