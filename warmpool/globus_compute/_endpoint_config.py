"""Render a Globus Compute endpoint configuration for a model pool.

One model pool drives one ``GlobusComputeEngine`` (Parsl's
HighThroughputExecutor). Its blocks are engine hosts: one node, or
``nodes_per_block`` nodes for a model that spans several. The pool's settings
map onto the engine like this:

=====================  ==========================================================
ModelSpec              endpoint config
=====================  ==========================================================
``min_replicas``       ``provider.min_blocks`` and ``provider.init_blocks``
``max_replicas``       ``provider.max_blocks``
``idle_timeout``       ``engine.job_status_kwargs.max_idletime`` (None: ``.inf``)
``engine_args``        ``nodes_per_block`` (tp x pp GPUs over ``gpus_per_node``)
                       and ``available_accelerators`` (one group per engine)
=====================  ==========================================================

When a node holds several engines (two tp-4 engines on an 8-GPU node), one
block carries that many replicas, so replica counts are divided by the engines
per block, rounding up.

The engine's ``launch_cmd`` runs HTEX's worker pool behind the block's engine
host (``globus-compute-endpoint python-exec warmpool.globus_compute.block ... --exec <HTEX's
default command>``, see :mod:`warmpool.globus_compute._launcher`): on every node it starts
the engine(s) of the model that ``worker_init`` names in ``FAAS_MODEL`` (one per
accelerator group), then the workers. The YAML is emitted by hand (the data is
a few nested maps of scalars) so rendering needs no YAML library. It is an
endpoint template (``user_config_template.yaml.j2``, rendered by Jinja): its only
Jinja syntax is ``{% raw %}`` around HTEX's ``{{block_id}}`` placeholder.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry import ModelSpec
from runtime import EndpointRenderError
from warmpool.globus_compute._launcher import ENDPOINT_PYTHON, block_launch_cmd

Target = Literal["slurm", "pbs", "kubernetes", "workstation"]
TARGETS: tuple[str, ...] = get_args(Target)

_DEFAULT_GPUS: dict[str, int] = {"slurm": 8, "pbs": 4, "kubernetes": 8, "workstation": 1}
_SINGLE_NODE_TARGETS = ("kubernetes", "workstation")
_TARGET_NOTES: dict[str, str] = {
    "slurm": "srun starts one worker pool per node; each node's rank is its SLURM_NODEID.",
    "pbs": "mpiexec starts one worker pool per node; each node's rank is its place in PBS_NODEFILE.",
    "kubernetes": "One pod per block, GPUs requested = limited; pods must reach the endpoint's address.",
    "workstation": "LocalProvider: a block is a set of local processes on this machine.",
}


class EndpointOptions(BaseModel):
    """Site options for a rendered endpoint config; unset ones take per-target defaults.

    Attributes:
        partition: Slurm partition.
        queue: PBS queue.
        account: Allocation/project charged (Slurm ``--account``, PBS ``-A``).
        qos: Slurm quality of service.
        constraint: Slurm node constraint (e.g. ``gpu&h100``).
        walltime: Block lifetime, ``HH:MM:SS``; the scaler replaces expired blocks.
        nodes_per_block: Nodes per block; by default derived from the model's engine_args.
        gpus_per_node: GPUs on one node (default 8 for Slurm/Kubernetes, 4 for PBS, 1 workstation).
        cpus_per_node: CPUs per node (PBS ``ncpus``, Kubernetes CPU request/limit).
        mem_per_node: Kubernetes memory request/limit (e.g. ``"512Gi"``).
        accelerator_groups: Explicit ``available_accelerators`` groups, one per engine on a node.
        workers_per_engine: HTEX workers (each runs one task at a time) per engine; every
            accelerator group is repeated this many times so that many thin workers share one engine.
        worker_init: Shell run when a block starts, before the workers (modules, venv).
        scheduler_options: Extra scheduler directives (``#SBATCH ...`` / ``#PBS ...`` lines).
        image: Container image of the workers (Kubernetes; required there).
        namespace: Kubernetes namespace.
        store_url: Object store URL exported as ``FAAS_STORE`` to the blocks.
        address: Address the workers use to reach the endpoint's interchange.
        strategy_period: Seconds between scaler ticks; short so a cold start does not wait.
        dist_port: Rendezvous port on a multi-node block's head node.
        mpiexec_bind_cmd: PBS launcher's CPU-binding flag (``--cpu-bind`` for Cray PALS).
        mpiexec_overrides: Extra ``mpiexec`` arguments (one process per node).
        display_name: Endpoint display name; by default names the model and target.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: str | None = None
    queue: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    walltime: str = "12:00:00"
    nodes_per_block: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_node: int | None = Field(None, ge=1)
    mem_per_node: str | None = None
    accelerator_groups: list[str] | None = None
    workers_per_engine: int = Field(1, ge=1)
    worker_init: str = ""
    scheduler_options: str = ""
    image: str | None = None
    namespace: str = "default"
    store_url: str | None = None
    address: str | None = None
    strategy_period: float = Field(0.5, gt=0)
    dist_port: int = Field(50000, gt=0, lt=65536)
    mpiexec_bind_cmd: str = "--cpu-bind"
    mpiexec_overrides: str = "--ppn 1"
    display_name: str | None = None

    @field_validator("walltime")
    @classmethod
    def _check_walltime(cls, value: str) -> str:
        if not re.fullmatch(r"\d+:[0-5]\d:[0-5]\d", value):
            raise ValueError(f"walltime {value!r} must be HH:MM:SS, e.g. '12:00:00'.")
        return value

    @field_validator("accelerator_groups")
    @classmethod
    def _check_groups(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for group in value:
                if not re.fullmatch(r"[0-9A-Za-z_.-]+(,[0-9A-Za-z_.-]+)*", group):
                    raise ValueError(
                        f"Accelerator group {group!r} must be comma-separated ids like '0,1,2,3'."
                    )
        return value


@dataclass(frozen=True)
class EngineGeometry:
    """How one model's engines lay out over nodes.

    Attributes:
        gpus_per_engine: GPUs one engine uses in total (tp x pp, times dp without dp-attention).
        nodes_per_block: Nodes one block (and one multi-node engine) spans.
        engines_per_block: Engines (replicas) one block holds.
        accelerator_groups: ``available_accelerators`` for one node, one group per engine.
    """

    gpus_per_engine: int
    nodes_per_block: int
    engines_per_block: int
    accelerator_groups: list[str]


def _int_arg(spec: ModelSpec, *keys: str) -> int:
    for key in keys:
        if key in spec.engine_args:
            value = spec.engine_args[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EndpointRenderError(
                    f"engine_args[{key!r}] of model {spec.ref} must be a positive integer, got {value!r}."
                )
            return value
    return 1


def gpus_per_engine(spec: ModelSpec) -> int:
    """GPUs one engine of ``spec`` needs: 0 for the CPU engine, else tp x pp (x dp)."""
    if spec.engine == "cpu":
        return 0
    gpus = _int_arg(spec, "tp", "tp_size") * _int_arg(spec, "pp", "pp_size")
    if not spec.engine_args.get("enable_dp_attention"):
        # Without dp-attention every data-parallel rank is a full tp x pp copy.
        gpus *= _int_arg(spec, "dp", "dp_size")
    return gpus


def engine_geometry(spec: ModelSpec, target: str, options: EndpointOptions) -> EngineGeometry:
    """Nodes per block, engines per block and accelerator groups for ``spec`` on ``target``.

    Raises:
        EndpointRenderError: The model does not fit the nodes as configured.
    """
    gpn = options.gpus_per_node if options.gpus_per_node is not None else _DEFAULT_GPUS[target]
    gpus = gpus_per_engine(spec)
    spec_nnodes = _int_arg(spec, "nnodes")
    if gpus == 0:
        nodes, engines, groups = 1, 1, []
    elif gpus <= gpn:
        nodes, engines = 1, gpn // gpus
        groups = [",".join(str(g) for g in range(i * gpus, (i + 1) * gpus)) for i in range(engines)]
    else:
        if gpn == 0 or gpus % gpn:
            raise EndpointRenderError(
                f"Model {spec.ref} needs {gpus} GPUs per engine, which does not split evenly over nodes "
                f"of {gpn} GPUs; set gpus_per_node or the model's tp/pp sizes."
            )
        nodes, engines = gpus // gpn, 1
        groups = [",".join(str(g) for g in range(gpn))]  # one group: every GPU of the node
    if spec_nnodes > 1 and spec_nnodes != nodes:
        raise EndpointRenderError(
            f"Model {spec.ref} sets engine_args nnodes={spec_nnodes}, but {gpus} GPUs per engine on "
            f"{gpn}-GPU nodes need {nodes} nodes."
        )
    if options.nodes_per_block is not None and options.nodes_per_block != nodes:
        # The option wins (tp/pp may hide in extra_args), unless it provably lacks GPUs.
        if options.nodes_per_block * gpn < gpus:
            raise EndpointRenderError(
                f"nodes_per_block={options.nodes_per_block} gives {options.nodes_per_block * gpn} GPUs, "
                f"fewer than the {gpus} that model {spec.ref} needs per engine."
            )
        nodes, engines = options.nodes_per_block, 1
        groups = [",".join(str(g) for g in range(gpn))] if gpn and gpus else []
    if options.accelerator_groups is not None:
        groups = list(options.accelerator_groups)
        engines = max(1, len(groups)) if nodes == 1 else 1
    if target in _SINGLE_NODE_TARGETS and nodes > 1:
        raise EndpointRenderError(
            f"Model {spec.ref} spans {nodes} nodes, but target {target!r} runs a block on one node "
            f"({gpus} GPUs needed per engine, {gpn} per node); use the slurm or pbs target."
        )
    return EngineGeometry(gpus, nodes, engines, groups)


def _blocks(replicas: int, engines_per_block: int) -> int:
    return math.ceil(replicas / engines_per_block)


def _worker_init(spec: ModelSpec, geometry: EngineGeometry, options: EndpointOptions) -> str:
    # The block's environment tells the engine host which model it serves and how it is laid out.
    exports = {
        "FAAS_MODEL": spec.ref,
        "FAAS_NODES_PER_BLOCK": str(geometry.nodes_per_block),
        "FAAS_DIST_PORT": str(options.dist_port),
    }
    if options.store_url:
        exports["FAAS_STORE"] = options.store_url
    line = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
    return "\n".join(part for part in (options.worker_init.strip(), line) if part)


def _provider(
    spec: ModelSpec, target: str, geometry: EngineGeometry, options: EndpointOptions
) -> dict[str, Any]:
    min_blocks = _blocks(spec.min_replicas, geometry.engines_per_block)
    common: dict[str, Any] = {
        "init_blocks": min_blocks,
        "min_blocks": min_blocks,
        "max_blocks": _blocks(spec.max_replicas, geometry.engines_per_block),
        "nodes_per_block": geometry.nodes_per_block,
        "worker_init": _worker_init(spec, geometry, options),
    }
    gpn = options.gpus_per_node if options.gpus_per_node is not None else _DEFAULT_GPUS[target]
    if target == "slurm":
        out: dict[str, Any] = {"type": "SlurmProvider"}
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(options, key):
                out[key] = getattr(options, key)
        if gpn:
            out["gpus_per_node"] = gpn
        out |= {"exclusive": True, "walltime": options.walltime, **common}
        if options.scheduler_options:
            out["scheduler_options"] = options.scheduler_options
        # srun starts one worker pool per node; each gets its own SLURM_NODEID.
        out["launcher"] = {"type": "SrunLauncher", "overrides": "--ntasks-per-node=1"}
        return out
    if target == "pbs":
        out = {"type": "PBSProProvider"}
        for key in ("queue", "account"):
            if getattr(options, key):
                out[key] = getattr(options, key)
        out["cpus_per_node"] = options.cpus_per_node or 1
        if gpn:
            out["select_options"] = f"ngpus={gpn}"
        out |= {"walltime": options.walltime, **common}
        if options.scheduler_options:
            out["scheduler_options"] = options.scheduler_options
        out["launcher"] = {
            "type": "MpiExecLauncher",
            "bind_cmd": options.mpiexec_bind_cmd,
            "overrides": options.mpiexec_overrides,
        }
        return out
    if target == "kubernetes":
        if not options.image:
            raise EndpointRenderError("The kubernetes target needs a worker image; pass --image.")
        out = {"type": "KubernetesProvider", "image": options.image, "namespace": options.namespace}
        cpus = options.cpus_per_node or 16
        mem = options.mem_per_node or "256Gi"
        out |= {"init_cpu": cpus, "max_cpu": cpus, "init_mem": mem, "max_mem": mem}
        if gpn:
            # Requests equal limits: a GPU pod is scheduled only where the whole group is free.
            out["extra_requests"] = {"nvidia.com/gpu": str(gpn)}
            out["extra_limits"] = {"nvidia.com/gpu": str(gpn)}
        return out | common
    return {"type": "LocalProvider", **common}


def endpoint_config(spec: ModelSpec, target: str, options: EndpointOptions | None = None) -> dict[str, Any]:
    """The endpoint config for one model pool, as plain data (what the YAML holds).

    Args:
        spec: The model the pool serves.
        target: ``slurm``, ``pbs``, ``kubernetes`` or ``workstation``.
        options: Site options; defaults for everything unset.

    Raises:
        EndpointRenderError: Unknown target, or the model does not fit the nodes.
    """
    if target not in TARGETS:
        raise EndpointRenderError(f"Unknown target {target!r}; choose one of: {', '.join(TARGETS)}.")
    options = options or EndpointOptions()
    geometry = engine_geometry(spec, target, options)
    groups = [g for g in geometry.accelerator_groups for _ in range(options.workers_per_engine)]
    engine: dict[str, Any] = {"type": "GlobusComputeEngine", "label": f"faas-{spec.name}"}
    if groups:
        engine["available_accelerators"] = groups
    engine["max_workers_per_node"] = len(groups) or options.workers_per_engine
    idle = float("inf") if spec.idle_timeout is None else spec.idle_timeout
    engine["job_status_kwargs"] = {"max_idletime": idle, "strategy_period": options.strategy_period}
    # Every node starts the model's engine(s) from worker_init's FAAS_MODEL/FAAS_STORE, then the workers.
    engine["launch_cmd"] = block_launch_cmd(python=ENDPOINT_PYTHON, jinja=True)
    if options.address:
        engine["address"] = options.address
    engine["provider"] = _provider(spec, target, geometry, options)
    name = options.display_name or f"tpm-faas {spec.ref} ({target})"
    return {"display_name": name, "engine": engine}


# -- YAML ---------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ".inf" if math.isinf(value) else repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def _fold(text: str, width: int) -> list[str]:
    """Wrap at spaces only, never inside a word or a Jinja tag such as ``{% raw %}``."""
    tags = re.compile(r"\{%[^%]*%\}")
    kept = tags.sub(lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(kept, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def _yaml_lines(data: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(value, indent + 2)
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        elif isinstance(value, str) and "\n" in value and not value.endswith("\n") and value[:1].strip():
            lines.append(f"{pad}{key}: |-")
            lines += [f"{pad}  {line}" if line else "" for line in value.split("\n")]
        elif isinstance(value, str) and len(value) > 80 and " " in value and " ".join(value.split()) == value:
            # A long one-line command, folded: the lines join back with single spaces.
            lines.append(f"{pad}{key}: >-")
            lines += [f"{pad}  {line}" for line in _fold(value, 88)]
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def to_yaml(data: dict[str, Any]) -> str:
    """Emit nested dicts of scalars and scalar lists as block YAML (lists in flow style)."""
    return "\n".join(_yaml_lines(data, 0)) + "\n"


def _header(spec: ModelSpec, target: str, options: EndpointOptions, config: dict[str, Any]) -> str:
    engine = config["engine"]
    provider = engine["provider"]
    geometry = engine_geometry(spec, target, options)
    idle = "never" if spec.idle_timeout is None else f"{spec.idle_timeout:g} s"
    layout = (
        f"{geometry.gpus_per_engine} GPU(s) per engine, {geometry.nodes_per_block} node(s) per block, "
        f"{geometry.engines_per_block} engine(s) per block"
        if geometry.gpus_per_engine
        else "CPU engine, 1 node per block"
    )
    endpoint = f"faas-{spec.name}"
    lines = [
        f"Globus Compute endpoint for model {spec.ref} ({spec.engine} engine), target {target}.",
        "Rendered by `faas endpoint render`: change the options and re-render rather than editing.",
        f"Layout: {layout}.",
        f"Pool mapping: min_replicas {spec.min_replicas} -> min_blocks/init_blocks {provider['min_blocks']};"
        f" max_replicas {spec.max_replicas} -> max_blocks {provider['max_blocks']};",
        f"  idle_timeout {idle} -> max_idletime; strategy_period {options.strategy_period:g} s.",
        _TARGET_NOTES[target],
        f"Install: globus-compute-endpoint configure {endpoint} --template-config THIS_FILE",
        f"         globus-compute-endpoint start {endpoint}",
    ]
    return "".join(f"# {line}\n" for line in lines)


def render_endpoint_config(spec: ModelSpec, target: str, options: EndpointOptions | None = None) -> str:
    """The endpoint config YAML for one model pool, with a comment header that documents it.

    Args:
        spec: The model the pool serves.
        target: ``slurm``, ``pbs``, ``kubernetes`` or ``workstation``.
        options: Site options.

    Returns:
        YAML usable as an endpoint's ``user_config_template.yaml.j2``.

    Raises:
        EndpointRenderError: Unknown target, or the model does not fit the nodes.
    """
    options = options or EndpointOptions()
    config = endpoint_config(spec, target, options)
    return _header(spec, target, options, config) + to_yaml(config)


# -- spec files and the examples manifest --------------------------------------------------------


def load_spec_file(path: Path) -> list[ModelSpec]:
    """Model specs from a JSON or TOML file: one spec, a JSON list, or a TOML ``[[models]]`` array.

    Raises:
        EndpointRenderError: The file is missing, unparsable, or not a valid model spec.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise EndpointRenderError(f"Cannot read model spec file {path}: {exc.strerror or exc}.") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise EndpointRenderError(
            f"Model spec file {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}"
        ) from None
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    items = data if isinstance(data, list) else [data]
    try:
        return [ModelSpec.model_validate(item) for item in items]
    except ValidationError as exc:
        raise EndpointRenderError(f"Model spec file {path} does not hold valid model specs: {exc}") from None


def render_examples(manifest: Path) -> dict[Path, str]:
    """Render every config a manifest lists (``[[config]]`` with file, spec, target, options).

    Paths in the manifest are relative to it; the result maps each output path to its text.

    Raises:
        EndpointRenderError: The manifest or an entry is invalid.
    """
    try:
        entries = tomllib.loads(manifest.read_text()).get("config", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EndpointRenderError(f"Cannot read the examples manifest {manifest}: {exc}") from None
    out: dict[Path, str] = {}
    for entry in entries:
        try:
            file, spec_file, target = entry["file"], entry["spec"], entry["target"]
        except KeyError as exc:
            raise EndpointRenderError(f"An entry of {manifest} lacks the key {exc}.") from None
        specs = load_spec_file(manifest.parent / spec_file)
        if len(specs) != 1:
            raise EndpointRenderError(f"{spec_file} holds {len(specs)} models; an example needs exactly one.")
        try:
            options = EndpointOptions(**entry.get("options", {}))
        except ValidationError as exc:
            raise EndpointRenderError(f"Options of {file} in {manifest} are invalid: {exc}") from None
        out[manifest.parent / file] = render_endpoint_config(specs[0], target, options)
    return out
