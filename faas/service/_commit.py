"""Committing finished invocations: the index first (the commit point), the store record after.

Results arrive from the pool one by one; one committer thread takes whatever
has arrived, builds each result's provenance and record, and commits them all
in one SQLite transaction (group commit: one WAL write for many results). Only
then are waiting clients told. The store's commit-once result record is
written afterwards by a few recorder threads, retried until the store takes
it; the index keeps the record until then, so a restart writes what a crash
left unwritten. The first result of an id wins everywhere: a second one (a
rerun after a crash, a late duplicate) changes neither the index nor the store.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from faas._usage import UsageRow, usage_row, write_usage
from faas.service._api import ResultView
from faas.service._index import Index
from faas.service._state import Pending, TenantState, view_of
from runtime import Result, ResultRecord, StoreError
from warmpool import ensure_provenance

log = logging.getLogger("faas.service")

Committed = Callable[[list[tuple[TenantState, Pending, ResultView, bool]]], None]
Charged = Callable[[list[UsageRow]], None]
_STOP = object()


class ResultCommitter:
    """Group-commits results to the index, then records them in the store.

    Args:
        index: The service's index.
        on_committed: Called (on the committer thread) with ``(tenant state,
            pending, view, won)`` for each committed batch; ``won`` is False
            when an earlier result of the same id had been committed.
        record_threads: Threads writing store records.
        max_batch: Most results per transaction.
        on_usage: Called (on the committer thread) with the usage rows of the
            results that won, once they are committed with them.
    """

    def __init__(
        self,
        index: Index,
        on_committed: Committed,
        *,
        record_threads: int = 4,
        max_batch: int = 512,
        on_usage: Charged | None = None,
    ) -> None:
        self.index = index
        self._on_committed = on_committed
        self._on_usage = on_usage
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._recorders = ThreadPoolExecutor(record_threads, thread_name_prefix="faas-record")
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faas-commit", daemon=True)
        self._thread.start()

    def put(self, ts: TenantState, pending: Pending, result: Result) -> None:
        """Queue one final result for commit."""
        self._queue.put((ts, pending, result))

    def record_later(self, ts: TenantState, record: ResultRecord) -> None:
        """Write a result record the index already holds (after a restart)."""
        self._recorders.submit(self._record, ts, record)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, stop, and give the recorders ``timeout`` seconds to finish."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._closing.set()  # recorders still failing give up; the next start writes their records
        self._recorders.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [] if item is _STOP else [item]
            stop = item is _STOP
            while not stop and len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                else:
                    batch.append(more)
            if batch:
                try:
                    self._commit(batch)  # type: ignore[arg-type]
                except Exception:  # the index failed: nothing was told, nothing is lost from the index
                    log.exception("Could not commit %d results to the index.", len(batch))
            if stop:
                return

    def _commit(self, batch: list[tuple[TenantState, Pending, Result]]) -> None:
        records = []
        usage: list[UsageRow | None] = []
        for ts, pending, result in batch:
            inv = pending.invocation
            # The substrate's book built it; results made here (recovery, cancelled in the queue) get it now.
            ensure_provenance(inv, pending.spec, pending.model, result)
            records.append(ResultRecord.of(result))
            try:
                usage.append(
                    usage_row(pending.invocation, pending.spec, pending.model, result, ts.tenant.name)
                )
            except Exception:  # nor must its usage row
                log.exception("Could not build the usage row of invocation %s", result.invocation_id)
                usage.append(None)
        won = self.index.finish_many(
            [(r.invocation_id, r.status, r.model_dump_json(exclude_none=True)) for r in records], usage
        )
        out = []
        charged = []
        for (ts, pending, _result), record, row, first in zip(batch, records, usage, won, strict=True):
            if first:
                self._recorders.submit(self._record, ts, record, row)
                out.append((ts, pending, view_of(record), True))
                if row is not None:
                    charged.append(row)
            else:
                out.append((ts, pending, self._existing(ts, record.invocation_id), False))
        if charged and self._on_usage is not None:
            try:
                self._on_usage(charged)
            except Exception:  # budgets and counters must not hold up the results
                log.exception("Could not charge %d usage rows.", len(charged))
        self._on_committed(out)

    def _existing(self, ts: TenantState, invocation_id: str) -> ResultView:
        row = self.index.get(invocation_id)
        if row is not None and row.result:
            return view_of(ResultRecord.model_validate_json(row.result))
        stored = ts.records.result(invocation_id)
        if stored is None:
            raise StoreError(f"Invocation {invocation_id} is finished but its result record is missing.")
        return view_of(stored)

    def _record(self, ts: TenantState, record: ResultRecord, usage: UsageRow | None = None) -> None:
        delay = 0.1
        while True:
            try:
                if not ts.records.write_result_record(record):
                    log.info("Invocation %s already had a store record; kept it.", record.invocation_id)
                if usage is not None:  # the tenant's own copy of its ledger row (the index has it already)
                    write_usage(ts.store, usage)
                self.index.mark_recorded([record.invocation_id])
                return
            except StoreError as exc:
                if self._closing.is_set():
                    log.warning("Result record of %s left for the next start: %s", record.invocation_id, exc)
                    return
                log.warning("Result record of %s not written yet (%s); retrying.", record.invocation_id, exc)
            time.sleep(delay)  # the store is down; the index keeps the result meanwhile
            delay = min(delay * 2, 5.0)
