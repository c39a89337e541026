"""Bearer tokens to tenants, for the pool service.

An :class:`Authenticator` turns the token of a request into a :class:`Tenant`
(or None: 401). Two implementations ship: :class:`TokenAuth`, backed by a token
file or ``$FAAS_TOKENS``, and :class:`OpenAuth`, one tenant and no tokens, for
a service bound to 127.0.0.1 for one user. Globus Auth can back a third later:
it only has to satisfy the protocol.

Token file (TOML or JSON)::

    [[tenants]]
    name = "alice-lab"
    tokens = ["sha256:9f86d0...", "a-plain-token"]   # prefer the sha256 form
    max_inflight = 64
    max_queued = 10000
    tokens_per_minute = 200000     # token budgets (prompt + completion), sliding windows
    tokens_per_30d = 500000000
    weight = 3                # share of each shared engine (default 1)

    [[tenants]]
    name = "ops"
    tokens = ["sha256:4e07408..."]
    admin = true              # its tokens may read every tenant's usage (default false)

    [[tenants]]
    name = "teaching"
    tokens = ["sha256:2c26b46..."]
    internals = false         # no logprobs, hidden states or hook points (default true)

Tokens are compared by their sha256 in constant time, and are never logged or
put into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from faas.service._api import Limits
from runtime import AuthConfigError

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Tenant:
    """A group of users sharing functions, invocations and staged data.

    Attributes:
        name: Lowercase name; also the store prefix ``tenants/<name>``.
        limits: The tenant's quotas.
        admin: Whether the tenant's tokens are operators' tokens: they may read
            every tenant's usage (``GET /v1/usage?tenant=...`` or ``?all_tenants=true``).
            Everything else stays scoped to the tenant itself.
        internals: The ``internals`` scope: whether the tenant's functions may use
            the modes that expose model internals (logprobs, hidden states, hook-point
            reads and writes). Without it they are refused in the worker with
            ``MissingScopeError`` before any engine request.
    """

    name: str
    limits: Limits = field(default_factory=Limits)
    admin: bool = False
    internals: bool = True

    @property
    def prefix(self) -> str:
        """Where the tenant's objects live in the service's store."""
        return f"tenants/{self.name}"


class Authenticator(Protocol):
    """Maps a request's bearer token to a tenant."""

    def authenticate(self, token: str | None) -> Tenant | None:
        """The token's tenant, or None when the token is missing or unknown."""
        ...

    @property
    def requires_token(self) -> bool:
        """Whether requests must carry a token."""
        ...

    def tenants(self) -> list[Tenant]:
        """Every tenant (for restarts and metrics)."""
        ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Tokens from a file or the environment.

    Args:
        entries: ``(tenant, token)`` pairs; a token may be given as
            ``sha256:<hex>`` so the file holds no secret.
    """

    def __init__(self, entries: list[tuple[Tenant, str]]) -> None:
        if not entries:
            raise AuthConfigError("No tokens are configured; give at least one tenant a token.")
        self._digests: list[tuple[bytes, Tenant]] = []
        self._tenants: dict[str, Tenant] = {}
        for tenant, token in entries:
            if not _TENANT.match(tenant.name):
                raise AuthConfigError(
                    f"Tenant name {tenant.name!r} is not valid: use 1-63 lowercase letters, "
                    "digits, '-' or '_'."
                )
            known = self._tenants.setdefault(tenant.name, tenant)
            if known != tenant:
                raise AuthConfigError(
                    f"Tenant {tenant.name!r} is defined twice with different limits or scopes."
                )
            if token.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(token.removeprefix("sha256:"))
                except ValueError:
                    raise AuthConfigError(f"A sha256 token of tenant {tenant.name!r} is not hex.") from None
                if len(digest) != 32:
                    raise AuthConfigError(f"A sha256 token of tenant {tenant.name!r} is not 64 hex digits.")
            elif len(token) < 16:
                raise AuthConfigError(f"A token of tenant {tenant.name!r} is shorter than 16 characters.")
            else:
                digest = _digest(token)
            self._digests.append((digest, tenant))

    @property
    def requires_token(self) -> bool:
        """Always True."""
        return True

    def authenticate(self, token: str | None) -> Tenant | None:
        """The token's tenant, or None; compares digests in constant time."""
        if not token:
            return None
        digest = _digest(token)
        found: Tenant | None = None
        for known, tenant in self._digests:  # no early exit: the time does not tell which entry matched
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def tenants(self) -> list[Tenant]:
        """Every configured tenant."""
        return list(self._tenants.values())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenAuth:
        """Read a TOML (``.toml``) or JSON token file (see the module docstring).

        Raises:
            AuthConfigError: The file is missing or malformed.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AuthConfigError(f"Cannot read the token file {path}: {exc.strerror}.") from None
        except UnicodeDecodeError:
            raise AuthConfigError(f"The token file {path} is not UTF-8 text.") from None
        try:
            data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise AuthConfigError(f"The token file {path} does not parse: {exc}.") from None
        tenants = data.get("tenants") if isinstance(data, dict) else None
        if not isinstance(tenants, list):
            raise AuthConfigError(f"The token file {path} needs a list of tenants ('[[tenants]]' entries).")
        entries: list[tuple[Tenant, str]] = []
        for index, raw in enumerate(tenants):
            tokens = raw.get("tokens") if isinstance(raw, dict) else None
            if not isinstance(raw, dict) or "name" not in raw or not isinstance(tokens, list) or not tokens:
                raise AuthConfigError(f"Tenant entry {index} in {path} needs a 'name' and a 'tokens' list.")
            try:
                limits = Limits(**{k: raw[k] for k in Limits.model_fields if k in raw})
            except ValueError as exc:
                raise AuthConfigError(f"Tenant {raw['name']!r} in {path} has bad limits: {exc}") from None
            flags = {key: raw.get(key, default) for key, default in (("admin", False), ("internals", True))}
            for key, value in flags.items():
                if not isinstance(value, bool):  # "yes" or 1 must not grant a scope by accident
                    raise AuthConfigError(
                        f"Tenant {raw['name']!r} in {path} has {key} = {value!r}; it must be true or false."
                    )
            tenant = Tenant(str(raw["name"]), limits, flags["admin"], flags["internals"])
            entries.extend((tenant, str(token)) for token in raw["tokens"])
        return cls(entries)

    @classmethod
    def from_env(cls, value: str) -> TokenAuth:
        """Parse ``$FAAS_TOKENS``: ``tenant=token,tenant2=token2``.

        Raises:
            AuthConfigError: An entry is not ``tenant=token``.
        """
        entries = []
        for index, part in enumerate(p for p in value.split(",") if p.strip()):
            name, sep, token = part.strip().partition("=")
            if not sep or not name or not token:
                raise AuthConfigError(f"Entry {index} of FAAS_TOKENS is not of the form tenant=token.")
            entries.append((Tenant(name), token))
        return cls(entries)


class OpenAuth:
    """No tokens: every request is the one tenant (for a loopback service of one user).

    Args:
        tenant: The tenant every request maps to.
    """

    def __init__(self, tenant: Tenant | None = None) -> None:
        self._tenant = tenant or Tenant("default")

    @property
    def requires_token(self) -> bool:
        """Always False."""
        return False

    def authenticate(self, token: str | None) -> Tenant | None:
        """The one tenant, whatever the token."""
        return self._tenant

    def tenants(self) -> list[Tenant]:
        """The one tenant."""
        return [self._tenant]


def load_authenticator(tokens_file: str | None) -> Authenticator:
    """The authenticator for ``faas serve``: the token file, else ``$FAAS_TOKENS``, else open.

    Raises:
        AuthConfigError: The configured tokens are malformed.
    """
    if tokens_file:
        return TokenAuth.from_file(tokens_file)
    env = os.environ.get("FAAS_TOKENS", "")
    if env.strip():
        return TokenAuth.from_env(env)
    return OpenAuth()


def token_digest(token: str) -> str:
    """The ``sha256:<hex>`` form of a token, to put in a token file instead of the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
