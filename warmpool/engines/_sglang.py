"""The SGLang engine host: ``python -m sglang.launch_server`` in its own process group.

SGLang is never imported here (it forces the spawn start method and its
shutdown kills every child of its host process); the host only builds the
command line, launches it, and waits on ``/health_generate``.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from registry import ModelSpec
from runtime import EngineError
from warmpool.engines._host import SubprocessEngineHost
from warmpool.engines._placement import NodePlacement

# engine_args key -> SGLang flag. Values are validated; unknown keys go
# through as --key-with-dashes, so any SGLang flag can be set from a spec.
_FLAGS: dict[str, tuple[str, type]] = {
    "tp": ("--tp-size", int),
    "dp": ("--dp-size", int),
    "pp": ("--pp-size", int),
    "ep": ("--ep-size", int),
    "nnodes": ("--nnodes", int),
    "node_rank": ("--node-rank", int),
    "dist_init_addr": ("--dist-init-addr", str),
    "mem_fraction_static": ("--mem-fraction-static", float),
    "context_length": ("--context-length", int),
    "tokenizer_path": ("--tokenizer-path", str),
    "load_format": ("--load-format", str),
    # LoRA, named as the CPU engine's: adapters per batch, largest rank, adapters kept in host memory.
    "max_loras": ("--max-loras-per-batch", int),
    "max_lora_rank": ("--max-lora-rank", int),
    "max_loaded_loras": ("--max-loaded-loras", int),
}
_LORA_KEYS = ("max_loras", "max_lora_rank", "max_loaded_loras", "lora_target_modules")

STREAMING_FORMATS = frozenset({"runai_streamer"})
"""Load formats with which SGLang reads the weights from the object store itself (no staging)."""


def streamer_source(uri: str) -> tuple[str, dict[str, str]]:
    """The ``--model-path`` and environment that let SGLang's ``runai_streamer`` read ``weights_uri``.

    ``s3://bucket/prefix?endpoint_url=...&path_style=true&region=...`` becomes
    ``s3://bucket/prefix/`` with ``AWS_ENDPOINT_URL``,
    ``RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0`` and ``AWS_DEFAULT_REGION``
    (credentials come from the usual AWS environment, as for the store).

    Raises:
        EngineError: The URI is not an ``s3://`` one.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise EngineError(
            f"SGLang's runai_streamer streams from s3:// URIs; {uri.split('?')[0]!r} is not one."
        )
    query = dict(parse_qsl(parsed.query))
    env: dict[str, str] = {}
    if query.get("endpoint_url"):
        env["AWS_ENDPOINT_URL"] = query["endpoint_url"]
    if query.get("path_style", "").lower() in ("1", "true", "yes", "on"):
        env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
    if query.get("region"):
        env["AWS_DEFAULT_REGION"] = query["region"]
    prefix = unquote(parsed.path).strip("/")
    return f"s3://{parsed.netloc}/{prefix}/" if prefix else f"s3://{parsed.netloc}/", env


def _streams(spec: ModelSpec) -> bool:
    return str(spec.engine_args.get("load_format", "")) in STREAMING_FORMATS


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sglang_argv(
    spec: ModelSpec,
    *,
    port: int,
    host: str = "127.0.0.1",
    node_rank: int | None = None,
    nnodes: int | None = None,
    dist_init_addr: str | None = None,
    placement: NodePlacement | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The ``sglang.launch_server`` command line for a model spec.

    Args:
        spec: The model version; ``engine_args`` carries tp/dp/pp/ep,
            mem_fraction_static, multi-node settings, ``extra_args`` (a list of
            raw arguments) and any other SGLang flag by its underscore name.
        port: HTTP port of the server.
        host: Bind address.
        node_rank: Overrides ``engine_args["node_rank"]`` (multi-node blocks).
        nnodes: Overrides ``engine_args["nnodes"]``.
        dist_init_addr: Overrides ``engine_args["dist_init_addr"]`` (``head:port``).
        placement: This node's place in a multi-node block (see
            :func:`warmpool.engines.placement_from_env`); for more than one
            node it sets ``--nnodes``, ``--node-rank`` and ``--dist-init-addr``,
            unless the explicit arguments above are given.
        python: Interpreter to run.

    Raises:
        EngineError: A value has the wrong type, or multi-node settings are incomplete.
    """
    model_path = spec.model_path
    if spec.weights_uri and _streams(spec):
        model_path = streamer_source(spec.weights_uri)[0]  # SGLang streams them from the store
    if not model_path:
        raise EngineError(f"Model {spec.ref} has no model_path; SGLang needs weights to load.")
    args = dict(spec.engine_args)
    extra = args.pop("extra_args", [])
    if placement is not None and placement.nnodes > 1:
        # Routed through the overrides so a flag never appears twice on the command line.
        nnodes = placement.nnodes if nnodes is None else nnodes
        node_rank = placement.node_rank if node_rank is None else node_rank
        dist_init_addr = placement.dist_init_addr if dist_init_addr is None else dist_init_addr
    for key, value in (("node_rank", node_rank), ("nnodes", nnodes), ("dist_init_addr", dist_init_addr)):
        if value is not None:
            args[key] = value
    if any(k in args for k in _LORA_KEYS):
        args.setdefault("enable_lora", True)  # adapters are loaded at run time (/load_lora_adapter)
    argv = [python, "-m", "sglang.launch_server", "--model-path", model_path]
    argv += ["--host", host, "--port", str(port), "--served-model-name", spec.ref]
    for key, value in sorted(args.items()):
        flag, kind = _FLAGS.get(key, ("--" + key.replace("_", "-"), object))
        if kind is not object and not _fits(value, kind):
            raise EngineError(
                f"engine_args[{key!r}] of model {spec.ref} must be {kind.__name__}, got {value!r}."
            )
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):  # nargs flags such as --lora-target-modules
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    if int(args.get("nnodes", 1)) > 1 and not args.get("dist_init_addr"):
        raise EngineError(f"Model {spec.ref} spans {args['nnodes']} nodes but has no dist_init_addr.")
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise EngineError(f"engine_args['extra_args'] of model {spec.ref} must be a list of strings.")
    return argv + list(extra)


class SGLangEngineHost(SubprocessEngineHost):
    """One SGLang server replica.

    Args:
        argv: The launch command (see :func:`sglang_argv`).
        port: The port it listens on.
        log_dir: Where its log goes.
        env: Extra environment (e.g. ``CUDA_VISIBLE_DEVICES`` for its GPU group).
    """

    def __init__(
        self, argv: list[str], *, port: int, log_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(lambda _port_file: list(argv), log_dir=log_dir, env=env, name="sglang", port=port)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, log_dir: Path | None = None, **overrides: Any) -> SGLangEngineHost:
        """Build a host for ``spec`` on a free local port."""
        port = int(overrides.pop("port", 0)) or free_port()
        env = streamer_source(spec.weights_uri)[1] if spec.weights_uri and _streams(spec) else {}
        env |= {k: str(v) for k, v in dict(spec.engine_args.get("env", {})).items()}
        if "env" in spec.engine_args:
            spec = spec.model_copy(
                update={"engine_args": {k: v for k, v in spec.engine_args.items() if k != "env"}}
            )
        return cls(sglang_argv(spec, port=port, **overrides), port=port, log_dir=log_dir, env=env)
