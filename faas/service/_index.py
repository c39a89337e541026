"""The service's local index of invocations (SQLite, write-ahead log).

The object store holds the truth about each invocation (its commit-once
request and result records); the index is what makes a restart cheap and
exact: which invocations were accepted and not yet finished, in what order,
for which tenant, with the full Invocation to run again. A row is committed
before ``submit`` answers, so an accepted invocation survives a SIGKILL of the
service; a result is committed here (the row's final state and its result
record) before anyone is told, and copied to the store's commit-once record
afterwards (WAL with ``synchronous=NORMAL`` is durable against a process crash;
an OS crash may lose the last transactions, which the client then sees as
unknown ids).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from faas._usage import UsageRow
from runtime import Invocation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    batch TEXT,
    function_name TEXT NOT NULL,
    function_digest TEXT NOT NULL,
    model TEXT,
    state TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    finished_at REAL,
    payload TEXT NOT NULL,
    result TEXT,
    recorded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS by_tenant ON invocations (tenant, submitted_at);
CREATE INDEX IF NOT EXISTS by_state ON invocations (state);
CREATE INDEX IF NOT EXISTS by_batch ON invocations (batch);
CREATE INDEX IF NOT EXISTS by_recorded ON invocations (recorded) WHERE recorded = 0;
CREATE TABLE IF NOT EXISTS usage (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    finished_at REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    engine_share_seconds REAL NOT NULL,
    row TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, finished_at);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (finished_at);
"""

_UsageRows = list[UsageRow]  # the class's own ``list`` method shadows the builtin in its body
_Buckets = list[tuple[str, float, int]]
_Recent = list[tuple["Row", UsageRow | None]]


@dataclass(frozen=True)
class Row:
    """One indexed invocation."""

    id: str
    tenant: str
    batch: str | None
    function_name: str
    function_digest: str
    model: str | None
    state: str
    submitted_at: float
    finished_at: float | None
    payload: str
    result: str | None = None
    recorded: int = 0

    def invocation(self) -> Invocation:
        """The Invocation as accepted."""
        return Invocation.model_validate_json(self.payload)


