"""Execution substrates: where a pool's invocations run.

A substrate is the pool surface the client uses. Two implementations satisfy
:class:`Substrate` structurally (neither inherits from it):

- ``local``: :class:`warmpool._pool.Pool`, engines and workers as child
  processes of this one;
- ``globus-compute``: :class:`warmpool._gce.GlobusComputePool`, one Globus
  Compute engine (Parsl HighThroughputExecutor) per model, whose blocks are
  engine hosts on cluster nodes.

:func:`make_substrate` builds one from a :class:`SubstrateConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from registry._specs import FunctionSpec, ModelSpec
from runtime._store import ObjectStore
from runtime._wire import Invocation, Result
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
    ) -> None:
        """Queue an invocation; ``on_done`` receives its final Result exactly once.

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


class SubstrateConfig(BaseModel):
    """Which substrate a pool runs on, and its options.

    Attributes:
        kind: ``local`` (in-process pool) or ``globus-compute`` (Globus Compute
            engines, one per model).
        options: Keyword arguments of the substrate's constructor (see
            :class:`warmpool._pool.Pool` and :class:`warmpool._gce.GlobusComputePool`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: SubstrateKind = "local"
    options: dict[str, Any] = Field(default_factory=dict)


def make_substrate(kind: SubstrateKind, store: ObjectStore, **options: Any) -> Substrate:
    """Build (but do not start) a substrate of ``kind`` over ``store``.

    Args:
        kind: ``local`` or ``globus-compute``.
        store: The object store functions and staged values live in.
        **options: Constructor options of that substrate.

    Raises:
        ValueError: ``kind`` names no substrate.
    """
    config = SubstrateConfig(kind=kind, options=options)
    if config.kind == "local":
        from warmpool._pool import Pool

        return Pool(store, **config.options)
    if config.kind == "globus-compute":
        from warmpool._gce import GlobusComputePool  # imports parsl: only when asked for

        return GlobusComputePool(store, **config.options)
    raise ValueError(f"Unknown substrate kind {kind!r}; expected 'local' or 'globus-compute'.")
