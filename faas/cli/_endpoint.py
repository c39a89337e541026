"""``faas endpoint ...``: Globus Compute endpoint configs for running model pools on clusters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

endpoint_app = typer.Typer(
    help="Globus Compute endpoints: render configs that run model pools on clusters.", no_args_is_help=True
)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"Error: {exc}", err=True)
    return typer.Exit(2)


def _specs(models: list[str], spec_files: list[Path], store: str | None) -> list[Any]:
    from warmpool.globus_compute import load_spec_file

    specs = [spec for path in spec_files for spec in load_spec_file(path)]
    if models:
        from registry import Registry
        from runtime import default_store_url, store_from_url

        registry = Registry(store_from_url(store or default_store_url()))
        specs += [registry.get_model(ref) for ref in models]
    return specs


@endpoint_app.command("render")
def render(
    target: Annotated[str, typer.Option(help="slurm, pbs, kubernetes or workstation.")],
    model: Annotated[
        list[str] | None, typer.Option(help="Model NAME or NAME@VERSION from the registry (repeatable).")
    ] = None,
    spec: Annotated[
        list[Path] | None, typer.Option(help="ModelSpec file, JSON or TOML (repeatable); needs no store.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output file (one model) or directory (several); default stdout.")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Store URL to read models from; also exported to blocks as FAAS_STORE.")
    ] = None,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    queue: Annotated[str | None, typer.Option(help="PBS queue.")] = None,
    account: Annotated[str | None, typer.Option(help="Account/project to charge.")] = None,
    qos: Annotated[str | None, typer.Option(help="Slurm QOS.")] = None,
    constraint: Annotated[str | None, typer.Option(help="Slurm node constraint.")] = None,
    walltime: Annotated[str, typer.Option(help="Block walltime, HH:MM:SS.")] = "12:00:00",
    nodes_per_block: Annotated[
        int | None, typer.Option(help="Nodes per block (default: from the model's tp x pp).")
    ] = None,
    gpus_per_node: Annotated[
        int | None, typer.Option(help="GPUs per node (default 8; PBS 4; workstation 1).")
    ] = None,
    cpus_per_node: Annotated[int | None, typer.Option(help="CPUs per node (PBS ncpus, pod CPUs).")] = None,
    mem_per_node: Annotated[str | None, typer.Option(help="Pod memory, e.g. 512Gi (Kubernetes).")] = None,
    accelerators: Annotated[
        list[str] | None, typer.Option(help="Accelerator group such as 0,1,2,3 (repeatable; overrides).")
    ] = None,
    workers_per_engine: Annotated[int, typer.Option(help="Thin HTEX workers sharing each engine.")] = 1,
    worker_init: Annotated[str, typer.Option(help="Shell run at block start (modules, venv).")] = "",
    scheduler_options: Annotated[str, typer.Option(help="Extra #SBATCH/#PBS lines.")] = "",
    image: Annotated[str | None, typer.Option(help="Worker container image (Kubernetes).")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    address: Annotated[str | None, typer.Option(help="Address workers use to reach the endpoint.")] = None,
    strategy_period: Annotated[float, typer.Option(help="Seconds between scaler ticks.")] = 0.5,
) -> None:
    """Render a Globus Compute endpoint config (YAML) for each model's pool."""
    from pydantic import ValidationError

    from runtime import FaasError
    from warmpool.globus_compute import EndpointOptions, render_endpoint_config

    try:
        options = EndpointOptions(
            partition=partition,
            queue=queue,
            account=account,
            qos=qos,
            constraint=constraint,
            walltime=walltime,
            nodes_per_block=nodes_per_block,
            gpus_per_node=gpus_per_node,
            cpus_per_node=cpus_per_node,
            mem_per_node=mem_per_node,
            accelerator_groups=accelerators or None,
            workers_per_engine=workers_per_engine,
            worker_init=worker_init,
            scheduler_options=scheduler_options,
            image=image,
            namespace=namespace,
            store_url=store,
            address=address,
            strategy_period=strategy_period,
        )
        specs = _specs(model or [], spec or [], store)
        if not specs:
            raise ValueError("Name at least one model with --model NAME[@VERSION] or --spec FILE.")
        rendered = [(s.name, render_endpoint_config(s, target, options)) for s in specs]
    except (ValueError, ValidationError, FaasError) as exc:
        raise _fail(exc) from None
    if output is None:
        typer.echo("---\n".join(text for _, text in rendered), nl=False)
        return
    if len(rendered) == 1 and not output.is_dir():
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(rendered[0][1])
        typer.echo(f"wrote {output}")
        return
    output.mkdir(parents=True, exist_ok=True)
    for name, text in rendered:
        path = output / f"faas-{name}.yaml"
        path.write_text(text)
        typer.echo(f"wrote {path}")


@endpoint_app.command("examples")
def examples(
    manifest: Annotated[Path, typer.Argument(help="Examples manifest (TOML).")] = Path(
        "infra/globus-compute/examples.toml"
    ),
    check: Annotated[bool, typer.Option(help="Only check the files are current; exit 1 if not.")] = False,
) -> None:
    """Re-render the example endpoint configs a manifest lists (infra/globus-compute)."""
    from warmpool.globus_compute import render_examples

    try:
        rendered = render_examples(manifest)
    except ValueError as exc:
        raise _fail(exc) from None
    stale = [path for path, text in rendered.items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            typer.echo(f"stale: {path}", err=True)
        raise typer.Exit(1 if stale else 0)
    for path in stale:
        path.write_text(rendered[path])
        typer.echo(f"wrote {path}")
    typer.echo(f"{len(rendered)} configs, {len(stale)} rewritten")
