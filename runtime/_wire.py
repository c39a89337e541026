"""Wire models: what travels between caller, pool and worker.

Values (arguments, results, exceptions) travel as bytes written by
:mod:`runtime._serde`; the models themselves are plain pydantic, so they can be
stored as JSON records or pickled across a process pipe.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime._staging import StagedRef

ErrorKind = Literal["user", "timeout", "worker_lost", "engine_lost", "cancelled", "system"]
Priority = Literal["interactive", "batch"]
"""An invocation's class within its tenant's share: interactive work is admitted before batch work."""


class OutputTarget(BaseModel):
    """Where a trigger invocation's worker writes the function's output, commit-once.

    The worker writes it inside the invocation (see :mod:`runtime._outputs`), so
    an invocation run again after a crash finds its own output and writes
    nothing twice. An existing output with other bytes is replaced only while
    no other attempt has committed the object (``done_key``) and the input
    still has ``source_etag``.

    Attributes:
        store: ``config()`` of the output bucket's store.
        bucket: The output bucket (or directory), for :class:`faas.Outputs`.
        key: Where the return value goes.
        base: Key prefix of the outputs written through :class:`faas.Outputs`.
        done_key: The object's done marker in the invocation's store.
        source: ``config()`` of the input bucket's store.
        source_key: The input object's key.
        source_etag: The input version this invocation processes (no quotes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: dict[str, Any]
    bucket: str
    key: str
    base: str
    done_key: str
    source: dict[str, Any]
    source_key: str
    source_etag: str


class Invocation(BaseModel):
    """One call of a registered function.

    Attributes:
        id: Unique invocation id (hex).
        function_name: Registered function name.
        function_digest: sha256 of the function artifact; the worker verifies it.
        model: Resolved model name the function asks for, or None.
        args: Serialised ``(args, kwargs)`` tuple, or a marker naming it in the
            store when it was staged (see :mod:`runtime._staging`).
        timeout: Seconds the invocation may run, or None for no limit.
        retries: How many times a lost invocation may be retried.
        attempt: 0 for the first run, then 1, 2, ... for retries.
        submitted_at: Wall-clock submit time (seconds since the epoch).
        store: ``config()`` of the store holding its staged values and records.
        stage_threshold: Results above this many bytes are staged back; None
            takes ``$FAAS_STAGING_THRESHOLD`` or 1 MiB.
        refs: The staged objects the arguments refer to (for records and inspection).
        output: Set for a trigger invocation: the worker writes the return value there.
        tenant: Whose share of a shared engine it is charged to (None: the one
            default tenant of an embedded client).
        weight: The tenant's weight in fair admission when it was accepted (None: 1).
        priority: ``interactive`` or ``batch`` (None: interactive); orders the
            tenant's own invocations, and is passed on to an engine that runs
            with priority scheduling.
        internals_scope: Whether the submitting token may use the modes that expose model
            internals (logprobs, hidden states, hook points); False refuses them in the
            worker before any engine request. None: yes (an embedded client's own calls).
        granted_modes: The modes the tenant is granted on the model (None: all); the
            worker refuses the others before any engine request.
        adapters: The model's LoRA adapter aliases as they stood at submit (``{"chem": "chem@1",
            "chem@stable": "chem@2"}``): the worker resolves ``adapter="chem"`` with it, so an
            alias moved while the invocation waits or runs does not change it. None: none.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    id: str
    function_name: str
    function_digest: str
    model: str | None = None
    args: bytes
    timeout: float | None = None
    retries: int = 0
    attempt: int = 0
    submitted_at: float = Field(default_factory=time.time)
    store: dict[str, Any] | None = None
    stage_threshold: int | None = None
    refs: tuple[StagedRef, ...] = ()
    output: OutputTarget | None = None
    tenant: str | None = None
    weight: float | None = Field(None, gt=0)
    priority: Priority | None = None
    internals_scope: bool | None = None
    granted_modes: tuple[str, ...] | None = None
    adapters: dict[str, str] | None = None


class ErrorInfo(BaseModel):
    """Why an invocation failed.

    Attributes:
        kind: Which part failed: the user's code, the clock, a worker, an engine.
        type_name: Qualified name of the exception type.
        message: ``str()`` of the exception.
        traceback: Formatted remote traceback (empty when not from user code).
        exception: The exception serialised, when it could be; the caller rebuilds it.
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    kind: ErrorKind
    type_name: str
    message: str
    traceback: str = ""
    exception: bytes | None = None


class Result(BaseModel):
    """The outcome of one invocation.

    Attributes:
        invocation_id: The invocation this answers.
        value: Serialised return value when it succeeded, or a marker naming it
            in the store when it was staged.
        error: Why it failed, when it did.
        worker_pid: Process that ran it (0 when it never ran).
        worker_host: Host name of that process.
        started_at: Wall-clock start of execution.
        finished_at: Wall-clock end of execution.
        attempt: Which attempt produced this result.
        engine_calls: What the function asked of its engine (see ``runtime._policy.call_record``).
        queue_seconds: Arrival to dispatch in the pool.
        cold_start_seconds: The replica's cold start, when the invocation waited on it.
        engine: The serving replica's engine (kind, version, args, url), set by the pool.
        provenance: The invocation's provenance record (a ``ProvenanceRecord`` as
            JSON), set by the client before the result is recorded.
        logs: What the function wrote to stdout and stderr (see ``runtime._capture``).
    """

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    invocation_id: str
    value: bytes | None = None
    error: ErrorInfo | None = None
    worker_pid: int = 0
    worker_host: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    attempt: int = 0
    engine_calls: list[dict[str, Any]] = Field(default_factory=list)
    queue_seconds: float | None = None
    cold_start_seconds: float | None = None
    engine: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    logs: str = ""

    @property
    def ok(self) -> bool:
        """Whether the invocation succeeded."""
        return self.error is None
