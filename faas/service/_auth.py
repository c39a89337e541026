"""Bearer tokens to tenants, for the pool service.

An :class:`Authenticator` turns the token of a request into a :class:`Tenant`
(or None: 401). Two implementations ship: :class:`TokenAuth`, backed by a token
file or ``$FAAS_TOKENS`` (and, with a ``[globus]`` table, Globus Auth access
tokens introspected as FIRST does: see :mod:`faas.service._globus_auth`), and
:class:`OpenAuth`, one tenant and no tokens, for a service bound to 127.0.0.1
for one user.

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

    [[tenants]]
    name = "summer-school"
    tokens = [{token = "sha256:...", expires = 2027-08-31T23:59:59Z}]   # refused after then

A top-level ``revoked = ["sha256:...", ...]`` (before the first ``[[tenants]]``: TOML puts
keys after a table header into that table) refuses those tokens whoever they belong to.

``faas serve`` re-reads the file when it changes (see :class:`ReloadingTokenAuth`), so a
revoked, expired or removed token is refused within a second, with no restart.

Tokens are compared by their sha256 in constant time, and are never logged or
put into an error message.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from faas.service._api import Limits
from faas.service._globus_auth import GlobusIntrospection
from faas.service._tenant import Tenant, parse_grants, parse_scopes, parse_store_credentials
from runtime import AuthConfigError

log = logging.getLogger("faas.service")
_TENANT_KEYS = frozenset(
    {"name", "tokens", "admin", "internals", "globus_identities", "models", "unix_user", "store_credentials"}
)

_TOKEN_KEYS = frozenset({"token", "expires", "scopes"})

_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Authenticator(Protocol):
    """Maps a request's bearer token to a tenant."""

    def authenticate(self, token: str | None) -> Tenant | None:
        """The token's tenant, or None when the token is missing or unknown."""
        ...

    def may_block(self, token: str | None) -> bool:
        """Whether :meth:`authenticate` of ``token`` may wait on I/O (the network, a file).

        Routes authenticate on the event loop when this is False, and on a thread otherwise.
        """
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
        entries: ``(tenant, token[, expires[, scopes]])`` entries; a token may be given
            as ``sha256:<hex>`` so the file holds no secret; ``expires`` is epoch seconds
            after which the token is refused (None: never); ``scopes`` narrows what the
            token may do (None: all its tenant may).
        revoked: Token digests (``sha256:<hex>``) refused whatever the entries say.
        clock: Wall-clock time, for expiry.
        globus: Introspects tokens that match no entry (Globus Auth access tokens).
        identities: Globus identity ids or usernames to tenants, for ``globus``.

    Raises:
        AuthConfigError: No entries, a bad tenant name, a short token, or one tenant
            defined twice with different limits or scopes.
    """

    def __init__(
        self,
        entries: Sequence[tuple[Any, ...]],
        *,
        revoked: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        globus: GlobusIntrospection | None = None,
        identities: Mapping[str, Tenant] | None = None,
    ) -> None:
        if not entries and not (globus and identities):
            raise AuthConfigError("No tokens are configured; give at least one tenant a token.")
        self._clock = clock
        self._globus = globus
        self._identities = dict(identities or {})
        self._digests: list[tuple[bytes, Tenant, float | None, frozenset[str] | None]] = []
        self._tenants: dict[str, Tenant] = {}
        self._revoked = {_parse_digest(r, "a revoked token") for r in revoked}
        for entry in entries:
            tenant, token = entry[0], entry[1]
            expires = entry[2] if len(entry) > 2 else None
            scopes = entry[3] if len(entry) > 3 else None
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
                digest = _parse_digest(token, f"a sha256 token of tenant {tenant.name!r}")
            elif len(token) < 16:
                raise AuthConfigError(f"A token of tenant {tenant.name!r} is shorter than 16 characters.")
            else:
                digest = _digest(token)
            self._digests.append((digest, tenant, expires, scopes))

    @property
    def requires_token(self) -> bool:
        """Always True."""
        return True

    def may_block(self, token: str | None) -> bool:
        """True only for a token that no entry matches and Globus Auth must be asked about."""
        if not token or self._globus is None:
            return False
        digest = _digest(token)
        now = self._clock()
        local = [  # as authenticate decides: an unexpired entry, and no early exit
            hmac.compare_digest(known, digest) and (expires is None or now < expires)
            for known, _, expires, _ in self._digests
        ]
        return not any(local) and digest not in self._revoked and not self._globus.cached(token)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The token's tenant, or None (unknown, expired or revoked); compares in constant time."""
        if not token:
            return None
        digest = _digest(token)
        found: Tenant | None = None
        now = self._clock()
        for known, tenant, expires, scopes in self._digests:  # no early exit: the time tells nothing
            if hmac.compare_digest(known, digest) and (expires is None or now < expires):
                found = tenant if scopes is None else dataclasses.replace(tenant, token_scopes=scopes)
        if digest in self._revoked:
            return None
        if found is None and self._globus is not None:
            identity = self._globus.identify(token)
            names = sorted(identity.names()) if identity is not None else []
            found = next((self._identities[n] for n in names if n in self._identities), None)
        return found

    def tenants(self) -> list[Tenant]:
        """Every configured tenant."""
        return list(self._tenants.values())

    def revoked(self) -> set[str]:
        """The revoked digests, shortened as in :meth:`entries`."""
        return {"sha256:" + d.hex()[:12] for d in self._revoked}

    def entries(self) -> list[tuple[str, str, float | None]]:
        """``(tenant, sha256:<first 12 hex digits>, expires)`` of every token, for audit records."""
        return [(t.name, "sha256:" + d.hex()[:12], e) for d, t, e, _ in self._digests]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> TokenAuth:
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
        entries: list[tuple[Tenant, str, float | None, frozenset[str] | None]] = []
        identities: dict[str, Tenant] = {}
        globus = GlobusIntrospection.from_config(data["globus"], clock=clock) if "globus" in data else None
        for index, raw in enumerate(tenants):
            tokens = raw.get("tokens", []) if isinstance(raw, dict) else None
            if (
                not isinstance(raw, dict)
                or "name" not in raw
                or not isinstance(tokens, list)
                or not (tokens or raw.get("globus_identities"))
            ):
                raise AuthConfigError(
                    f"Tenant entry {index} in {path} needs a 'name' and a 'tokens' "
                    "(or 'globus_identities') list."
                )
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
            unknown = sorted(set(raw) - _TENANT_KEYS - set(Limits.model_fields))
            if unknown:
                raise AuthConfigError(
                    f"Tenant {raw['name']!r} in {path} has unknown keys {unknown} (a top-level key such "
                    "as 'revoked' must come before the first [[tenants]] table)."
                )
            try:
                grants = parse_grants(raw.get("models"), str(raw["name"]), str(path))
                creds = parse_store_credentials(raw.get("store_credentials"), str(raw["name"]), str(path))
            except ValueError as exc:
                raise AuthConfigError(str(exc)) from None
            unix_user = raw.get("unix_user")
            if unix_user is not None and (not isinstance(unix_user, str) or not unix_user):
                raise AuthConfigError(f"Tenant {raw['name']!r} in {path} has a bad unix_user {unix_user!r}.")
            tenant = Tenant(
                str(raw["name"]),
                limits,
                flags["admin"],
                flags["internals"],
                grants,
                unix_user=unix_user,
                store_credentials=creds,
            )
            entries.extend(
                (tenant, *_token_entry(item, tenant.name, path)) for item in raw.get("tokens") or []
            )
            for name in raw.get("globus_identities") or []:
                if globus is None:
                    raise AuthConfigError(
                        f"Tenant {tenant.name!r} in {path} lists globus_identities, "
                        "but the file has no [globus] table."
                    )
                if identities.setdefault(str(name), tenant) != tenant:
                    raise AuthConfigError(f"The Globus identity {name!r} in {path} maps to two tenants.")
        revoked = data.get("revoked") or []
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise AuthConfigError(f"'revoked' in {path} must be a list of 'sha256:<hex>' token digests.")
        return cls(entries, revoked=revoked, clock=clock, globus=globus, identities=identities)

    @classmethod
    def from_env(cls, value: str) -> TokenAuth:
        """Parse ``$FAAS_TOKENS``: ``tenant=token,tenant2=token2``.

        Raises:
            AuthConfigError: An entry is not ``tenant=token``.
        """
        entries: list[tuple[Tenant, str]] = []
        for index, part in enumerate(p for p in value.split(",") if p.strip()):
            name, sep, token = part.strip().partition("=")
            if not sep or not name or not token:
                raise AuthConfigError(f"Entry {index} of FAAS_TOKENS is not of the form tenant=token.")
            entries.append((Tenant(name), token))
        return cls(entries)


