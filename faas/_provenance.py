"""Build provenance records, and replay an invocation from its records.

The pool builds a :class:`runtime.ProvenanceRecord` when an invocation
finishes (:func:`warmpool.build_provenance`, called by its book); clients and
the service record it with the result, in the same commit-once object
(``invocations/<id>/result.json``, field ``provenance``), so it costs no
extra write. ``faas provenance ID``
prints it; ``faas replay ID`` runs the same function version on the same
pinned model version with the same stored inputs and compares the outputs field by
field (``faas._replay_compare``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from faas._replay_compare import Comparison, Difference, Tolerance, compare
from runtime import (
    ObjectNotFound,
    ObjectStore,
    ProvenanceRecord,
    unstage_value,
)


def provenance_key(invocation_id: str) -> str:
    """Store key of the result record that carries an invocation's provenance."""
    return f"invocations/{invocation_id}/result.json"


def read_provenance(store: ObjectStore, invocation_id: str) -> ProvenanceRecord:
    """Load and validate an invocation's provenance record.

    Raises:
        ObjectNotFound: No provenance is recorded for that id (yet).
    """
    try:
        data = json.loads(store.get(provenance_key(invocation_id)))
    except ObjectNotFound:
        data = {}
    if not data.get("provenance"):
        raise ObjectNotFound(f"No provenance is recorded for invocation {invocation_id!r} (yet).")
    return ProvenanceRecord.model_validate(data["provenance"])


@dataclass(frozen=True)
class ReplayReport:
    """The outcome of ``faas replay``.

    Attributes:
        original_id: The replayed invocation.
        replay_id: The new invocation.
        matches: Whether the outputs agree on what matters: text and token ids exactly,
            floats within ``tolerance``, run-specific fields (timings, request ids) ignored.
        original_digest: Output digest of the original.
        replay_digest: Output digest of the replay.
        value: The replay's return value.
        tolerance: The float tolerance used.
        comparison: Field-by-field differences; None when the outputs were compared by
            digest only (``compared_by`` says why).
        compared_by: ``digest`` (identical bytes, or a value that could not be loaded) or ``fields``.
        note: Why the comparison fell back to digests, if it did.
    """

    original_id: str
    replay_id: str
    matches: bool
    original_digest: str | None
    replay_digest: str | None
    value: Any
    tolerance: Tolerance = field(default_factory=Tolerance)
    comparison: Comparison | None = None
    compared_by: str = "digest"
    note: str | None = None

    @property
    def differences(self) -> list[Difference]:
        """The differing fields (empty on a match or a digest-only comparison)."""
        return list(self.comparison.differences) if self.comparison else []

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary."""
        out: dict[str, Any] = {
            "original": self.original_id,
            "replay": self.replay_id,
            "matches": self.matches,
            "compared_by": self.compared_by,
            "tolerance": {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol},
            "differences": [d.describe() for d in self.differences],
            "original_output_digest": self.original_digest,
            "replay_output_digest": self.replay_digest,
            "value": json.loads(json.dumps(self.value, default=repr)),
        }
        if self.comparison is not None:
            out["more_differences"] = self.comparison.more
            out["ignored"] = self.comparison.ignored
        if self.note:
            out["note"] = self.note
        return out


def _recorded_value(client: Any, invocation_id: str) -> Any:
    """The original's return value, loaded from its result record."""
    record = client.record(invocation_id)
    if record.result is None:
        raise ObjectNotFound(f"Invocation {invocation_id!r} has no recorded result to compare with.")
    return unstage_value(client.store, record.result.to_wire(), what="result")


def replay(
    client: Any, invocation_id: str, *, timeout: float | None = 600.0, tolerance: Tolerance | None = None
) -> ReplayReport:
    """Run an invocation again: same function version, pinned model version, same stored inputs.

    The outputs are compared field by field: text, token ids and
    other exact values must be equal, floats (logprobs, hidden states, embeddings) agree
    within ``tolerance``, and timing fields and request ids are not compared.

    Args:
        client: A ``faas.Client`` on the store that holds the invocation's records.
        invocation_id: The invocation to replay.
        timeout: Seconds to wait for the replay's result.
        tolerance: Float tolerance (default ``Tolerance()``: rtol 1e-3, atol 1e-4).

    Raises:
        ObjectNotFound: The invocation or its provenance is not recorded.
    """
    tol = tolerance or Tolerance()
    original = read_provenance(client.store, invocation_id)
    request = client.record(invocation_id)
    if request.args is None:
        raise ObjectNotFound(f"Invocation {invocation_id!r} has no recorded arguments to replay.")
    spec = client.registry.get_function(original.function.digest)
    model = None
    if original.model is not None:
        model = client.resolve_model(f"{original.model.name}@{original.model.version}")
    future = client.submit_spec(spec, model, request.args.to_wire(), request.args.refs)
    value = future.result(timeout)
    client.flush_records(timeout)
    again = read_provenance(client.store, future.invocation_id)
    report = ReplayReport(
        original_id=invocation_id,
        replay_id=future.invocation_id,
        matches=again.output_digest == original.output_digest,
        original_digest=original.output_digest,
        replay_digest=again.output_digest,
        value=value,
        tolerance=tol,
    )
    if report.matches:  # identical bytes: nothing to walk
        return report
    try:
        before = _recorded_value(client, invocation_id)
    except Exception as exc:  # e.g. a class the CLI cannot import: the digests are all we have
        return replace(report, note=f"The original value could not be loaded ({exc}); compared digests only.")
    comparison = compare(before, value, tol)
    return replace(report, matches=comparison.matches, comparison=comparison, compared_by="fields")
