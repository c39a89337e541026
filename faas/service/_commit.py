"""Committing finished invocations: the index first (the commit point), the store record after.

Results arrive from the pool one by one; one committer thread takes whatever
has arrived, builds each result's provenance and record, and commits them all
in one SQLite transaction (group commit: one WAL write for many results). Only
then are waiting clients told. The store's commit-once result records (and
usage rows) of a batch are written afterwards as one group per tenant by a few
recorder threads (one flush to disk for the group on a local store), retried
until the store takes them; the index keeps the record until then, so a restart writes what a crash
left unwritten. The first result of an id wins everywhere: a second one (a
rerun after a crash, a late duplicate) changes neither the index nor the store.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel

from faas._usage import UsageRow, usage_key, usage_row
from faas.service._api import ResultView
from faas.service._index import Index
from faas.service._state import Pending, TenantState, view_of
from runtime import RecordStore, Result, ResultRecord, StoreError
from warmpool import ensure_provenance

log = logging.getLogger("faas.service")

Committed = Callable[[list[tuple[TenantState, Pending, ResultView, bool]]], None]
Charged = Callable[[list[UsageRow]], None]
_Recording = tuple[TenantState, ResultRecord, UsageRow | None]
_STOP = object()
_RECORD_GROUP = 256  # results that wake a recorder at once
_RECORD_LINGER = 0.02  # seconds fewer results wait for a recorder


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
        # Results waiting for their store records. A recorder takes all that waits at once: a busy
        # one needs no wake-up per batch (each wake-up of an idle thread cost as much as the batch).
        self._to_record: collections.deque[_Recording] = collections.deque()
        self._record_cond = threading.Condition()
        self._recorders_stop = False
        self._closing = threading.Event()
        self._recorders = [
            threading.Thread(target=self._record_loop, name=f"faas-record-{n}", daemon=True)
            for n in range(record_threads)
        ]
        for thread in self._recorders:
            thread.start()
        self._thread = threading.Thread(target=self._run, name="faas-commit", daemon=True)
        self._thread.start()

    def put(self, ts: TenantState, pending: Pending, result: Result) -> None:
        """Queue one final result for commit."""
        self._queue.put((ts, pending, result))

    def record_later(self, ts: TenantState, record: ResultRecord) -> None:
        """Write a result record the index already holds (after a restart)."""
        self._enqueue([(ts, record, None)])

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, stop, and give the recorders ``timeout`` seconds to finish."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._closing.set()  # recorders still failing give up; the next start writes their records
        with self._record_cond:
            self._recorders_stop = True
            self._record_cond.notify_all()
        for thread in self._recorders:
            thread.join(timeout)

    def _enqueue(self, items: list[_Recording]) -> None:
        with self._record_cond:
            was_empty = not self._to_record
            self._to_record.extend(items)
            if was_empty or len(self._to_record) >= _RECORD_GROUP:
                self._record_cond.notify()  # else the recorder lingering on the first takes them too

    def _record_loop(self) -> None:
        while True:
            with self._record_cond:
                while not self._to_record and not self._recorders_stop:
                    self._record_cond.wait()
                # Records are off the commit path (the index holds each result until its record is
                # written), so the first lingers a moment for more: waking an idle thread per
                # committed batch cost the service more CPU than writing the batch.
                deadline = time.monotonic() + _RECORD_LINGER
                while len(self._to_record) < _RECORD_GROUP and not self._recorders_stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._record_cond.wait(left)
                if not self._to_record:
                    return  # stopping, and everything was written (or given up on while closing)
                taken = [self._to_record.popleft() for _ in range(min(len(self._to_record), 1024))]
            by_tenant: dict[int, tuple[TenantState, list[tuple[ResultRecord, UsageRow | None]]]] = {}
            for ts, record, row in taken:  # one group write per tenant's store
                by_tenant.setdefault(id(ts), (ts, []))[1].append((record, row))
            for ts, items in by_tenant.values():
                try:
                    self._record(ts, items)
                except Exception:  # a bug must not cost a recorder; the index keeps these for the next start
                    log.exception("Could not record %d results of tenant %s.", len(items), ts.tenant.name)

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
        to_record: list[_Recording] = []
        for (ts, pending, _result), record, row, first in zip(batch, records, usage, won, strict=True):
            if first:
                to_record.append((ts, record, row))
                out.append((ts, pending, view_of(record), True))
                if row is not None:
                    charged.append(row)
            else:
                out.append((ts, pending, self._existing(ts, record.invocation_id), False))
        self._enqueue(to_record)
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

    def _record(self, ts: TenantState, items: list[tuple[ResultRecord, UsageRow | None]]) -> None:
        """Write the store copies of committed results (and their usage rows) as one group."""
        entries: list[tuple[str, BaseModel | bytes]] = [
            (RecordStore.key(record.invocation_id, "result"), record) for record, _ in items
        ]
        # The tenant's own copy of its ledger rows (the index has them already).
        entries += [(usage_key(row), row.model_dump_json().encode()) for _, row in items if row is not None]
        delay = 0.1
        while True:
            try:
                written = ts.records.write_many(entries)
                for (record, _), new in zip(items, written, strict=False):
                    if not new:
                        log.info("Invocation %s already had a store record; kept it.", record.invocation_id)
                self.index.mark_recorded([record.invocation_id for record, _ in items])
                return
            except StoreError as exc:
                if self._closing.is_set():
                    log.warning("%d result records left for the next start: %s", len(items), exc)
                    return
                log.warning("%d result records not written yet (%s); retrying.", len(items), exc)
            time.sleep(delay)  # the store is down; the index keeps the results meanwhile
            delay = min(delay * 2, 5.0)
