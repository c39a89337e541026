"""Provenance: which model, code and settings produced a result.

A :class:`ProvenanceRecord` is written beside every invocation's result
(``invocations/<id>/provenance.json``). It names the function (name, version,
digest), the model version (weights path and digest, engine kind, version and
arguments), every engine call's sampling parameters and seed, digests of the
stored input and output, timings, token counts, where it ran, and which
determinism guarantees held.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FunctionProvenance(BaseModel):
    """The code that ran."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    digest: str
    module: str = ""
    qualname: str = ""


class ModelProvenance(BaseModel):
    """The model version and engine that served it.

    Attributes:
        adapters: LoRA adapters the calls used, ``name@version`` -> sha256.
        cold_start: How the serving replica started: ``fetch_s`` (staging its weights
            into the node's cache), ``load_s`` (engine launch to ready), ``ready_s``
            (launch to ready in all), ``cache_hit`` and ``fetched_bytes``; None when
            the substrate does not report it.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    weights_path: str | None = None
    weights_digest: str | None = None
    engine_kind: str
    engine_version: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    engine_url: str | None = None
    cold_start: dict[str, Any] | None = None
    adapters: dict[str, str] = Field(default_factory=dict)


class EngineCall(BaseModel):
    """One request the function sent to the engine (no prompt or output text).

    Attributes:
        engine_seconds: The engine's latency for the call (its longest sequence's ``e2e_latency``).
        engine_share_seconds: The call's part of the engine's busy time, when the engine
            reports it (the CPU engine splits each step's time over its rows by tokens); None otherwise.
        ttft_seconds: Seconds from sending a streamed call to its first text (None unless streamed).
        internals: The call's hook-point reads and writes, each write's vector by sha256
            and shape (never by value); None when it used none.
        modes: The model modes the call used (``generate``, ``logprobs``, ...).
        adapter: The LoRA adapter version it ran with (``name@version``), None for the base model.
        adapter_sha256: That adapter's digest.
    """

    path: str
    sampling_params: Any = None
    options: dict[str, Any] = Field(default_factory=dict)
    rid: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_seconds: float = 0.0
    engine_share_seconds: float | None = None
    ttft_seconds: float | None = None
    wall_seconds: float = 0.0
    internals: dict[str, Any] | None = None
    modes: list[str] = Field(default_factory=list)
    adapter: str | None = None
    adapter_sha256: str | None = None


class Timings(BaseModel):
    """Seconds spent where."""

    submitted_at: float
    queued_s: float | None = None
    cold_start_s: float | None = None
    execution_s: float | None = None
    engine_s: float = 0.0


class Determinism(BaseModel):
    """Which guarantees held for this invocation.

    Attributes:
        greedy: Every engine call used temperature 0 (output depends only on
            model, engine build and inputs).
        seeded: Every sampled call carried a ``sampling_seed``.
        reproducible: ``greedy`` or ``seeded``: a replay on the same model
            version and engine build is expected to give the same output.
        notes: What may still differ (batching, hardware).
    """

    greedy: bool
    seeded: bool
    reproducible: bool
    notes: str = ""


class ProvenanceRecord(BaseModel):
    """Everything needed to say how a result was produced, and to replay it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    invocation_id: str
    status: str
    attempt: int = 0
    function: FunctionProvenance
    model: ModelProvenance | None = None
    engine_calls: list[EngineCall] = Field(default_factory=list)
    input_digest: str
    output_digest: str | None = None
    timings: Timings
    prompt_tokens: int = 0
    completion_tokens: int = 0
    worker_host: str = ""
    worker_pid: int = 0
    determinism: Determinism


def determinism_of(calls: list[EngineCall]) -> Determinism:
    """Judge reproducibility from the engine calls' sampling parameters."""
    params: list[dict[str, Any]] = []
    for call in calls:
        sp = call.sampling_params
        params.extend(sp if isinstance(sp, list) else [sp or {}])
    greedy = all(float(p.get("temperature", 1.0)) == 0.0 for p in params)
    seeded = all(
        float(p.get("temperature", 1.0)) == 0.0 or p.get("sampling_seed") is not None for p in params
    )
    notes = (
        "Same model version and engine build assumed; GPU kernels and batch composition can change "
        "floating-point results, which greedy decoding tolerates only while no two tokens tie."
    )
    return Determinism(greedy=greedy, seeded=seeded, reproducible=greedy or seeded, notes=notes)
