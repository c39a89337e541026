"""The pool service's HTTP API: request and response bodies, shared by server and client.

Routes (JSON unless noted; every ``/v1`` route needs ``Authorization: Bearer
<token>`` when the service has tokens)::

    GET  /health                            Health (no token)
    GET  /metrics                           Prometheus text (no token; no tenant data beyond counts)
    GET  /v1/session                        SessionInfo: who you are, your store, your limits
    POST /v1/functions                      RegisterFunction -> FunctionSpec
    GET  /v1/functions                      [FunctionSpec] (latest version of each)
    GET  /v1/functions/{name}               FunctionSpec (``name``, ``name@3`` or a digest)
    GET  /v1/models                         OpenAI model list; entries carry ``state``, ``aliases``, ``spec``
    POST /v1/invocations                    SubmitRequest -> InvocationView (``wait`` long-polls)
    POST /v1/invocation-batches             BatchRequest -> BatchView
    GET  /v1/invocation-batches/{id}/events text/event-stream of ResultView, then ``end``
    POST /v1/batches                        a native BatchRequest (older clients), else OpenAI's batch API
    GET  /v1/batches/{batch_id}/events      the native events again (older clients)
    POST /v1/chat/completions, /v1/completions, /v1/embeddings   OpenAI (docs/openai.md)
    POST /v1/watch                          WatchRequest -> text/event-stream of ResultView, then ``end``
    GET  /v1/invocations                    [InvocationView] (yours, newest first)
    GET  /v1/invocations/{id}               InvocationView
    GET  /v1/invocations/{id}/result        ResultView, long-polled up to ``timeout`` seconds
    POST /v1/invocations/{id}/cancel        CancelView
    GET  /v1/invocations/{id}/logs          text/plain: captured stdout and stderr
    GET  /v1/pool                           the pool's status (models, replicas, workers, counters)
    POST /v1/triggers                       BindRequest -> TriggerBinding (the service runs it)
    GET  /v1/triggers                       [TriggerBinding] (yours)
    GET  /v1/usage                          UsageReport: your usage rows, or their sums (``by``);
                                            admin tokens: ``tenant=T`` or ``all_tenants=true``

Errors come back as ``{"error": {"type": ..., "message": ...}}`` with 400 (bad
request), 401 (missing or wrong token), 403 (a valid token that may not do
that: another tenant's usage without admin), 404 (unknown, or another tenant's),
413 (a body over its route's limit, an inline value or a batch over its size limit:
stage it), 422 (a body that does not match its schema), 429 (quota, token budget with
``Retry-After``, or back-pressure) or 503 (shutting down).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from faas._usage import UsageGroup, UsageReport, UsageRow
from registry import FunctionSpec, ModelSpec, TriggerBinding
from runtime import ErrorInfo, Priority, StagedRef

_B64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="forbid")

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

MAX_INLINE_BYTES = 8 * 1024 * 1024
"""Largest inline argument blob the service accepts; larger values must be staged."""

MAX_BATCH = 1000
"""Most items in one batch request."""

MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Most inline argument bytes in one batch request, all items together (413 above)."""

MAX_BODY_BYTES = 16 * 1024 * 1024
"""Largest request body of a route without a limit of its own (413 above, before parsing)."""

MAX_FUNCTION_BODY_BYTES = 96 * 1024 * 1024
"""Largest ``POST /v1/functions`` body: a 64 MiB artifact as base64, and its options."""


class Limits(BaseModel):
    """A tenant's quotas.

    Attributes:
        max_inflight: Invocations of the tenant dispatched to the pool at once;
            more wait in the tenant's queue.
        max_queued: Invocations waiting in the tenant's queue; a submit beyond
            this is refused with 429.
        tokens_per_minute: Token budget (prompt + completion) over a sliding
            minute; while the tenant's finished invocations used this many, a
            submit is refused with 429 and ``Retry-After`` (None: no budget).
        tokens_per_30d: The same over a sliding 30 days.
        weight: The tenant's share of each shared engine relative to other
            backlogged tenants (fair admission, weighted VTC): 3 gets three
            times the tokens of a tenant with 1 while both wait.
    """

    max_inflight: int = Field(256, ge=1)
    max_queued: int = Field(100_000, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_30d: int | None = Field(None, ge=0)
    weight: float = Field(1.0, gt=0, le=1_000_000)


class SessionInfo(BaseModel):
    """What ``GET /v1/session`` tells a client.

    Attributes:
        tenant: The tenant the token maps to.
        store: ``config()`` of the tenant's view of the object store: the
            client stages large values there itself (the service never relays them).
        staging_threshold: Values above this many bytes travel by reference.
        limits: The tenant's quotas.
        version: The service's package version.
        admin: Whether the token is an operator's (may read every tenant's usage).
        internals: Whether the token has the ``internals`` scope (logprobs, hidden
            states, hook points).
    """

    tenant: str
    store: dict[str, Any]
    staging_threshold: int
    limits: Limits
    version: str
    admin: bool = False
    internals: bool = True


class ShareRequest(BaseModel):
    """Share a function with another tenant (invoke only)."""

    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="The tenant to share it with.")


