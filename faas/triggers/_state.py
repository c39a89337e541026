"""The durable state of trigger bindings, in the faas store.

Every record is keyed by a dedup id, sha256(bucket|key|etag|function digest),
so one object version is processed once per function digest. Layout::

    triggers/runners/<runner-id>.json                   heartbeat of a live runner
    triggers/bindings/<name>/seen/<id>                  claim of attempt 1 (the dedup record), commit-once
    triggers/bindings/<name>/seen/<id>.<n>              claim of attempt n >= 2, commit-once
    triggers/bindings/<name>/done/<id>                  done marker, commit-once, written with the output
    triggers/bindings/<name>/dead/<id>.json             dead letter: the error and provenance
    triggers/bindings/<name>/retry/<id>.json            a retry asked for by ``faas triggers retry``
    triggers/bindings/<name>/status/<runner-id>.json    that runner's metrics for the binding

A claim names the runner that holds it. Only that runner rewrites it (to record
a failed attempt). Another runner takes an unfinished object over by claiming
the next attempt number, which only one runner can win, once the holder's
heartbeat is older than the binding's lease or the claim records a failure.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from faas.triggers._buckets import ObjectEvent, Origin
from runtime import ObjectExists, ObjectNotFound, ObjectStore

RUNNERS_PREFIX = "triggers/runners/"


def binding_prefix(name: str) -> str:
    """The store prefix holding binding ``name``'s records."""
    return f"triggers/bindings/{name}/"


class Claim(BaseModel):
    """One attempt at one object version, held by one runner."""

    model_config = ConfigDict(extra="ignore")

    id: str
    attempt: int
    runner: str
    state: Literal["claimed", "failed"] = "claimed"
    failures: int = 0
    claimed_at: float
    updated_at: float
    bucket: str
    key: str
    etag: str
    size: int | None = None
    event_time: float
    origin: str = "notification"
    error: dict[str, str] | None = None

    def event(self, origin: Origin = "recovery") -> ObjectEvent:
        """The object event this claim is about."""
        return ObjectEvent(self.bucket, self.key, self.etag, self.size, self.event_time, origin=origin)


def event_doc(ev: ObjectEvent) -> dict[str, Any]:
    """The JSON form of an event (for dead letters and retries)."""
    return {
        "bucket": ev.bucket,
        "key": ev.key,
        "etag": ev.etag,
        "size": ev.size,
        "event_time": ev.event_time,
    }


def event_from(doc: dict[str, Any], origin: Origin = "retry") -> ObjectEvent:
    """Rebuild an event from :func:`event_doc`'s form."""
    return ObjectEvent(
        doc["bucket"], doc["key"], doc["etag"], doc.get("size"), doc["event_time"], origin=origin
    )