class Index:
    """Thread-safe SQLite index of accepted invocations.

    Args:
        path: The database file; its directory is created.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def add(self, tenant: str, invocations: list[Invocation], batch: str | None = None) -> None:
        """Record accepted invocations (one transaction)."""
        rows = [
            (
                inv.id,
                tenant,
                batch,
                inv.function_name,
                inv.function_digest,
                inv.model,
                "queued",
                inv.submitted_at,
                inv.model_dump_json(),
            )
            for inv in invocations
        ]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO invocations (id, tenant, batch, function_name, function_digest, model, "
                    "state, submitted_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def finish_many(
        self, items: list[tuple[str, str, str]], usage: list[UsageRow | None] | None = None
    ) -> list[bool]:
        """Commit final results ``(id, state, result record JSON)`` in one transaction.

        This is the commit point of a result: the first final state of an id
        wins, later ones change nothing. A winner's usage row (``usage``, one
        entry per item) is committed with it. Returns, per item, whether it won.
        """
        now = time.time()
        won = []
        rows = usage if usage is not None else [None] * len(items)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for (invocation_id, state, result), row in zip(items, rows, strict=True):
                    cur = self._db.execute(
                        "UPDATE invocations SET state = ?, finished_at = ?, result = ? "
                        "WHERE id = ? AND state IN ('queued', 'running')",
                        (state, now, result, invocation_id),
                    )
                    won.append(cur.rowcount == 1)
                    if cur.rowcount == 1 and row is not None:
                        self._db.execute(
                            "INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                row.invocation_id, row.tenant, row.finished_at, row.prompt_tokens,
                                row.cached_tokens, row.completion_tokens, row.engine_share_seconds,
                                row.model_dump_json(),
                            ),
                        )  # fmt: skip
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return won

    def mark_recorded(self, invocation_ids: list[str]) -> None:
        """The store holds these results' records now: drop the local copies (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN")  # autocommit would make each row its own transaction
            try:
                self._db.executemany(
                    "UPDATE invocations SET recorded = 1, result = NULL WHERE id = ?",
                    [(i,) for i in invocation_ids],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def unrecorded(self) -> list[Row]:
        """Finished invocations whose result record is not in the store yet."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE recorded = 0 AND result IS NOT NULL ORDER BY rowid"
            )
            return [Row(*r) for r in cur.fetchall()]

    def get(self, invocation_id: str) -> Row | None:
        """The row of one invocation, or None."""
        with self._lock:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM invocations WHERE id = ?", (invocation_id,))
            found = cur.fetchone()
        return Row(*found) if found else None

    def batch(self, batch_id: str) -> list[Row]:
        """The rows of one batch, in submission order."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE batch = ? ORDER BY rowid", (batch_id,)
            )
            return [Row(*r) for r in cur.fetchall()]

    def unfinished(self) -> Iterator[Row]:
        """Every accepted invocation without a final state, oldest first."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE state IN ('queued', 'running') ORDER BY rowid"
            )
            rows = [Row(*r) for r in cur.fetchall()]
        yield from rows

    def list(self, tenant: str, limit: int = 100, state: str | None = None) -> list[Row]:
        """A tenant's invocations, newest first."""
        query = f"SELECT {_COLUMNS} FROM invocations WHERE tenant = ?"
        args: tuple[object, ...] = (tenant,)
        if state is not None:
            query += " AND state = ?"
            args = (*args, state)
        with self._lock:
            cur = self._db.execute(query + " ORDER BY rowid DESC LIMIT ?", (*args, limit))
            return [Row(*r) for r in cur.fetchall()]

    def recent(self, limit: int) -> _Recent:
        """The newest ``limit`` invocations of every tenant, newest first, with their usage rows.

        Reads only those rows (newest ``rowid`` first, the table's own order), not the index's
        whole history; payloads and results are left out.
        """
        with self._lock:
            cur = self._db.execute(
                "SELECT i.id, i.tenant, i.batch, i.function_name, i.function_digest, i.model, i.state, "
                "i.submitted_at, i.finished_at, '', NULL, i.recorded, u.row FROM "
                "(SELECT rowid AS rid, id, tenant, batch, function_name, function_digest, model, state, "
                "submitted_at, finished_at, recorded FROM invocations ORDER BY rowid DESC LIMIT ?) AS i "
                "LEFT JOIN usage AS u ON u.id = i.id ORDER BY i.rid DESC",
                (limit,),
            )
            found = cur.fetchall()
        return [(Row(*r[:12]), UsageRow.model_validate_json(r[12]) if r[12] else None) for r in found]

    def usage_since(self, since: float) -> dict[str, tuple[int, int, float]]:
        """Per tenant, since ``since``: finished invocations, tokens (prompt + completion), engine share."""
        with self._lock:
            cur = self._db.execute(
                "SELECT tenant, COUNT(*), SUM(prompt_tokens + completion_tokens), SUM(engine_share_seconds) "
                "FROM usage WHERE finished_at >= ? GROUP BY tenant",
                (since,),
            )
            return {t: (int(n), int(k or 0), float(e or 0.0)) for t, n, k, e in cur.fetchall()}

    def usage(
        self,
        tenant: str | None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> _UsageRows:
        """A tenant's (None: every tenant's) usage rows that finished in ``[since, until)``, newest first."""
        query = "SELECT row FROM usage WHERE finished_at >= ? AND finished_at < ?"
        end = until if until is not None else float("inf")
        args: tuple[object, ...] = (since if since is not None else 0.0, end)
        if tenant is not None:
            query, args = query + " AND tenant = ?", (*args, tenant)
        query += " ORDER BY finished_at DESC"
        if limit is not None:
            query, args = query + " LIMIT ?", (*args, limit)
        with self._lock:
            cur = self._db.execute(query, args)
            return [UsageRow.model_validate_json(r[0]) for r in cur.fetchall()]

    def usage_totals(self) -> dict[str, tuple[int, int, int, float]]:
        """Per tenant, the sums of its usage rows: prompt, cached, completion tokens, engine share seconds."""
        with self._lock:
            cur = self._db.execute(
                "SELECT tenant, SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
                "SUM(engine_share_seconds) FROM usage GROUP BY tenant"
            )
            return {t: (int(p), int(c), int(n), float(e)) for t, p, c, n, e in cur.fetchall()}

    def usage_buckets(self, since: float, bucket: float) -> _Buckets:
        """Tokens (prompt + completion) per tenant and ``bucket``-second slot since ``since``."""
        with self._lock:
            cur = self._db.execute(
                "SELECT tenant, CAST(finished_at / ? AS INTEGER), SUM(prompt_tokens + completion_tokens) "
                "FROM usage WHERE finished_at >= ? GROUP BY 1, 2",
                (bucket, since),
            )
            return [(t, float(slot) * bucket, int(n)) for t, slot, n in cur.fetchall()]


_COLUMNS = (
    "id, tenant, batch, function_name, function_digest, model, state, submitted_at, finished_at, payload, "
    "result, recorded"
)
