"""``faas models adapter ...``: LoRA adapters as model versions (add, ls, alias)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from registry import Registry
from runtime import SubmitError, default_store_url, store_from_url

adapter_app = typer.Typer(
    help="LoRA adapters of a model version: add a version, list them, move an alias.", no_args_is_help=True
)

_STORE = typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")


def _registry(store: str | None) -> Registry:
    return Registry(store_from_url(store or default_store_url()))


@adapter_app.command("add")
def adapter_add(
    name: Annotated[str, typer.Argument(help="The adapter's name (e.g. chem).")],
    directory: Annotated[
        Path, typer.Argument(help="PEFT directory: adapter_config.json, adapter_model.safetensors.")
    ],
    base: Annotated[str, typer.Option(help="The model it adapts: name, name@alias or name@version.")],
    version: Annotated[str | None, typer.Option(help="Version label (default: the next number).")] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at it ('' for none).")] = "latest",
    store: Annotated[str | None, _STORE] = None,
) -> None:
    """Upload an adapter directory as a new version (its sha256 is recorded and checked on every use)."""
    registry = _registry(store)
    try:
        base_ref = registry.get_model(base).ref
        spec = registry.adapters.add(directory, name, base_ref, version=version, alias=alias or None)
    except SubmitError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{spec.ref}\tbase {spec.base_model}\trank {spec.rank}\tsha256 {spec.sha256}")


@adapter_app.command("ls")
def adapter_ls(store: Annotated[str | None, _STORE] = None) -> None:
    """List every adapter version: base model, rank, digest and the aliases naming it."""
    for spec, aliases in _registry(store).adapters.versions():
        names = ",".join(aliases) or "-"
        typer.echo(f"{spec.ref}\t{spec.base_model}\trank {spec.rank}\t{names}\tsha256 {spec.sha256[:16]}")


@adapter_app.command("alias")
def adapter_alias(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    version: Annotated[str, typer.Argument(help="The version the alias should name.")],
    alias: Annotated[str, typer.Option(help="Which alias to move.")] = "latest",
    store: Annotated[str | None, _STORE] = None,
) -> None:
    """Point NAME@ALIAS at VERSION in the registry.

    Invocations submitted before keep the version they resolved; engines load the new
    version on first use. A running embedded pool also warms and drains
    (``Client.set_adapter_alias``).
    """
    registry = _registry(store)
    try:
        before = registry.adapters.get(f"{name}@{alias}").ref
    except SubmitError:
        before = "-"
    try:
        spec = registry.adapters.set_alias(name, alias, version)
    except SubmitError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{name}@{alias}: {before} -> {spec.ref}")