class TriggerState:
    """The records of one binding.

    Args:
        store: The faas store.
        binding: The binding's name.
    """

    def __init__(self, store: ObjectStore, binding: str) -> None:
        self.store, self.binding = store, binding
        self.prefix = binding_prefix(binding)

    # -- claims -------------------------------------------------------------------------
    def claim_key(self, id: str, attempt: int) -> str:
        """The key of attempt ``attempt``'s claim on ``id``."""
        return f"{self.prefix}seen/{id}" + (f".{attempt}" if attempt > 1 else "")

    def claim(self, claim: Claim) -> bool:
        """Write a claim commit-once; False if that attempt is claimed already."""
        try:
            self.store.put(
                self.claim_key(claim.id, claim.attempt), claim.model_dump_json().encode(), if_absent=True
            )
        except ObjectExists:
            return False
        return True

    def update_claim(self, claim: Claim) -> None:
        """Rewrite a claim this runner holds (to record a failure)."""
        self.store.put(self.claim_key(claim.id, claim.attempt), claim.model_dump_json().encode())

    def read_claim(self, id: str, attempt: int) -> Claim | None:
        """Attempt ``attempt``'s claim on ``id``, if any."""
        try:
            return Claim.model_validate_json(self.store.get(self.claim_key(id, attempt)))
        except ObjectNotFound:
            return None

    def attempts(self) -> dict[str, int]:
        """The latest attempt claimed for every id."""
        out: dict[str, int] = {}
        for name in self._names("seen/"):
            id, _, n = name.partition(".")
            out[id] = max(out.get(id, 0), int(n) if n.isdigit() else 1)
        return out

    # -- done markers, dead letters, retries -----------------------------------------------
    def done_key(self, id: str) -> str:
        """The key of ``id``'s done marker."""
        return f"{self.prefix}done/{id}"

    def put_done(self, id: str, doc: dict[str, Any]) -> bool:
        """Commit the done marker once; False if one was there already."""
        try:
            self.store.put(self.done_key(id), json.dumps(doc).encode(), if_absent=True)
        except ObjectExists:
            return False
        return True

    def read_done(self, id: str) -> dict[str, Any] | None:
        """The done marker of ``id``, if committed."""
        return self._get_json(self.done_key(id))

    def is_done(self, id: str) -> bool:
        """Whether ``id`` has a done marker."""
        return self.store.exists(self.done_key(id))

    def is_settled(self, id: str) -> bool:
        """Whether ``id`` is done or dead-lettered."""
        return self.is_done(id) or self.store.exists(f"{self.prefix}dead/{id}.json")

    def done_ids(self) -> set[str]:
        """Every id with a done marker."""
        return set(self._names("done/"))

    def put_dead(self, id: str, doc: dict[str, Any]) -> None:
        """Write the dead letter of ``id``."""
        self.store.put(f"{self.prefix}dead/{id}.json", json.dumps(doc, indent=1).encode())

    def dead_ids(self) -> set[str]:
        """Every dead-lettered id."""
        return {n.removesuffix(".json") for n in self._names("dead/")}

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter, oldest failure first."""
        docs = [self._get_json(f"{self.prefix}dead/{n}") for n in self._names("dead/")]
        return sorted((d for d in docs if d), key=lambda d: float(d.get("failed_at", 0)))

    def delete_dead(self, id: str) -> None:
        """Remove the dead letter of ``id``."""
        self.store.delete(f"{self.prefix}dead/{id}.json")

    def request_retry(self, dead: dict[str, Any]) -> None:
        """Queue a dead letter for another try (the runner picks it up on its next listing)."""
        doc = {"id": dead["id"], "event": dead["event"], "requested_at": time.time()}
        self.store.put(f"{self.prefix}retry/{dead['id']}.json", json.dumps(doc).encode())

    def retries(self) -> list[dict[str, Any]]:
        """Retry requests waiting for a runner."""
        docs = [self._get_json(f"{self.prefix}retry/{n}") for n in self._names("retry/")]
        return [d for d in docs if d]

    def delete_retry(self, id: str) -> None:
        """Remove a retry request once it is claimed."""
        self.store.delete(f"{self.prefix}retry/{id}.json")

    # -- runners and status ----------------------------------------------------------------
    def write_status(self, runner: str, doc: dict[str, Any]) -> None:
        """Write this runner's metrics snapshot for the binding."""
        self.store.put(f"{self.prefix}status/{runner}.json", json.dumps(doc).encode())

    def statuses(self, max_age: float = 30.0, now: float | None = None) -> list[dict[str, Any]]:
        """The snapshots of runners that reported within ``max_age`` seconds."""
        now = time.time() if now is None else now
        docs = [self._get_json(f"{self.prefix}status/{n}") for n in self._names("status/")]
        return [d for d in docs if d and now - float(d.get("updated_at", 0)) <= max_age]

    def _names(self, sub: str) -> list[str]:
        base = self.prefix + sub
        return [k[len(base) :] for k in self.store.list(base) if "/" not in k[len(base) :]]

    def _get_json(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.store.get(key)))
        except (ObjectNotFound, ValueError):
            return None


def write_heartbeat(store: ObjectStore, runner: str, doc: dict[str, Any]) -> None:
    """Record that ``runner`` is alive (``doc`` carries ``beat_at``)."""
    store.put(f"{RUNNERS_PREFIX}{runner}.json", json.dumps(doc).encode())


def read_heartbeat(store: ObjectStore, runner: str) -> dict[str, Any] | None:
    """The last heartbeat of ``runner``, if any."""
    with contextlib.suppress(ObjectNotFound, ValueError):
        return dict(json.loads(store.get(f"{RUNNERS_PREFIX}{runner}.json")))
    return None
