"""The ``faas`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from faas._replay_compare import DEFAULT_ATOL, DEFAULT_RTOL
from faas.cli._adapters import adapter_app

app = typer.Typer(help="tpm-faas: serverless functions for calls to huge models.", no_args_is_help=True)
models_app = typer.Typer(
    help="Models: build the tiny offline model, list known models, upload and stage weights.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
models_app.add_typer(adapter_app, name="adapter")


@app.command()
def quickstart(
    prompt: Annotated[str, typer.Option(help="Prompt for the example function.")] = "The quick brown",
    futures: Annotated[int, typer.Option(help="How many concurrent futures to run.")] = 64,
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
) -> None:
    """Build the tiny model if needed, start the embedded pool, run one call and many futures."""
    from faas.cli._quickstart import run_quickstart

    numbers = run_quickstart(prompt=prompt, futures=futures, store=store)
    if numbers["processes_left"] or numbers["futures_correct"] != futures:
        raise typer.Exit(1)


@models_app.command("build-tiny")
def build_tiny(
    directory: Annotated[Path | None, typer.Argument(help="Output directory (default: the cache).")] = None,
) -> None:
    """Build the tiny offline Llama (tokenizer + weights), with no network access."""
    import time

    from warmpool.cpu_engine import build_tiny_model, ensure_tiny_model

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


@models_app.command("upload-weights")
def upload_weights_cmd(
    directory: Annotated[Path, typer.Argument(help="The model directory (config, tokenizer, safetensors).")],
    uri: Annotated[
        str, typer.Argument(help="Where they go: s3://bucket/prefix?endpoint_url=... or file:///dir.")
    ],
) -> None:
    """Upload a model directory and its manifest (sizes, sha256) for staging by weights_uri."""
    from runtime import FaasError
    from warmpool.weights import upload_weights

    try:
        manifest = upload_weights(directory, uri)
    except FaasError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"uploaded {len(manifest.files)} files, {manifest.total_bytes} bytes; digest {manifest.digest}"
    )


@models_app.command("stage")
def stage_weights_cmd(
    uri: Annotated[str, typer.Argument(help="The weights' URI, as in a model's weights_uri.")],
) -> None:
    """Stage weights into this node's cache ($FAAS_WEIGHTS_CACHE) ahead of any engine."""
    from runtime import FaasError
    from warmpool.weights import default_cache

    try:
        with default_cache().stage(uri) as staged:
            how = "cache hit" if staged.cache_hit else f"fetched {staged.fetched_bytes} bytes"
            typer.echo(f"staged at {staged.path} ({how}, {staged.seconds:.1f} s)")
    except FaasError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


pool_app = typer.Typer(help="Pools: what is running and how it is doing.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")


@pool_app.command("status")
def pool_status(
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status JSON.")] = False,
    max_age: Annotated[float, typer.Option(help="Ignore pools silent for this many seconds.")] = 30.0,
) -> None:
    """Show every live pool on the store (or the service's, with $FAAS_URL): models, replicas, metrics."""
    import os

    from faas.cli._status import load_statuses, render_status

    if os.environ.get("FAAS_URL") and store is None:
        from faas.clients._default import get_client

        statuses = [get_client().status()]
    else:
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


# -- triggers (faas/cli/_triggers.py) ------------------------------------------------------
from faas.cli._triggers import triggers_app  # noqa: E402

app.add_typer(triggers_app, name="triggers")
# -- end triggers -------------------------------------------------------------------------

# -- functions and invocations (faas/cli/_service.py) -------------------------------------
from faas.cli._service import register_commands as _register_service_commands  # noqa: E402

_register_service_commands(app)

# -- usage ledger (faas/cli/_usage.py) ----------------------------------------------------
from faas.cli._usage import usage as _usage  # noqa: E402

app.command("usage")(_usage)

# -- sharing (faas/cli/_share.py) ---------------------------------------------------------
from faas.cli._share import share as _share  # noqa: E402
from faas.cli._share import shared as _shared  # noqa: E402
from faas.cli._share import unshare as _unshare  # noqa: E402

app.command("share")(_share)
app.command("unshare")(_unshare)
app.command("shared")(_shared)

# -- audit log (faas/cli/_audit.py) -------------------------------------------------------
from faas.cli._audit import audit as _audit  # noqa: E402

app.command("audit")(_audit)

# -- endpoint configs (faas/cli/_endpoint.py) ---------------------------------------------
from faas.cli._endpoint import endpoint_app  # noqa: E402

