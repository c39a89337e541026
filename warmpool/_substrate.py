"""Execution substrates: where a pool's invocations run.

A substrate is the pool surface the client uses. Two implementations satisfy
:class:`Substrate` structurally (neither inherits from it):

- ``local``: :class:`warmpool.local._pool.Pool`, engines and workers as child
  processes of this one;
- ``globus-compute``: :class:`warmpool.globus_compute._pool.GlobusComputePool`, one Globus
  Compute engine (Parsl HighThroughputExecutor) per model, whose blocks are
  engine hosts on cluster nodes.

:func:`make_substrate` builds one from a :class:`SubstrateConfig`.
"""

from __future__ import annotations

import importlib
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry import FunctionSpec, ModelSpec
from runtime import Invocation, ObjectStore, Result, SubstrateConfigError
from warmpool._replica import Replica

SubstrateKind = Literal["local", "globus-compute"]


@runtime_checkable
class Substrate(Protocol):
    """What the client needs from a pool, whatever runs the invocations.

    Attributes:
        id: A name unique to this pool instance (status snapshots go under it).
        counters: ``submitted``, ``completed``, ``failed`` and friends.
    """

    id: str
    counters: dict[str, int]

    def start(self, models: list[ModelSpec] | None = None) -> Substrate:
        """Start the substrate, and the engines of models with ``min_replicas >= 1``."""
        ...

    def submit(
        self,
        invocation: Invocation,
        spec: FunctionSpec,
        model: ModelSpec | None,
        on_done: Callable[[Result], None],
        on_partial: Callable[[int, Any], None] | None = None,
    ) -> None:
        """Queue an invocation; ``on_done`` receives its final Result exactly once.

        ``on_partial(attempt, value)`` receives the invocation's partial outputs
        (``runtime.emit_partial``) before ``on_done``, where the substrate has a
        channel for them (the local pool); elsewhere it is never called.

        Raises:
            PoolClosedError: The pool is shut down.
            BackPressureError: The model's queue is full; nothing was queued.
        """
        ...

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation; False if it is unknown or already finished."""
        ...

    def state(self, invocation_id: str) -> str | None:
        """``waiting_for_engine``, ``queued`` or ``running``; None once finished or unknown."""
        ...

    def prefer_warm(self, spec: ModelSpec) -> ModelSpec:
        """The version an alias-resolved invocation should run on during a version move."""
        ...

    def engine_url(self, model: ModelSpec, timeout: float | None = None) -> str:
        """Ensure a ready engine of ``model`` and return its URL (blocks during a cold start)."""
        ...

    def replicas(self, model: str | None = None) -> list[Replica]:
        """Engine replicas (of one model ref, or all), including stopped and failed ones."""
        ...

    def status(self) -> dict[str, Any]:
        """Models, replicas, workers and counters as a JSON-able dict."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left and stop every process the substrate started."""
        ...


class ProviderConfig(BaseModel):
    """The Parsl execution provider of a Globus Compute substrate's engines.

    ``type`` names a class in ``parsl.providers`` (``LocalProvider``,
    ``SlurmProvider``, ``PBSProProvider``, ``KubernetesProvider``, ...) or a
    ``module:Class`` path; every other key is a keyword argument of that class.
    The pool sets ``init_blocks``/``min_blocks``/``max_blocks`` from each
    model's replica settings, so those keys are refused here. ``launcher``
    (``{type = "SrunLauncher", ...}``) names a class in ``parsl.launchers``.

    Attributes:
        type: The provider class.
        launcher: The launcher class and its keyword arguments, if any.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str = "LocalProvider"
    launcher: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        """The provider's keyword arguments (everything but ``type`` and ``launcher``)."""
        extra = dict(self.model_extra or {})
        owned = sorted(k for k in ("init_blocks", "min_blocks", "max_blocks") if k in extra)
        if owned:
            raise SubstrateConfigError(
                f"The provider sets {', '.join(owned)}, but block counts come from each model's "
                "min_replicas/max_replicas; remove them from the provider section."
            )
        return extra

    def check(self) -> None:
        """Resolve the classes and keywords now, so a typo fails before any engine starts."""
        self.kwargs()
        _resolve("parsl.providers", self.type)
        if self.launcher is not None:
            _resolve("parsl.launchers", str(self.launcher.get("type", "")))

    def __call__(self, spec: ModelSpec | None) -> Any:
        """Build a fresh provider for one model's engine (each engine needs its own)."""
        kwargs = self.kwargs()
        if self.launcher is not None:
            launcher = dict(self.launcher)
            kwargs["launcher"] = _resolve("parsl.launchers", str(launcher.pop("type", "")))(**launcher)
        return _resolve("parsl.providers", self.type)(**kwargs)


