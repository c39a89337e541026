"""The ``faas`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="tpm-faas: serverless functions for calls to huge models.", no_args_is_help=True)
models_app = typer.Typer(
    help="Models: build the tiny offline model, list known models.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@app.command()
def quickstart(
    prompt: Annotated[str, typer.Option(help="Prompt for the example function.")] = "The quick brown",
    futures: Annotated[int, typer.Option(help="How many concurrent futures to run.")] = 64,
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
) -> None:
    """Build the tiny model if needed, start the embedded pool, run one call and many futures."""
    from faas._quickstart import run_quickstart

    numbers = run_quickstart(prompt=prompt, futures=futures, store=store)
    if numbers["processes_left"] or numbers["futures_correct"] != futures:
        raise typer.Exit(1)


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[Path | None, typer.Argument(help="Output directory (default: the cache).")] = None,
) -> None:
    """Build the tiny offline Llama (tokenizer + weights), with no network access."""
    import time

    from warmpool._tiny_model import build_tiny_model, ensure_tiny_model

    t0 = time.perf_counter()
    path = build_tiny_model(directory) if directory is not None else ensure_tiny_model()
    typer.echo(f"tiny-llama ready at {path} ({time.perf_counter() - t0:.1f} s)")


@models_app.command("ls")
def models_ls(
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
) -> None:
    """List the models the registry knows."""
    from registry import Registry
    from runtime import default_store_url, store_from_url

    for spec in Registry(store_from_url(store or default_store_url())).list_models():
        typer.echo(f"{spec.ref}\t{spec.engine}\t{spec.model_path or '(built-in, built on first use)'}")


pool_app = typer.Typer(help="Pools: what is running and how it is doing.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@pool_app.command("status")
def pool_status(
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status JSON.")] = False,
    max_age: Annotated[float, typer.Option(help="Ignore pools silent for this many seconds.")] = 30.0,
) -> None:
    """Show every live pool on the store: models, queues, replicas, metrics."""
    from faas._status import load_statuses, render_status

    statuses = load_statuses(store, max_age=max_age)
    if as_json:
        import json

        typer.echo(json.dumps(statuses, indent=2, default=str))
        return
    if not statuses:
        typer.echo("No live pool reports to this store.")
        raise typer.Exit(1)
    for status in statuses:
        render_status(status)


# -- triggers (faas/_trigger_cli.py) ------------------------------------------------------
from faas._trigger_cli import triggers_app  # noqa: E402

app.add_typer(triggers_app, name="triggers")
# -- end triggers -------------------------------------------------------------------------


@app.command()
def provenance(
    invocation_id: Annotated[str, typer.Argument(help="The invocation id.")],
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
) -> None:
    """Print an invocation's provenance record (JSON)."""
    from faas._provenance import read_provenance
    from runtime import FaasError, default_store_url, store_from_url

    try:
        record = read_provenance(store_from_url(store or default_store_url()), invocation_id)
    except FaasError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(record.model_dump_json(indent=2))


@app.command()
def replay(
    invocation_id: Annotated[str, typer.Argument(help="The invocation id.")],
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
) -> None:
    """Re-run an invocation (same function, model version, inputs); exit 1 if the output differs."""
    import json

    from faas._client import Client
    from faas._provenance import replay as run_replay
    from runtime import FaasError

    with Client(store=store) as client:
        try:
            report = run_replay(client, invocation_id)
        except FaasError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    typer.echo(json.dumps(report.describe(), indent=2))
    if not report.matches:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    from faas import __version__

    typer.echo(__version__)


def main() -> None:
    """Entry point of the ``faas`` console script."""
    app()


if __name__ == "__main__":
    main()