class RegisterFunction(BaseModel):
    """Register a function: its artifact (cloudpickle bytes, base64) and options."""

    model_config = _B64

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    artifact: bytes = Field(max_length=64 * 1024 * 1024)
    model: str | None = Field(None, max_length=200)
    model_param: str | None = Field(None, max_length=200)
    model_param_index: int = Field(0, ge=-1, le=0)
    timeout: float | None = Field(None, gt=0)
    retries: int = Field(0, ge=0, le=100)
    priority: Priority | None = None
    module: str = Field("", max_length=500)
    qualname: str = Field("", max_length=500)


class Item(BaseModel):
    """The arguments of one invocation: serialised ``(args, kwargs)`` or a staging marker.

    Attributes:
        priority: This call's priority (None: the function's).
    """

    model_config = _B64

    args: bytes = Field(max_length=MAX_INLINE_BYTES)
    refs: list[StagedRef] = Field(default_factory=list, max_length=10_000)
    priority: Priority | None = None


class SubmitRequest(Item):
    """Submit one invocation.

    Attributes:
        function: Function reference: ``name``, ``name@version`` or a digest.
        wait: Seconds to wait for the result in the same request (0: return at once).
    """

    function: str = Field(min_length=1, max_length=300)
    wait: float = Field(0.0, ge=0, le=300)


class BatchRequest(BaseModel):
    """Submit many invocations of one function at once."""

    model_config = _B64

    function: str = Field(min_length=1, max_length=300)
    items: list[Item] = Field(min_length=1, max_length=MAX_BATCH)


class WatchRequest(BaseModel):
    """Stream the results of these invocations as they finish."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=100_000)


class ResultView(BaseModel):
    """An invocation's outcome as the service returns it.

    Attributes:
        id: The invocation id.
        status: Its state; ``value`` and ``error`` are set only in a final state.
        value: The result's wire bytes (base64): the serialised value, or a
            staging marker the client resolves against the store itself.
        error: Why it failed.
    """

    model_config = _B64

    id: str
    status: State
    value: bytes | None = None
    error: ErrorInfo | None = None


class InvocationView(BaseModel):
    """What the service knows about one invocation."""

    model_config = _B64

    id: str
    status: State
    function_name: str
    function_digest: str
    model: str | None = None
    batch: str | None = None
    submitted_at: float
    finished_at: float | None = None
    result: ResultView | None = None


class BatchView(BaseModel):
    """A submitted batch: its id and its invocations' ids, in input order."""

    batch_id: str
    ids: list[str]


class CancelView(BaseModel):
    """The outcome of a cancel request.

    Attributes:
        cancelled: Whether this request cancelled it (False when it had already finished).
        status: Its state after the request.
    """

    id: str
    cancelled: bool
    status: State


class BindRequest(BaseModel):
    """Bind one of your functions to new objects under a bucket prefix; the service runs the binding.

    Attributes:
        function: The function version: a digest, ``name`` or ``name@version``.
        name: The binding's name (default: the function's name).
        reprocess: On re-binding another version, run it on every object again.
        options: The binding's other fields: ``bucket`` and ``output_prefix``
            (required), ``prefix``, ``suffix``, ``poll_interval``,
            ``max_concurrency``, ... (see ``faas.triggers.TriggerBinding``).
            On a file store, directories are relative to your part of the store.
    """

    model_config = ConfigDict(extra="forbid")

    function: str = Field(min_length=1, max_length=300)
    name: str | None = Field(None, min_length=1, max_length=128)
    reprocess: bool = False
    options: dict[str, Any] = Field(default_factory=dict, max_length=64)


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: dict[str, str | None]  # type and message; OpenAI routes add param and code (null when unset)


__all__ = [
    "FINAL_STATES",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_BODY_BYTES",
    "MAX_FUNCTION_BODY_BYTES",
    "MAX_INLINE_BYTES",
    "BatchRequest",
    "BatchView",
    "BindRequest",
    "CancelView",
    "ErrorBody",
    "FunctionSpec",
    "InvocationView",
    "Item",
    "Limits",
    "ModelSpec",
    "RegisterFunction",
    "ResultView",
    "SessionInfo",
    "State",
    "SubmitRequest",
    "TriggerBinding",
    "UsageGroup",
    "UsageReport",
    "UsageRow",
    "WatchRequest",
]