def _resolve(package: str, name: str) -> Any:
    module_name, _, attr = name.rpartition(":") if ":" in name else (package, "", name)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SubstrateConfigError(f"{name!r} is not a class in {module_name}: {exc}") from exc


class SubstrateConfig(BaseModel):
    """Which substrate a pool runs on, and its options.

    Attributes:
        kind: ``local`` (in-process pool) or ``globus-compute`` (Globus Compute
            engines, one per model).
        options: Keyword arguments of the substrate's constructor (see
            :class:`warmpool.local.Pool` and :class:`warmpool.globus_compute.GlobusComputePool`).
        provider: For ``globus-compute``: the Parsl provider of every engine
            (default: ``LocalProvider``, blocks are processes on this machine).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: SubstrateKind = "local"
    options: dict[str, Any] = Field(default_factory=dict)
    provider: ProviderConfig | None = None

    def build(self, store: ObjectStore, **defaults: Any) -> Substrate:
        """Build (not start) the substrate; ``defaults`` are overridden by ``options``."""
        options = {**defaults, **self.options}
        if self.provider is not None:
            if self.kind != "globus-compute":
                raise SubstrateConfigError("A provider section only applies to kind = 'globus-compute'.")
            self.provider.check()
            options["provider_factory"] = self.provider
        return make_substrate(self.kind, store, **options)


def load_substrate_config(path: Path | str, *, kind: SubstrateKind | None = None) -> SubstrateConfig:
    """Read a substrate configuration from a TOML or JSON file.

    The file holds ``kind``, an ``[options]`` table (constructor options of the
    substrate) and, for ``globus-compute``, a ``[provider]`` table (see
    :class:`ProviderConfig`)::

        kind = "globus-compute"
        [options]
        strategy_period = 0.5
        [provider]
        type = "SlurmProvider"
        partition = "gpu"
        [provider.launcher]
        type = "SrunLauncher"

    Args:
        path: The file (``.toml`` or ``.json``).
        kind: Overrides the file's ``kind`` (``faas serve --substrate``).

    Raises:
        SubstrateConfigError: The file cannot be read or does not describe a substrate.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise SubstrateConfigError(f"Cannot read the substrate config {path}: {exc}") from exc
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SubstrateConfigError(f"The substrate config {path} is not valid TOML or JSON: {exc}") from exc
    if kind is not None:
        data["kind"] = kind
    try:
        return SubstrateConfig.model_validate(data)
    except ValidationError as exc:
        raise SubstrateConfigError(f"The substrate config {path} is invalid: {exc}") from exc


def make_substrate(kind: SubstrateKind, store: ObjectStore, **options: Any) -> Substrate:
    """Build (but do not start) a substrate of ``kind`` over ``store``.

    Args:
        kind: ``local`` or ``globus-compute``.
        store: The object store functions and staged values live in.
        **options: Constructor options of that substrate.

    Raises:
        ValueError: ``kind`` names no substrate.
    """
    if kind == "local":
        from warmpool.local._pool import Pool

        return Pool(store, **options)
    if kind == "globus-compute":
        from warmpool.globus_compute._pool import GlobusComputePool  # imports parsl: only when asked for

        return GlobusComputePool(store, **options)
    raise ValueError(f"Unknown substrate kind {kind!r}; expected 'local' or 'globus-compute'.")
