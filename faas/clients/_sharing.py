"""Sharing functions between tenants of a pool service (a mixin of :class:`faas.RemoteClient`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from registry import FunctionSpec

if TYPE_CHECKING:
    import httpx


class SharingCalls:
    """``share``, ``unshare``, ``shares`` and ``shared``; the client provides ``_request``."""

    def _request(
        self, method: str, path: str, *, content: bytes | None = None, timeout: float | None = None
    ) -> httpx.Response:
        raise NotImplementedError

    def share(self, function: str, tenant: str) -> dict[str, Any]:
        """Let ``tenant`` invoke your function ``function`` (every version) as ``<you>/<function>``.

        Raises:
            NotFoundError: You have no such function.
            SubmitError: ``tenant`` is not another tenant of the service.
        """
        body = json.dumps({"tenant": tenant}).encode()
        out: dict[str, Any] = self._request(
            "POST", f"/v1/functions/{quote(function)}/shares", content=body
        ).json()
        return out

    def unshare(self, function: str, tenant: str) -> bool:
        """Stop sharing ``function`` with ``tenant``; returns whether it was shared."""
        path = f"/v1/functions/{quote(function)}/shares/{quote(tenant)}"
        return bool(self._request("DELETE", path).json()["removed"])

    def shares(self, function: str) -> list[str]:
        """The tenants your function ``function`` is shared with."""
        return list(self._request("GET", f"/v1/functions/{quote(function)}/shares").json()["tenants"])

    def shared(self, ref: str | None = None) -> list[FunctionSpec]:
        """The functions shared with you (named ``owner/name``), or the one ``ref`` names.

        Invoke one with ``client.submit_by_name("owner/name", args, kwargs)``.
        """
        if ref is not None:
            return [FunctionSpec.model_validate_json(self._request("GET", f"/v1/shared/{ref}").content)]
        return [FunctionSpec.model_validate(s) for s in self._request("GET", "/v1/shared").json()]
