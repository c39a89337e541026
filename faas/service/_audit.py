"""The service's audit log: append-only, hash-chained JSON lines.

Each entry records who did what, when: use of the modes that expose model internals,
changes to the token file (tenants, tokens and scopes added, removed or revoked), and model
alias moves the service sees. Every line carries ``prev`` (the previous line's hash; 64
zeros for the first) and ``hash``, the sha256 of the line's other fields as canonical JSON,
so editing, removing or reordering any entry breaks the chain from that point on:
:func:`verify` finds the first line that does not hold. ``faas audit`` prints and verifies it.

The chain proves the file was not edited in place without recomputing every later hash;
an operator who can rewrite the whole file can forge a new chain. Ship the log elsewhere
(or anchor its latest hash somewhere append-only) where that matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faas._usage import UsageRow
from faas.service._auth import ReloadingTokenAuth
from faas.service._ledger import Ledger
from registry import ModelSpec, Registry
from runtime import ObjectStore

GENESIS = "0" * 64


def _hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify` found.

    Attributes:
        ok: Every line parses, is in sequence and chains to the one before.
        entries: How many lines were checked (up to and excluding a bad one).
        bad_line: The 1-based number of the first line that does not hold, or None.
        reason: Why it does not hold, in a sentence ("" when ok).
    """

    ok: bool
    entries: int
    bad_line: int | None = None
    reason: str = ""


def read(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of an audit log, in order (unchecked; see :func:`verify`)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def verify(path: Path) -> AuditReport:
    """Check every line's hash, sequence number and link to the previous line."""
    prev, n = GENESIS, 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return AuditReport(True, 0)
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return AuditReport(False, n, number, f"Line {number} is not JSON.")
        if not isinstance(entry, dict) or entry.get("prev") != prev:
            return AuditReport(False, n, number, f"Line {number} does not link to the line before it.")
        if entry.get("seq") != n + 1:
            return AuditReport(
                False, n, number, f"Line {number} has sequence {entry.get('seq')}, not {n + 1}."
            )
        if entry.get("hash") != _hash(entry):
            return AuditReport(False, n, number, f"Line {number} was changed after it was written.")
        prev, n = entry["hash"], n + 1
    return AuditReport(True, n)


class AuditLog:
    """Appends hash-chained entries to one file (created 0600); thread-safe.

    Args:
        path: The log file. An existing log is continued from its last entry.
        auth: The service's authenticator: a re-read token file's changes are
            recorded as the ``operator``'s.
        clock: Wall-clock time (seconds since the epoch).
    """

    def __init__(self, path: Path, *, auth: object = None, clock: Callable[[], float] = time.time) -> None:
        if isinstance(auth, ReloadingTokenAuth):
            auth.listen(self._operator_change)
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = 0, GENESIS
        if self.path.exists():
            for entry in read(self.path):  # continue the chain (verify() judges it)
                self._seq, self._prev = int(entry.get("seq", self._seq)), str(entry.get("hash", self._prev))

    def append(self, action: str, actor: str, **detail: Any) -> dict[str, Any]:
        """Write one entry and fsync it; returns it (with its hash).

        Args:
            action: What happened, dotted (``internals.use``, ``tokens.revoked``, ...).
            actor: Who did it: a tenant, ``operator`` or ``service``.
            **detail: JSON-able particulars (never a token or a secret).
        """
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "at": self._clock(),
                "actor": actor,
                "action": action,
                "detail": detail,
                "prev": self._prev,
            }
            entry["hash"] = _hash(entry)
            line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq, self._prev = entry["seq"], entry["hash"]
            return entry

    def _operator_change(self, action: str, detail: dict[str, Any]) -> None:
        self.append(action, "operator", **detail)

    def charging(self, ledger: Ledger) -> Callable[[list[UsageRow]], None]:
        """The committer's usage callback: charge ``ledger``, and record each use of privileged modes."""

        def charge(rows: list[UsageRow]) -> None:
            ledger.charge(rows)
            for row in rows:
                if row.privileged:
                    detail = {"invocation": row.invocation_id, "function": row.function, "model": row.model}
                    self.append("internals.use", row.tenant, **detail, modes=row.privileged)

        return charge


class AuditedModels(Registry):
    """The service's model registry: an alias it resolves to a new version is an audited move.

    The registry is the operator's (``faas models``, the Python API); the service notices a
    move the first time it resolves the alias afterwards (within ``SPEC_CACHE_SECONDS`` of a
    call that uses it) and records ``model.alias`` with the old and new versions.
    """

    def __init__(self, store: ObjectStore, audit: AuditLog) -> None:
        super().__init__(store)
        self._audit = audit
        self._seen: dict[str, str] = {}
        self._seen_lock = threading.Lock()

    def get_model(self, ref: str) -> ModelSpec:
        """Resolve ``ref``; record a move when an alias now names another version than before."""
        spec = super().get_model(ref)
        name, _, alias = ref.partition("@")
        if alias.isdigit():
            return spec  # a pinned version cannot move
        key = f"{name}@{alias or 'latest'}"
        with self._seen_lock:
            before, self._seen[key] = self._seen.get(key), str(spec.version)
        if before is not None and before != str(spec.version):
            self._audit.append(
                "model.alias",
                "operator",
                model=name,
                alias=alias or "latest",
                old=before,
                new=str(spec.version),
            )
        return spec
