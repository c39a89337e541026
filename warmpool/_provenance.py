"""The provenance of a finished invocation, built once, where it finishes.

:class:`warmpool._book.Book` builds it for every substrate when an invocation
gets its final Result (``result.provenance``); clients and the service record
it with the result, in the same commit-once object. A client whose invocations
finish elsewhere (the Globus Compute cloud) builds it on arrival.
"""

from __future__ import annotations

import hashlib
import logging

from registry import FunctionSpec, ModelSpec
from runtime import (
    Determinism,
    EngineCall,
    FunctionProvenance,
    Invocation,
    ModelProvenance,
    ProvenanceRecord,
    Result,
    Timings,
    determinism_of,
    is_marker,
    parse_marker,
)

log = logging.getLogger("faas.provenance")


def wire_digest(data: bytes | None) -> str | None:
    """sha256 of a value as stored: the staged object's digest, or the inline bytes'."""
    if data is None:
        return None
    if is_marker(data):
        return parse_marker(data).sha256
    return hashlib.sha256(data).hexdigest()


_NO_ENGINE = Determinism(greedy=True, seeded=True, reproducible=True, notes="No engine call was made.")


def build_provenance(
    invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, result: Result
) -> ProvenanceRecord:
    """The provenance of one finished invocation."""
    calls = [EngineCall.model_validate(c) for c in result.engine_calls]
    engine = result.engine or {}
    model_prov = None
    if model is not None:
        model_prov = ModelProvenance(
            name=model.name,
            version=model.version,
            weights_path=engine.get("model_path") or model.model_path,
            weights_digest=model.weights_digest or engine.get("weights_digest"),
            engine_kind=model.engine,
            engine_version=engine.get("version"),
            engine_args=dict(engine.get("args") or model.engine_args),
            engine_url=engine.get("url"),
            cold_start=engine.get("cold_start"),
            adapters={c.adapter: c.adapter_sha256 or "" for c in calls if c.adapter},
        )
    if result.error is None:
        status = "succeeded"
    else:
        status = "cancelled" if result.error.kind == "cancelled" else "failed"
    execution = result.finished_at - result.started_at if result.started_at and result.finished_at else None
    return ProvenanceRecord(
        invocation_id=invocation.id,
        status=status,
        attempt=result.attempt,
        function=FunctionProvenance(
            name=spec.name, version=spec.version, digest=spec.digest,
            module=spec.module, qualname=spec.qualname,
        ),
        model=model_prov,
        engine_calls=calls,
        input_digest=wire_digest(invocation.args) or "",
        output_digest=wire_digest(result.value),
        timings=Timings(
            submitted_at=invocation.submitted_at,
            queued_s=result.queue_seconds,
            cold_start_s=result.cold_start_seconds,
            execution_s=execution,
            engine_s=sum(c.engine_seconds for c in calls),
        ),
        prompt_tokens=sum(c.prompt_tokens for c in calls),
        completion_tokens=sum(c.completion_tokens for c in calls),
        worker_host=result.worker_host,
        worker_pid=result.worker_pid,
        determinism=determinism_of(calls) if calls else _NO_ENGINE,
    )  # fmt: skip


def ensure_provenance(
    invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, result: Result
) -> None:
    """Set ``result.provenance`` unless it is there already (it is built once, where the result is made).

    A failure to build it is logged and never costs the result.
    """
    if result.provenance is not None:
        return
    try:
        result.provenance = build_provenance(invocation, spec, model, result).model_dump(mode="json")
    except Exception:
        log.exception("Could not build the provenance of invocation %s", invocation.id)