def _parse_digest(token: str, what: str) -> bytes:
    try:
        digest = bytes.fromhex(token.removeprefix("sha256:"))
    except ValueError:
        raise AuthConfigError(f"The digest of {what} is not hex.") from None
    if not token.startswith("sha256:") or len(digest) != 32:
        raise AuthConfigError(f"The digest of {what} is not 'sha256:' and 64 hex digits.")
    return digest


def _token_entry(item: object, tenant: str, path: Path) -> tuple[str, float | None, frozenset[str] | None]:
    """A ``tokens`` item: a token, or ``{token = "...", expires = <date-time>, scopes = [...]}``."""
    if isinstance(item, str):
        return item, None, None
    if not isinstance(item, dict) or not isinstance(item.get("token"), str) or set(item) - _TOKEN_KEYS:
        raise AuthConfigError(
            f"A token of tenant {tenant!r} in {path} is neither a string nor "
            "{token = ..., expires = ..., scopes = [...]}."
        )
    try:
        scopes = parse_scopes(item.get("scopes"), tenant, str(path))
    except ValueError as exc:
        raise AuthConfigError(str(exc)) from None
    return item["token"], _expiry(item.get("expires"), tenant, path), scopes


def _expiry(expires: object, tenant: str, path: Path) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, str):
        try:
            expires = datetime.datetime.fromisoformat(expires)
        except ValueError:
            raise AuthConfigError(f"A token of tenant {tenant!r} in {path} has a bad 'expires'.") from None
    if isinstance(expires, datetime.datetime):
        if expires.tzinfo is None:
            raise AuthConfigError(
                f"A token of tenant {tenant!r} in {path} expires at a time without a zone; "
                "add 'Z' or an offset."
            )
        return expires.timestamp()
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return float(expires)
    raise AuthConfigError(f"A token of tenant {tenant!r} in {path} has a bad 'expires': {expires!r}.")


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

    def may_block(self, token: str | None) -> bool:
        """Never: there is nothing to look up."""
        return False

    def tenants(self) -> list[Tenant]:
        """The one tenant."""
        return [self._tenant]


