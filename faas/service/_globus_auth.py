"""Globus Auth bearer tokens: introspected, cached by token hash until they expire.

ALCF's FIRST gateway authenticates users this way, and so can ``faas serve``: a user
sends a Globus Auth access token (issued to the service's resource server, with its
scope); the service asks Globus Auth's token introspection endpoint about it
(``POST /v2/oauth2/token/introspect``, HTTP Basic auth with the service's client id
and secret, form fields ``token`` and ``include=identity_set``) and maps the identity
to a tenant through the token file's ``globus_identities``. Answers are cached by the
token's sha256 (never the token) until the token's ``exp``, so a busy client costs one
introspection per token lifetime; a token Globus Auth calls inactive is remembered for
:data:`NEGATIVE_TTL` seconds. Configured in the token file::

    [globus]
    client_id = "..."                                # the service's confidential client
    client_secret_env = "FAAS_GLOBUS_CLIENT_SECRET"  # the secret stays out of the file
    required_scope = "https://auth.globus.org/scopes/<client id>/faas"

    [[tenants]]
    name = "alice-lab"
    globus_identities = ["<identity uuid>", "alice@uchicago.edu"]
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from runtime import AuthConfigError

log = logging.getLogger("faas.service")

INTROSPECT_URL = "https://auth.globus.org/v2/oauth2/token/introspect"
NEGATIVE_TTL = 30.0
"""Seconds an inactive or unusable token is remembered before asking again."""
MAX_CACHE = 100_000


@dataclass(frozen=True)
class Identity:
    """Who a Globus Auth token belongs to.

    Attributes:
        sub: The identity's id.
        username: Its username (``user@example.org``).
        identity_set: The ids of every identity linked to it.
        expires: When the token stops being valid (epoch seconds).
    """

    sub: str
    username: str
    identity_set: tuple[str, ...]
    expires: float

    def names(self) -> set[str]:
        """Every name a tenant's ``globus_identities`` may list for it."""
        return {self.sub, self.username, *self.identity_set}


class GlobusIntrospection:
    """Introspects Globus Auth tokens, with a cache keyed by token hash.

    Args:
        client_id: The service's Globus Auth client (the resource server).
        client_secret: Its secret.
        required_scope: A token must carry this scope (None: any token of the client).
        url: The introspection endpoint.
        clock: Wall-clock time.
        timeout: Seconds to wait for Globus Auth.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        required_scope: str | None = None,
        url: str = INTROSPECT_URL,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.required_scope = required_scope
        self._clock = clock
        self._http = httpx.Client(auth=(client_id, client_secret), timeout=timeout)
        self._lock = threading.Lock()
        self._cache: dict[bytes, tuple[Identity | None, float]] = {}
        self.calls = 0  # introspection requests sent (for tests and metrics)

    @classmethod
    def from_config(
        cls, table: Mapping[str, Any], *, clock: Callable[[], float] = time.time
    ) -> GlobusIntrospection:
        """Build from the token file's ``[globus]`` table.

        Raises:
            AuthConfigError: A key is missing or the secret's variable is unset.
        """
        client_id = table.get("client_id")
        env = table.get("client_secret_env", "FAAS_GLOBUS_CLIENT_SECRET")
        if not isinstance(client_id, str) or not client_id:
            raise AuthConfigError("The [globus] table needs a client_id.")
        unknown = set(table) - {"client_id", "client_secret_env", "required_scope", "introspect_url"}
        if unknown:
            raise AuthConfigError(f"The [globus] table has unknown keys {sorted(unknown)}.")
        secret = os.environ.get(str(env), "")
        if not secret:
            raise AuthConfigError(
                f"The Globus Auth client secret is not set: export it as ${env} (it never goes in the file)."
            )
        return cls(
            client_id,
            secret,
            required_scope=table.get("required_scope"),
            url=str(table.get("introspect_url", INTROSPECT_URL)),
            clock=clock,
        )

    def cached(self, token: str) -> bool:
        """Whether :meth:`identify` can answer ``token`` from its cache (no introspection)."""
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._cache.get(key)
        return hit is not None and self._clock() < hit[1]

    def identify(self, token: str) -> Identity | None:
        """The token's identity, or None (inactive, expired, without the scope, or unreachable)."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now < hit[1]:
            return hit[0]
        identity = self._introspect(token, now)
        until = identity.expires if identity is not None else now + NEGATIVE_TTL
        with self._lock:
            if len(self._cache) >= MAX_CACHE:  # drop expired answers first, then the oldest
                for k in [k for k, (_, t) in self._cache.items() if t <= now] or list(self._cache)[
                    : MAX_CACHE // 10
                ]:
                    self._cache.pop(k, None)
            self._cache[key] = (identity, until)
        return identity

    def _introspect(self, token: str, now: float) -> Identity | None:
        self.calls += 1
        try:
            response = self._http.post(self.url, data={"token": token, "include": "identity_set"})
        except httpx.HTTPError as exc:
            log.error("Globus Auth introspection failed: %s", exc)
            return None
        if response.status_code != 200:
            log.error(
                "Globus Auth introspection answered HTTP %d (check the client id and secret)",
                response.status_code,
            )
            return None
        body = response.json()
        if not isinstance(body, dict) or body.get("active") is not True:
            return None
        exp = float(body.get("exp") or 0)
        scopes = str(body.get("scope") or "").split()
        if exp <= now or (self.required_scope and self.required_scope not in scopes):
            return None
        return Identity(
            sub=str(body.get("sub") or ""),
            username=str(body.get("username") or ""),
            identity_set=tuple(str(i) for i in body.get("identity_set") or ()),
            expires=exp,
        )
