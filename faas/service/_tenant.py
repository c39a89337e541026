"""Tenants, the scopes of their tokens, their grants of model x mode, and the one authorisation step.

Scopes (a token has a subset of its tenant's)::

    read       GET routes and the result stream (POST /v1/watch)
    invoke     everything that changes state: register, submit, cancel, bind, upload
    internals  the modes that expose model internals (logprobs, hidden states, hook points);
               a tenant has it unless ``internals = false``
    admin      read every tenant's usage; a tenant has it with ``admin = true``

Grants (``models`` in the token file) limit which models a tenant may call and with which
modes; without them, every model with the modes its own spec allows. A call outside them
fails before any work: at submit for a model the tenant may not use at all (403), in the
worker before any engine request for a mode it may not use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from faas.service._api import Limits
from runtime import (
    MODES,
    AuthConfigError,
    AuthError,
    ForbiddenError,
    ObjectStore,
    scoped_config,
    store_from_config,
)

SCOPES = frozenset({"read", "invoke", "internals", "admin"})
_CREDENTIAL_VARS = {
    "access_key_id_env": "AWS_ACCESS_KEY_ID",
    "secret_access_key_env": "AWS_SECRET_ACCESS_KEY",
    "session_token_env": "AWS_SESSION_TOKEN",
}
READ_ONLY_POSTS = frozenset({"/v1/watch"})
"""POST routes that only read (so a ``read`` token may use them)."""


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
        models: Grants: model name (``*``: any other) to the modes the tenant may use
            on it; None: every model, every mode its spec allows.
        token_scopes: The scopes of the token this request came with (None: all the
            tenant has); set by the authenticator, per request.
        unix_user: The Unix user the tenant's worker processes run as (identity
            mapping; ``faas serve`` must run as root). None: the service's own user.
        store_credentials: Names of the service's environment variables holding the
            tenant's own S3 key (``access_key_id_env``, ``secret_access_key_env``,
            optionally ``session_token_env``): its workers get those, as
            ``AWS_ACCESS_KEY_ID``/..., and none of the service's.
    """

    name: str
    limits: Limits = field(default_factory=Limits)
    admin: bool = False
    internals: bool = True
    models: Mapping[str, frozenset[str]] | None = field(default=None, hash=False)
    token_scopes: frozenset[str] | None = None
    unix_user: str | None = None
    store_credentials: Mapping[str, str] | None = field(default=None, hash=False)

    @property
    def prefix(self) -> str:
        """Where the tenant's objects live in the service's store."""
        return f"tenants/{self.name}"

    def scoped(self, store: ObjectStore) -> ObjectStore:
        """The tenant's part of the service's store (``tenants/<name>``).

        On a file store with a ``unix_user``, that part belongs to the user (0700
        directories, 0600 files), so its workers read and write it and no other
        tenant's user can; on S3, ``store_credentials`` scope it.
        """
        config = scoped_config(store.config(), self.prefix)
        if self.unix_user and config["kind"] == "file":
            config["options"]["owner"] = self.unix_user
        return store_from_config(config)

    def store_env(self) -> dict[str, str]:
        """The tenant workers' S3 credentials, read from the service's environment now.

        Raises:
            AuthConfigError: A named variable is not set (the tenant's workers do not start).
        """
        out = {}
        for key, var in (self.store_credentials or {}).items():
            value = os.environ.get(var)
            if not value:
                raise AuthConfigError(
                    f"Tenant {self.name!r}'s store credential ${var} is not set in the service."
                )
            out[_CREDENTIAL_VARS[key]] = value
        return out

    def may(self, scope: str) -> bool:
        """Whether this request's token has ``scope`` (within what the tenant has)."""
        has = (
            {"read", "invoke"}
            | ({"internals"} if self.internals else set())
            | ({"admin"} if self.admin else set())
        )
        return scope in has and (self.token_scopes is None or scope in self.token_scopes)

    def granted_modes(self, model: str) -> frozenset[str] | None:
        """The modes granted on ``model`` (a name or ``name@version``); None: all."""
        if self.models is None:
            return None
        name = model.partition("@")[0]
        return self.models.get(name, self.models.get("*", frozenset()))

    def check_model(self, model: str) -> None:
        """Refuse a model the tenant has no grant for.

        Raises:
            ForbiddenError: No mode of ``model`` is granted (HTTP 403).
        """
        if self.granted_modes(model) == frozenset():
            raise ForbiddenError(
                f"Tenant {self.name!r} is not granted model {model.partition('@')[0]!r} "
                "(its 'models' grants in the token file); nothing was accepted.",
                403,
            )

    def invocation_policy(self, model: str | None) -> dict[str, Any]:
        """What an invocation carries to its worker: the internals scope and the granted modes.

        Raises:
            ForbiddenError: ``model`` is not granted at all (HTTP 403).
        """
        if model:
            self.check_model(model)
        granted = self.granted_modes(model) if model else None
        return {
            "internals_scope": self.may("internals"),
            "granted_modes": tuple(sorted(granted)) if granted is not None else None,
        }