TokenChange = Callable[[str, dict[str, Any]], None]
"""Told ``(action, detail)`` of each change a reload finds (for the audit log)."""


class ReloadingTokenAuth:
    """A token file, re-read when it changes: revocations take effect with no restart.

    At most every ``check_every`` seconds a request stats the file; a new modification
    time, size or inode re-reads it. A file that no longer parses keeps the previous
    tokens in force (and is logged), so a typo cannot lock every tenant out or let
    everyone in. Listeners hear what changed: tokens added, removed or revoked, tenants
    added or removed, scopes changed (digests shortened to 12 hex digits, never tokens).

    Args:
        path: The token file.
        check_every: Seconds between checks of the file.
        clock: Wall-clock time (for expiry); monotonic time paces the checks.

    Raises:
        AuthConfigError: The file is missing or malformed at start.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_every: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[TokenChange] = []
        self._stamp = self._stat()
        self._auth = TokenAuth.from_file(self.path, clock=clock)
        self._next_check = time.monotonic() + check_every

    def listen(self, listener: TokenChange) -> None:
        """Call ``listener(action, detail)`` for every change a reload finds."""
        self._listeners.append(listener)

    @property
    def requires_token(self) -> bool:
        """Always True."""
        return True

    def may_block(self, token: str | None) -> bool:
        """When the file is due a check (a stat, maybe a re-read), or the tokens need the network."""
        return time.monotonic() >= self._next_check or self._auth.may_block(token)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The token's tenant under the file as it is now (re-read if it changed)."""
        self.refresh()
        return self._auth.authenticate(token)

    def tenants(self) -> list[Tenant]:
        """Every tenant of the file as last read."""
        return self._auth.tenants()

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (at most every ``check_every`` s); returns whether it did."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return False
        with self._lock:
            self._next_check = now + self._check_every
            stamp = self._stat()
            if stamp == self._stamp and not force:
                return False
            try:
                fresh = TokenAuth.from_file(self.path, clock=self._clock)
            except AuthConfigError as exc:
                log.error("Keeping the previous tokens: %s", exc)
                return False
            old, self._auth, self._stamp = self._auth, fresh, stamp
        for action, detail in _changes(old, fresh):
            for listener in self._listeners:
                try:
                    listener(action, detail)
                except Exception:
                    log.exception("A token-change listener failed")
        return True

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)


