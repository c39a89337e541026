"""Function and model specs: what the registry stores about each."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime import MODES, Invocation, OutputTarget, Priority, StagedRef, check_modes, new_id


class FunctionSpec(BaseModel):
    """A registered function version.

    Attributes:
        name: The function's registered name.
        version: Monotonic version number within the name, from 1.
        digest: sha256 of the pickled function artifact.
        model: Model the function calls (``name`` or ``name@version``), or None.
        model_param: Parameter that receives the ``Model`` handle.
        model_param_index: Its position (0 = passed first).
        timeout: Seconds an invocation may run, or None.
        retries: Retries for invocations lost to a dead worker or engine.
        priority: ``interactive`` or ``batch``: the class of its invocations within
            their tenant's share (None: interactive; a call may override it).
        module: Defining module, for display.
        qualname: Qualified name in that module, for display.
        created_at: Registration time (seconds since the epoch).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    version: int = 0
    digest: str
    model: str | None = None
    model_param: str | None = None
    model_param_index: int = 0
    timeout: float | None = None
    retries: int = 0
    priority: Priority | None = None
    module: str = ""
    qualname: str = ""
    created_at: float = Field(default_factory=time.time)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def invocation(
        self,
        args: bytes,
        *,
        model: str | None,
        store: dict[str, Any] | None,
        stage_threshold: int | None,
        refs: tuple[StagedRef, ...] = (),
        id: str | None = None,
        output: OutputTarget | None = None,
        priority: Priority | None = None,
        tenant: str | None = None,
        weight: float | None = None,
        internals_scope: bool | None = None,
        granted_modes: tuple[str, ...] | None = None,
        adapters: dict[str, str] | None = None,
    ) -> Invocation:
        """A new invocation of this version (timeout, retries and priority from the spec).

        Args:
            args: Serialised ``(args, kwargs)``, or a staging marker.
            model: The resolved model reference (``name@version``), if any.
            store: ``config()`` of the store holding its staged values.
            stage_threshold: Results above this many bytes are staged back.
            refs: The staged objects the arguments refer to.
            id: Its id (default: a fresh one); triggers name their attempts, so
                a restarted service re-attaches to the invocation it replays.
            output: Where the worker writes a trigger function's output.
            priority: This call's priority (None: the spec's).
            tenant: Whose share of the engine it is charged to (None: the default tenant).
            weight: That tenant's fair-share weight (None: 1).
            internals_scope: Whether the tenant's token has the ``internals`` scope (None: yes).
            granted_modes: The modes the tenant is granted on the model (None: all).
            adapters: The model's adapter aliases at submit (``Adapters.snapshot``).
        """
        return Invocation(
            id=id or new_id(),
            function_name=self.name,
            function_digest=self.digest,
            model=model,
            args=args,
            timeout=self.timeout,
            retries=self.retries,
            store=store,
            stage_threshold=stage_threshold,
            refs=refs,
            output=output,
            priority=priority or self.priority,
            tenant=tenant,
            weight=weight,
            internals_scope=internals_scope,
            granted_modes=granted_modes,
            adapters=adapters,
        )


EngineKind = Literal["cpu", "sglang"]


class ModelSpec(BaseModel):
    """A model version the pool can serve.

    Attributes:
        name: The model's name, as functions name it.
        version: Version label (``"1"``, ``"2"``, ...).
        engine: Which engine host serves it.
        model_path: Weights directory or URI; None for the built-in tiny model,
            which is built on first use.
        engine_args: Extra engine arguments (e.g. SGLang's ``tp_size``).
        min_replicas: Replicas kept warm even when idle.
        max_replicas: Upper bound on replicas.
        max_inflight: Invocations dispatched to one replica at once: enough for
            the engine to batch, few enough not to overload it.
        max_queue: Invocations waiting for a replica slot before submit refuses
            more with a back-pressure error.
        idle_timeout: Seconds a replica may sit idle before it is stopped
            (down to ``min_replicas``); None never stops idle replicas.
        startup_timeout: Seconds a replica may take to become ready.
        modes: What functions may do with the model: ``generate`` (text and
            chat), ``encode`` (embeddings), ``logprobs``, ``hidden_states``.
            The handle refuses any other request before it reaches the engine.
        weights_digest: Digest of the weights (recorded in provenance). For weights
            staged from ``weights_uri`` it defaults to their manifest's digest.
        weights_uri: Where the weights live in an object store (``s3://bucket/prefix?...``
            or ``file:///dir``), uploaded with ``faas models upload-weights``: each
            replica start stages them into the node's weights cache (a cache hit
            fetches nothing) and loads the engine from there. With SGLang and
            ``engine_args={"load_format": "runai_streamer"}`` the engine streams
            them from the store instead. None: ``model_path`` is used as it is.
        prestage: Stage the weights into the node's cache when the pool starts,
            without starting an engine, so a later scale-up fetches nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str = "1"
    engine: EngineKind = "cpu"
    model_path: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    max_inflight: int = Field(64, ge=1)
    max_queue: int = Field(10_000, ge=0)
    idle_timeout: float | None = Field(600.0, gt=0)
    startup_timeout: float = Field(300.0, gt=0)
    modes: list[str] = Field(default_factory=lambda: sorted(MODES))
    weights_digest: str | None = None
    weights_uri: str | None = None
    prestage: bool = False

    @field_validator("modes")
    @classmethod
    def _check_modes(cls, value: list[str]) -> list[str]:
        return sorted(check_modes(value))

    @model_validator(mode="after")
    def _check_replicas(self) -> ModelSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})."
            )
        return self

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


TINY_LLAMA = ModelSpec(name="tiny-llama", version="1", engine="cpu", model_path=None)
"""The built-in tiny offline Llama; its weights are built locally on first use."""

BUILTIN_MODELS: dict[str, ModelSpec] = {TINY_LLAMA.name: TINY_LLAMA}