app.add_typer(endpoint_app, name="endpoint")


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
    rtol: Annotated[
        float, typer.Option(min=0.0, help="Relative tolerance for floats (logprobs, hidden states).")
    ] = DEFAULT_RTOL,
    atol: Annotated[float, typer.Option(min=0.0, help="Absolute tolerance for floats.")] = DEFAULT_ATOL,
) -> None:
    """Re-run an invocation (same function, model version, inputs); exit 1 if the output differs.

    Text and token ids must be equal, floats within |r - o| <= atol + rtol * |o|; timing
    fields and request ids are not compared. Differing fields are listed on stderr.
    """
    import json

    from faas._provenance import replay as run_replay
    from faas._replay_compare import Tolerance
    from faas.clients._embedded import Client
    from runtime import FaasError

    with Client(store=store) as client:
        try:
            report = run_replay(client, invocation_id, tolerance=Tolerance(rtol=rtol, atol=atol))
        except FaasError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    typer.echo(json.dumps(report.describe(), indent=2))
    if not report.matches:
        for d in report.differences:
            typer.echo(f"differs: {d.path or '<value>'} ({d.reason}): {d.original} -> {d.replay}", err=True)
        if report.comparison is not None and report.comparison.more:
            typer.echo(f"... and {report.comparison.more} more differences", err=True)
        if report.note:
            typer.echo(report.note, err=True)
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (not loopback: needs tokens).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8470,
    store: Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Invocation index directory (default: $FAAS_STATE_DIR or cache).")
    ] = None,
    tokens: Annotated[
        str | None, typer.Option(help="Token file (TOML/JSON) mapping tokens to tenants; else $FAAS_TOKENS.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    threads_per_worker: Annotated[int, typer.Option(help="Invocations each worker runs at once.")] = 64,
    staging_threshold: Annotated[
        str | None, typer.Option(help="Values above this size travel by reference (e.g. 1MiB).")
    ] = None,
    substrate: Annotated[
        str | None, typer.Option(help="Where invocations run: local (default) or globus-compute.")
    ] = None,
    substrate_config: Annotated[
        Path | None,
        typer.Option(help="TOML/JSON substrate file: options and the Parsl provider (docs/cluster.md)."),
    ] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here once listening.")] = None,
    access_log: Annotated[bool, typer.Option(help="Log request lines (never headers or tokens).")] = False,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    triggers: Annotated[bool, typer.Option(help="Run the tenants' trigger bindings.")] = True,
    tenant_workers: Annotated[
        int, typer.Option(help="Worker processes per active tenant (0: shared workers; docs/service.md).")
    ] = 0,
    worker_memory_mb: Annotated[int | None, typer.Option(help="Address space of a tenant worker.")] = None,
    worker_cpu_seconds: Annotated[float | None, typer.Option(help="CPU seconds of one invocation.")] = None,
    worker_open_files: Annotated[int | None, typer.Option(help="Open files of a tenant worker.")] = None,
    worker_processes: Annotated[
        int | None, typer.Option(help="Processes and threads of a tenant's Unix user (needs unix_user).")
    ] = None,
    worker_nice: Annotated[
        int | None, typer.Option(help="CPU niceness of tenant workers (their code yields to engines).")
    ] = None,
    worker_python: Annotated[
        str | None, typer.Option(help="Interpreter of tenant workers (one mapped users can run).")
    ] = None,
) -> None:
    """Run the warm pool as a long-lived HTTP service (see docs/service.md)."""
    import logging

    from faas.service._serve import serve as run_serve
    from runtime import ConfigError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine probe is noise
    try:
        run_serve(
            host=host,
            port=port,
            store=store,
            state_dir=state_dir,
            tokens=tokens,
            workers=workers,
            threads_per_worker=threads_per_worker,
            staging_threshold=staging_threshold,
            substrate=substrate,
            substrate_config=substrate_config,
            port_file=port_file,
            access_log=access_log,
            log_level=log_level,
            triggers=triggers,
            tenant_workers=tenant_workers,
            worker_limits={
                "memory_bytes": worker_memory_mb << 20 if worker_memory_mb else None,
                "cpu_seconds": worker_cpu_seconds,
                "open_files": worker_open_files,
                "processes": worker_processes,
                "nice": worker_nice,
                "python": worker_python,
            },
        )
    except ConfigError as exc:  # token file, substrate, store URL, ...: a message and code 2, no traceback
        typer.echo(f"faas serve: {exc}", err=True)
        raise typer.Exit(2) from None


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