def _policy(t: Tenant) -> tuple[Any, ...]:
    models = sorted((m, sorted(v)) for m, v in t.models.items()) if t.models is not None else None
    creds = sorted(t.store_credentials.items()) if t.store_credentials else None
    return (t.admin, t.internals, t.limits, models, t.unix_user, creds)


def _changes(old: TokenAuth, new: TokenAuth) -> list[tuple[str, dict[str, Any]]]:
    """What differs between two readings of a token file, as audit actions."""
    out: list[tuple[str, dict[str, Any]]] = []
    before, after = {t.name: t for t in old.tenants()}, {t.name: t for t in new.tenants()}
    for name in sorted(after.keys() - before.keys()):
        out.append(
            (
                "tenants.added",
                {"tenant": name, "admin": after[name].admin, "internals": after[name].internals},
            )
        )
    for name in sorted(before.keys() - after.keys()):
        out.append(("tenants.removed", {"tenant": name}))
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name], after[name]
        if _policy(a) != _policy(b):  # scopes, limits, grants, user, credential names
            changed = {"admin": b.admin, "internals": b.internals, "unix_user": b.unix_user}
            grants = {m: sorted(v) for m, v in b.models.items()} if b.models is not None else None
            out.append(("tenants.changed", {"tenant": name, **changed, "models": grants}))
    tokens_before, tokens_after = set(old.entries()), set(new.entries())
    for tenant, digest, expires in sorted(tokens_after - tokens_before, key=str):
        out.append(("tokens.added", {"tenant": tenant, "token": digest, "expires": expires}))
    for tenant, digest, expires in sorted(tokens_before - tokens_after, key=str):
        out.append(("tokens.removed", {"tenant": tenant, "token": digest, "expires": expires}))
    for digest in sorted(new.revoked() - old.revoked()):
        out.append(("tokens.revoked", {"token": digest}))
    return out


def load_authenticator(tokens_file: str | None) -> Authenticator:
    """The authenticator for ``faas serve``: the token file, else ``$FAAS_TOKENS``, else open.

    Raises:
        AuthConfigError: The configured tokens are malformed.
    """
    if tokens_file:
        return ReloadingTokenAuth(tokens_file)
    env = os.environ.get("FAAS_TOKENS", "")
    if env.strip():
        return TokenAuth.from_env(env)
    return OpenAuth()


def token_digest(token: str) -> str:
    """The ``sha256:<hex>`` form of a token, to put in a token file instead of the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