def parse_grants(raw: object, tenant: str, where: str) -> dict[str, frozenset[str]] | None:
    """A tenant's ``models`` table: model name to a list of modes.

    Raises:
        ValueError: Not a table of lists of known modes (the caller makes it a config error).
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"Tenant {tenant!r} in {where}: 'models' must be a table of model = [modes].")
    out = {}
    for model, modes in raw.items():
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise ValueError(f"Tenant {tenant!r} in {where}: models.{model} must be a list of modes.")
        unknown = set(modes) - MODES
        if unknown:
            raise ValueError(
                f"Tenant {tenant!r} in {where}: models.{model} has unknown modes {sorted(unknown)} "
                f"(the modes are {sorted(MODES)})."
            )
        out[str(model)] = frozenset(modes)
    return out


def parse_store_credentials(raw: object, tenant: str, where: str) -> dict[str, str] | None:
    """A tenant's ``store_credentials`` table: which service variables hold its S3 key.

    Raises:
        ValueError: Not a table naming both key variables (and nothing else).
    """
    if raw is None:
        return None
    if (
        not isinstance(raw, Mapping)
        or set(raw) - set(_CREDENTIAL_VARS)
        or not {"access_key_id_env", "secret_access_key_env"} <= set(raw)
        or not all(isinstance(v, str) and v for v in raw.values())
    ):
        raise ValueError(
            f'Tenant {tenant!r} in {where}: store_credentials must be {{access_key_id_env = "VAR", '
            'secret_access_key_env = "VAR"}} (optionally session_token_env): the names of the '
            "service's environment variables holding the tenant's key, never the key itself."
        )
    return {str(k): str(v) for k, v in raw.items()}


def parse_scopes(raw: object, tenant: str, where: str) -> frozenset[str] | None:
    """A token's ``scopes`` list (None: all the tenant has).

    Raises:
        ValueError: Not a list of known scopes.
    """
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw) or set(raw) - SCOPES:
        raise ValueError(
            f"A token of tenant {tenant!r} in {where} has scopes {raw!r}; they must be a list drawn "
            f"from {sorted(SCOPES)}."
        )
    return frozenset(raw)


class _Auth(Protocol):
    def authenticate(self, token: str | None) -> Tenant | None: ...

    def may_block(self, token: str | None) -> bool: ...


def authorize(auth: _Auth, header: str, method: str, path: str, *, what: str = "bearer token") -> Tenant:
    """The one authorisation step of every route: bearer token to tenant, then the method's scope.

    Args:
        auth: The service's authenticator.
        header: The ``Authorization`` header ("" when absent).
        method: The HTTP method.
        path: The route's path.
        what: How the token is called in messages ("API key" for the OpenAI routes).

    Raises:
        AuthError: No token, or an unknown, expired or revoked one (HTTP 401).
        ForbiddenError: A valid token without the scope the request needs (HTTP 403).
    """
    scheme, _, token = header.partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else None
    found = auth.authenticate(bearer)
    if found is None:
        why = "is not valid" if bearer else "is missing"
        if header and bearer is None:  # never quote the header: it may hold a secret
            why += f" (the Authorization header's scheme is {scheme[:16]!r}, not 'Bearer')"
        raise AuthError(f"The {what} {why}; pass it as 'Authorization: Bearer <token>'.", 401)
    needs = "read" if method in ("GET", "HEAD") or path in READ_ONLY_POSTS else "invoke"
    if not found.may(needs):
        raise ForbiddenError(
            f"This token of tenant {found.name!r} lacks the '{needs}' scope that {method} {path} needs.", 403
        )
    return found


async def authorize_request(
    auth: _Auth, header: str, method: str, path: str, *, what: str = "bearer token"
) -> Tenant:
    """:func:`authorize` from a route: on the event loop when no I/O is needed, else on a thread.

    A token the service knows (or Globus Auth answered recently) costs microseconds, and a
    trip to the thread pool and back costs more than that on every request. A token that
    must be introspected, or a token file due a check, waits on a thread instead of
    holding up the event loop.
    """
    scheme, _, token = header.partition(" ")
    if auth.may_block(token.strip() if scheme.lower() == "bearer" else None):
        return await run_in_threadpool(authorize, auth, header, method, path, what=what)
    return authorize(auth, header, method, path, what=what)
