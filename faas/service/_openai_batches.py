"""OpenAI's batch API: every line of a JSONL file a durable invocation of a built-in function.

A batch is checked whole before anything runs (every line parsed and checked
as its route would check it; a bad line refuses the batch, naming the line).
Its record goes to the service's state (``openai.sqlite`` beside the index)
before its lines are accepted, and each line is then submitted through the
one invocation path (:meth:`OpenAIGateway.submit`) under an id derived from
the batch and the line number (``<batch hex><line:06d>``). So after a SIGKILL
the restarted service knows every line: the index reruns the unfinished ones
(as for any invocation) and :meth:`OpenAIBatches.recover` submits the lines
the crash kept from being accepted. Lines run at ``batch`` priority unless
their body names one; they are fair-shared, charged and recorded like any
invocation (one usage row each).

Status follows OpenAI's names: ``in_progress`` until every line has finished,
then the output file (the lines that succeeded) and the error file (the others)
are written to the tenant's store and the batch is ``completed``; a cancel
makes it ``cancelling`` (waiting lines are cancelled, running ones aborted)
and then ``cancelled``, with the lines that finished in its files. The files
are written when the batch is next read (a GET or a list), so nothing runs in
the background that a restart could lose. Batches do not expire; a
``completion_window`` other than ``24h`` is refused.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from faas.openai import PATHS, Kind, check_request
from faas.service._core import ServiceCore
from faas.service._openai import OpenAIGateway, Prepared
from faas.service._openai_files import OpenAIFiles, jsonl
from faas.service._openai_routes import error_body
from faas.service._tenant import Tenant
from runtime import FaasError, InvalidParameterError, NotFoundError, new_id

log = logging.getLogger("faas.service")

ENDPOINTS: dict[str, Kind] = {path: kind for kind, path in PATHS.items()}
"""The routes a batch may target, and the kind of request each takes."""
MAX_LINES = 50_000
"""Most requests in one batch (OpenAI's limit)."""
CHUNK = 1000
"""Lines accepted per transaction."""
WINDOW = "24h"
FINAL = frozenset({"completed", "cancelled", "failed", "expired"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant, created_at);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
"""


class _Table:
    """The batches' records (SQLite, write-ahead log, beside the invocation index)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def put(self, tenant: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO batches (id, tenant, created_at, status, record) "
                "VALUES (?, ?, ?, ?, ?)",
                (record["id"], tenant, record["created_at"], record["status"], json.dumps(record)),
            )

    def get(self, batch_id: str) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            row = self._db.execute("SELECT tenant, record FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def of_tenant(self, tenant: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM batches WHERE tenant = ? ORDER BY created_at DESC, id DESC", (tenant,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def unfinished(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, record FROM batches WHERE status IN ('in_progress', 'cancelling')"
            ).fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True)
class _Line:
    number: int
    custom_id: str
    body: dict[str, Any]


def line_id(batch_id: str, number: int) -> str:
    """The invocation id of a batch's line ``number`` (0-based)."""
    return f"{batch_id.removeprefix('batch_')}{number:06d}"


def _bad(message: str, param: str = "input_file_id") -> InvalidParameterError:
    return InvalidParameterError(message, param)


def parse_lines(data: bytes, endpoint: str) -> list[_Line]:
    """A batch input file's requests, checked for shape (not yet for their bodies).

    Raises:
        InvalidParameterError: Not UTF-8 JSON Lines, a line without ``custom_id``
            (or a repeated one), a method other than POST, a URL other than
            ``endpoint``, no body, or too many lines; the message names the line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"The input file is not UTF-8 text (byte {exc.start}).") from None
    lines: list[_Line] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise _bad(f"Line {n} of the input file is not JSON: {exc}.") from None
        if not isinstance(obj, dict):
            raise _bad(f"Line {n} of the input file is not a JSON object.")
        custom_id, method, url, body = (obj.get(k) for k in ("custom_id", "method", "url", "body"))
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            raise _bad(f"Line {n} of the input file needs a 'custom_id' string (1 to 512 characters).")
        if custom_id in seen:
            raise _bad(f"Line {n} of the input file repeats custom_id {custom_id!r}; each must be unique.")
        seen.add(custom_id)
        if method != "POST":
            raise _bad(f"Line {n} of the input file has method {method!r}; only 'POST' is supported.")
        if url != endpoint:
            raise _bad(
                f"Line {n} of the input file is for {url!r}, but the batch's endpoint is {endpoint!r}."
            )
        if not isinstance(body, dict):
            raise _bad(f"Line {n} of the input file has no 'body' object.")
        if body.get("stream"):
            raise _bad(f"Line {n} of the input file asks to stream; a batch's requests cannot stream.")
        lines.append(_Line(len(lines), custom_id, body))
        if len(lines) > MAX_LINES:
            raise _bad(f"The input file has more than {MAX_LINES} requests, the most one batch may have.")
    if not lines:
        raise _bad("The input file has no requests.")
    return lines


class OpenAIBatches:
    """The batch API of one service (see the module docstring).

    Args:
        core: The service core.
        gateway: Runs OpenAI bodies as invocations (the online routes' own).
        files: The tenants' files.
    """

    def __init__(self, core: ServiceCore, gateway: OpenAIGateway, files: OpenAIFiles) -> None:
        self.core = core
        self.gateway = gateway
        self.files = files
        self._table = _Table(Path(core.index.path).parent / "openai.sqlite")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        """Close the batches' table."""
        self._table.close()

    # -- create ---------------------------------------------------------------------
    def create(self, tenant: Tenant, raw: object) -> dict[str, Any]:
        """Check a batch request and its input file whole, then accept every line durably.

        Raises:
            InvalidParameterError: A bad field, file or line (nothing accepted).
            NotFoundError: No such input file.
            UnknownModelError: A line names a model this service does not serve.
            QuotaExceededError: The tenant's queue quota (the batch fails; nothing runs).
            BudgetExceededError: The tenant's token budget (nothing accepted).
        """
        if not isinstance(raw, dict):
            raise _bad("The request body must be a JSON object.", "body")
        endpoint, window, file_id = (
            raw.get("endpoint"),
            raw.get("completion_window"),
            raw.get("input_file_id"),
        )
        if endpoint not in ENDPOINTS:
            raise _bad(f"Invalid 'endpoint': {endpoint!r} is not one of {', '.join(ENDPOINTS)}.", "endpoint")
        if window != WINDOW:
            raise _bad(f"Invalid 'completion_window': only {WINDOW!r} is supported.", "completion_window")
        if not isinstance(file_id, str):
            raise _bad("Invalid 'input_file_id': expected a file id string.")
        metadata = raw.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise _bad("Invalid 'metadata': at most 16 string keys with string values.", "metadata")
        info = self.files.get(tenant, file_id)
        if info.purpose != "batch":
            raise _bad(f"File {file_id!r} has purpose {info.purpose!r}; a batch's input needs 'batch'.")
        kind = ENDPOINTS[endpoint]
        lines = parse_lines(self.files.content(tenant, file_id), endpoint)
        prepared = self._prepare(kind, lines)
        self.core.ledger.check(tenant)  # refuse an over-budget tenant before recording anything
        now = int(time.time())
        batch_id = f"batch_{new_id()}"
        record: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": WINDOW,
            "status": "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": now,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self._table.put(tenant.name, record)  # durable before any line is accepted
        try:
            self._submit(tenant, batch_id, list(zip(lines, prepared, strict=True)))
        except FaasError as exc:
            record.update(
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": type(exc).__name__, "message": str(exc)}]},
            )
            self._table.put(tenant.name, record)
            self._cancel_lines(tenant, batch_id, len(lines))
            raise
        return record

    def _prepare(self, kind: Kind, lines: list[_Line]) -> list[Prepared]:
        out: list[Prepared] = []
        for line in lines:
            try:
                p = self.gateway.prepare(kind, line.body)
            except FaasError as exc:
                raise _bad(
                    f"Line {line.number + 1} of the input file (custom_id {line.custom_id!r}): {exc}"
                ) from None
            if p.request.priority is None:  # a batch's lines yield to the tenant's interactive calls
                p = replace(p, item=p.item.model_copy(update={"priority": "batch"}))
            out.append(p)
        return out

    def _submit(self, tenant: Tenant, batch_id: str, lines: list[tuple[_Line, Prepared]]) -> None:
        """Accept lines in chunks of one model each, under their derived ids."""
        by_model: dict[str, list[tuple[_Line, Prepared]]] = {}
        for line, p in lines:
            by_model.setdefault(p.model.ref, []).append((line, p))
        for group in by_model.values():
            for start in range(0, len(group), CHUNK):
                chunk = group[start : start + CHUNK]
                ids = [line_id(batch_id, line.number) for line, _ in chunk]
                self.gateway.submit(tenant, [p for _, p in chunk], batch_id=batch_id, ids=ids)

    # -- read -----------------------------------------------------------------------
    def get(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        """One of the tenant's batches, its counts current; finished ones get their files written.

        Raises:
            NotFoundError: No such batch (or another tenant's).
        """
        found = self._table.get(batch_id)
        if found is None or found[0] != tenant.name:
            raise NotFoundError(f"No batch {batch_id!r} is known to this service.", 404)
        return self._refresh(tenant, found[1])

    def list(self, tenant: Tenant, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """The tenant's batches, newest first, a page of ``limit`` after the batch ``after``."""
        if not 1 <= limit <= 100:
            raise _bad(f"Invalid 'limit': expected 1 to 100, got {limit}.", "limit")
        records = self._table.of_tenant(tenant.name)
        if after is not None:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        page = [self._refresh(tenant, r) for r in records[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(records) > limit,
        }

    def cancel(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        """Cancel a batch: it is ``cancelling`` at once, ``cancelled`` once its lines have stopped.

        Raises:
            NotFoundError: No such batch (or another tenant's).
        """
        record = self.get(tenant, batch_id)
        if record["status"] != "in_progress":
            return record  # finished, failed or already cancelling: nothing to do
        with self._lock(batch_id):
            record.update(status="cancelling", cancelling_at=int(time.time()))
            self._table.put(tenant.name, record)
        total = record["request_counts"]["total"]
        threading.Thread(
            target=self._cancel_lines,
            args=(tenant, batch_id, total),
            name=f"faas-cancel-{batch_id}",
            daemon=True,
        ).start()
        return record

    def _cancel_lines(self, tenant: Tenant, batch_id: str, total: int) -> None:
        rows = {r.id: r.state for r in self.core.index.batch(batch_id)}
        for n in range(total):
            inv = line_id(batch_id, n)
            if rows.get(inv) in ("queued", "running"):
                try:
                    self.core.cancel(tenant, inv)
                except Exception as exc:  # it finished meanwhile, or the service is closing
                    log.debug("Cancelling line %s of %s: %s", n, batch_id, exc)

    # -- recovery -------------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: accept the lines a crash kept out, resume cancels; returns lines submitted."""
        submitted = 0
        for tenant_name, record in self._table.unfinished():
            tenant = next((t for t in self.core.auth.tenants() if t.name == tenant_name), Tenant(tenant_name))
            batch_id, total = record["id"], record["request_counts"]["total"]
            if record["status"] == "cancelling":
                threading.Thread(
                    target=self._cancel_lines, args=(tenant, batch_id, total), daemon=True
                ).start()
                continue
            have = {r.id for r in self.core.index.batch(batch_id)}
            missing = [n for n in range(total) if line_id(batch_id, n) not in have]
            if not missing:
                continue
            kind = ENDPOINTS[record["endpoint"]]
            lines = parse_lines(self.files.content(tenant, record["input_file_id"]), record["endpoint"])
            todo = [lines[n] for n in missing]
            self._submit(tenant, batch_id, list(zip(todo, self._prepare(kind, todo), strict=True)))
            submitted += len(todo)
            log.info("Batch %s: accepted %d lines a restart had kept out.", batch_id, len(todo))
        return submitted

    # -- finishing ------------------------------------------------------------------
    def _lock(self, batch_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(batch_id, threading.Lock())

    def _refresh(self, tenant: Tenant, record: dict[str, Any]) -> dict[str, Any]:
        if record["status"] in FINAL:
            return record
        batch_id, total = record["id"], record["request_counts"]["total"]
        states = {r.id: r.state for r in self.core.index.batch(batch_id)}
        done = {i: s for i, s in states.items() if s in ("succeeded", "failed", "cancelled")}
        counts = {
            "total": total,
            "completed": sum(1 for s in done.values() if s == "succeeded"),
            "failed": sum(1 for s in done.values() if s != "succeeded"),
        }
        cancelling = record["status"] == "cancelling"
        finished = len(done) == total or (cancelling and len(done) == len(states))
        record = {**record, "request_counts": counts}
        if finished:
            with self._lock(batch_id):
                again = self._table.get(batch_id)
                if again is not None and again[1]["status"] in FINAL:
                    return again[1]
                record = self._finalize(tenant, record, states)
        return record

    def _finalize(self, tenant: Tenant, record: dict[str, Any], states: dict[str, str]) -> dict[str, Any]:
        """Write the output and error files of a batch whose lines have all stopped."""
        batch_id = record["id"]
        hexid = batch_id.removeprefix("batch_")
        lines = parse_lines(self.files.content(tenant, record["input_file_id"]), record["endpoint"])
        kind = ENDPOINTS[record["endpoint"]]
        out: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in lines:
            inv = line_id(batch_id, line.number)
            row = self._line_result(tenant, kind, line, inv, states.get(inv))
            (out if row["error"] is None else errors).append(row)
        record = dict(record)
        record["finalizing_at"] = record["finalizing_at"] or int(time.time())
        for key, rows, suffix, name in (
            ("output_file_id", out, "out", "output"),
            ("error_file_id", errors, "err", "error"),
        ):
            if rows:
                record[key] = self.files.create(
                    tenant,
                    jsonl(rows),
                    filename=f"{batch_id}_{name}.jsonl",
                    purpose="batch_output",
                    file_id=f"file-{hexid}{suffix}",
                ).id
        record["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        now = int(time.time())
        if record["status"] == "cancelling":
            record.update(status="cancelled", cancelled_at=now)
        else:
            record.update(status="completed", completed_at=now)
        self._table.put(tenant.name, record)
        return record

    def _line_result(
        self, tenant: Tenant, kind: Kind, line: _Line, inv: str, state: str | None
    ) -> dict[str, Any]:
        """One line of the output (``error`` None) or error file."""
        row: dict[str, Any] = {
            "id": f"batch_req_{inv}",
            "custom_id": line.custom_id,
            "response": None,
            "error": None,
        }
        if state is None:  # the batch was cancelled before this line was accepted
            row["error"] = {
                "code": "batch_cancelled",
                "message": "The batch was cancelled before this request ran.",
            }
            return row
        view = self.core.result(tenant, inv)
        if view is None:
            row["error"] = {"code": "server_error", "message": f"Invocation {inv} has no result."}
            return row
        request = check_request(kind, line.body)
        try:
            body = self.gateway.reply_to(tenant, request, view)
        except Exception as exc:
            status, err, _headers = error_body(exc)
            row["response"] = {"status_code": status, "request_id": inv, "body": err}
            row["error"] = {
                "code": err["error"]["code"] or err["error"]["type"],
                "message": err["error"]["message"],
            }
            return row
        row["response"] = {"status_code": 200, "request_id": inv, "body": body}
        return row
