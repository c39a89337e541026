"""``faas share``, ``faas unshare`` and ``faas shared``: functions shared between tenants of a service."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from faas.cli._service import _call, _client, _fail, _out

if TYPE_CHECKING:
    from faas.clients._remote import RemoteClient


def _remote() -> RemoteClient:
    from faas.clients._remote import RemoteClient

    client = _client()
    if not isinstance(client, RemoteClient):
        raise _fail("Sharing is between tenants of a service: set $FAAS_URL and $FAAS_TOKEN.")
    return client


def share(
    function: Annotated[str, typer.Argument(help="Your function's name.")],
    tenant: Annotated[str, typer.Argument(help="The tenant that may invoke it (as <you>/<function>).")],
) -> None:
    """Let another tenant invoke one of your functions (every version; invoke only)."""
    record = _call(lambda: _remote().share(function, tenant))
    _out().print(f"Shared {function} with {tenant}: it invokes {record['owner']}/{function}.")


def unshare(
    function: Annotated[str, typer.Argument(help="Your function's name.")],
    tenant: Annotated[str, typer.Argument(help="The tenant to stop sharing it with.")],
) -> None:
    """Stop sharing a function (invocations already accepted still finish)."""
    removed = _call(lambda: _remote().unshare(function, tenant))
    _out().print(
        f"{function} is no longer shared with {tenant}."
        if removed
        else f"{function} was not shared with {tenant}."
    )


def shared(
    ref: Annotated[
        str | None, typer.Argument(help="owner/name[@version] to describe (default: list all).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the specs as JSON.")] = False,
) -> None:
    """List the functions other tenants share with you, or describe one."""
    specs = _call(lambda: _remote().shared(ref))
    if as_json:
        typer.echo(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
        return
    if not specs:
        _out().print("Nothing is shared with you.")
    for s in specs:
        where = f"{s.module}.{s.qualname}" if s.module else s.qualname
        model = s.model or "-"
        _out().print(f"{s.name}@{s.version}  model={model}  digest={s.digest[:12]}  {where}", markup=False)
