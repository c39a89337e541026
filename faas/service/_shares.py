"""Sharing a function with another tenant (invoke only), as ``owner/name``.

An owner shares its function ``summarize`` with tenant ``bob``; bob then invokes
``alice/summarize`` (``name@version`` pins a version) like one of his own. The call is
bob's invocation: it runs in bob's workers with bob's credentials and scopes, is charged
to bob, and its records and result live in bob's space; alice sees neither its arguments
nor its result. What is shared is the code: on first use the artifact and its spec are
copied, by digest, into bob's registry (so bob's workers load it from bob's store, and a
restart replays it), under the name ``alice/summarize``.

Share records live in the service's store outside every tenant's prefix (a tenant's own
store credentials cannot forge one)::

    shares/<owner>/<name>/<grantee>.json     the grant (owner, name, grantee, at)
    shares-to/<grantee>/<owner>/<name>.json  the same, indexed by grantee for listing

Adding and removing shares are audited (``share.added``, ``share.removed``).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from faas.service._audit import AuditLog
from faas.service._tenant import Tenant
from registry import FunctionSpec, Registry
from runtime import (
    NotFoundError,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    SubmitError,
    UnknownFunctionError,
    scoped_store,
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _checked(name: str, grantee: str | None = None) -> None:
    """Names from a URL path: anything that cannot be a function or tenant name is a 404."""
    if not _NAME.fullmatch(name) or (grantee is not None and not _TENANT.fullmatch(grantee)):
        raise NotFoundError(f"You have no function {name!r} shared with {grantee or 'anyone'}.", 404)


def split_shared(ref: str) -> tuple[str, str] | None:
    """``("alice", "summarize@3")`` for ``"alice/summarize@3"``; None for a plain ref."""
    owner, sep, rest = ref.partition("/")
    if not sep:
        return None
    if not _TENANT.fullmatch(owner) or not _NAME.fullmatch(rest.partition("@")[0]):
        raise NotFoundError(f"No function {ref!r} is shared with you.", 404)
    return owner, rest


class Shares:
    """Share records, and resolving ``owner/name`` refs for a grantee.

    Args:
        store: The service's store (its root: tenants live under ``tenants/<name>``).
        audit: Where share changes are recorded.
    """

    def __init__(self, store: ObjectStore, audit: AuditLog) -> None:
        self.store = store
        self.audit = audit

    def _registry(self, tenant: str) -> Registry:
        return Registry(scoped_store(self.store, f"tenants/{tenant}"))

    def share(self, owner: Tenant, name: str, grantee: str, known: set[str]) -> dict[str, Any]:
        """Let ``grantee`` invoke ``owner``'s function ``name`` (every version).

        Raises:
            NotFoundError: The owner has no such function.
            SubmitError: The grantee is not a tenant, or is the owner.
        """
        _checked(name)
        if grantee == owner.name or grantee not in known:
            raise SubmitError(f"{grantee!r} is not another tenant of this service; nothing was shared.")
        try:
            self._registry(owner.name).get_function(name)
        except (UnknownFunctionError, ValueError):
            raise NotFoundError(f"You have no function {name!r} to share.", 404) from None
        record = {"owner": owner.name, "name": name, "grantee": grantee, "at": time.time()}
        data = json.dumps(record).encode()
        self.store.put(f"shares/{owner.name}/{name}/{grantee}.json", data)
        self.store.put(f"shares-to/{grantee}/{owner.name}/{name}.json", data)
        self.audit.append("share.added", owner.name, function=name, grantee=grantee)
        return record

    def unshare(self, owner: Tenant, name: str, grantee: str) -> bool:
        """Stop sharing; returns whether there was a share. Invocations already accepted still run."""
        _checked(name, grantee)
        found = self.store.exists(f"shares/{owner.name}/{name}/{grantee}.json")
        if found:
            self.store.delete(f"shares/{owner.name}/{name}/{grantee}.json")
            self.store.delete(f"shares-to/{grantee}/{owner.name}/{name}.json")
            self.audit.append("share.removed", owner.name, function=name, grantee=grantee)
        return found

    def grantees(self, owner: Tenant, name: str) -> list[str]:
        """Who ``owner``'s function ``name`` is shared with."""
        _checked(name)
        prefix = f"shares/{owner.name}/{name}/"
        return sorted(k.removeprefix(prefix).removesuffix(".json") for k in self.store.list(prefix))

    def received(self, grantee: str) -> list[FunctionSpec]:
        """The latest version of every function shared with ``grantee``, named ``owner/name``."""
        prefix = f"shares-to/{grantee}/"
        out = []
        for key in sorted(self.store.list(prefix)):
            owner, _, name = key.removeprefix(prefix).removesuffix(".json").partition("/")
            try:
                out.append(self.describe(grantee, f"{owner}/{name}"))
            except NotFoundError:
                continue  # unshared or deleted since it was listed
        return out

    def describe(self, grantee: str, ref: str) -> FunctionSpec:
        """The spec of a function shared with ``grantee``, named ``owner/name``.

        Raises:
            NotFoundError: It is not shared with ``grantee`` (or does not exist).
        """
        parts = split_shared(ref)
        if parts is None:
            raise NotFoundError(f"{ref!r} is not an owner/name reference.", 404)
        owner, rest = parts
        name = rest.partition("@")[0]
        if not self.store.exists(f"shares/{owner}/{name}/{grantee}.json"):
            raise NotFoundError(f"No function {ref!r} is shared with you.", 404)
        try:
            spec = self._registry(owner).get_function(rest)
        except (UnknownFunctionError, ValueError):
            raise NotFoundError(f"No function {ref!r} is shared with you.", 404) from None
        return spec.model_copy(update={"name": f"{owner}/{spec.name}"})

    def adopt(self, grantee: str, grantee_store: ObjectStore, ref: str) -> FunctionSpec:
        """Resolve a shared ref for ``grantee`` and copy its artifact and spec into the grantee's registry.

        Raises:
            NotFoundError: It is not shared with ``grantee``.
        """
        spec = self.describe(grantee, ref)
        owner = ref.partition("/")[0]
        artifact = f"registry/artifacts/{spec.digest}"
        if not grantee_store.exists(artifact):
            try:
                grantee_store.put(artifact, self._registry(owner).store.get(artifact), if_absent=True)
            except ObjectExists:
                pass  # a concurrent first use wrote the same bytes
            except ObjectNotFound:
                raise NotFoundError(f"The artifact of {ref!r} is gone.", 404) from None
        digest_key = f"registry/digests/{spec.digest}.json"
        if not grantee_store.exists(digest_key):  # lets a restart (and workers) find it by digest
            grantee_store.put(digest_key, spec.model_dump_json().encode())
        return spec


class SharingRegistry(Registry):
    """A tenant's registry that also resolves ``owner/name`` refs shared with the tenant."""

    def __init__(self, store: ObjectStore, tenant: str, shares: Shares) -> None:
        super().__init__(store)
        self._tenant = tenant
        self._shares = shares

    def get_function(self, ref: str) -> FunctionSpec:
        """Resolve ``name``/``name@version``/a digest, or ``owner/name[@version]`` shared with the tenant."""
        if "/" in ref:
            return self._shares.adopt(self._tenant, self.store, ref)
        return super().get_function(ref)
