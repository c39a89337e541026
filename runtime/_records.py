"""Invocation records: every request and result, as JSON in the object store.

Layout under the store::

    invocations/<id>/request.json   RequestRecord, written commit-once at submit
    invocations/<id>/result.json    ResultRecord, written commit-once when the result arrives

Both are commit-once, so a retried or duplicated invocation cannot produce two
results: the second write is refused and reported (``write_result`` returns
False). Large values never appear inline: a value above the staging threshold
is recorded as the :class:`StagedRef` of its object, and arguments list every
staged object they refer to.

:class:`RecordWriter` writes records on a background thread, in order, so the
store's latency (an fsync, an S3 round trip) stays off the invocation's path.
It never drops a record: a failed write is retried until it succeeds or the
writer is closed, and ``flush()`` reports what could not be written.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from runtime._errors import IntegrityError, ObjectExists, ObjectNotFound, StoreError
from runtime._staging import StagedRef, is_marker, parse_marker
from runtime._store import ObjectStore
from runtime._wire import ErrorInfo, Invocation, Result

log = logging.getLogger("faas.records")

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
_B64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class ValueRecord(BaseModel):
    """A value as recorded: inline when small, else the reference to its staged object.

    Attributes:
        size: Bytes on the wire (the inline bytes, or the marker).
        inline: The serialised value, when it traveled inline (base64 in JSON).
        ref: The staged object holding the whole value, when it was staged.
        refs: Staged objects the value refers to (large arguments staged on
            their own, and ``faas.put`` references passed in).
    """

    model_config = _B64

    size: int
    inline: bytes | None = None
    ref: StagedRef | None = None
    refs: tuple[StagedRef, ...] = ()

    @classmethod
    def from_wire(cls, data: bytes, refs: tuple[StagedRef, ...] = ()) -> ValueRecord:
        """Describe wire bytes (inline value or marker)."""
        if is_marker(data):
            return cls(size=len(data), ref=parse_marker(data), refs=refs)
        return cls(size=len(data), inline=data, refs=refs)

    def to_wire(self) -> bytes:
        """The wire bytes again (what ``runtime.unstage_value`` reads)."""
        if self.ref is not None:
            from runtime._staging import marker

            return marker(self.ref)
        return self.inline or b""

    @property
    def staged_bytes(self) -> int:
        """Total size of the staged objects this value refers to."""
        return (self.ref.size if self.ref else 0) + sum(r.size for r in self.refs)


class RequestRecord(BaseModel):
    """What was asked: ``invocations/<id>/request.json``."""

    model_config = _B64

    id: str
    function_name: str
    function_digest: str
    model: str | None = None
    timeout: float | None = None
    retries: int = 0
    submitted_at: float
    args: ValueRecord

    @classmethod
    def of(cls, invocation: Invocation) -> RequestRecord:
        """The record of an invocation as submitted."""
        return cls(
            id=invocation.id,
            function_name=invocation.function_name,
            function_digest=invocation.function_digest,
            model=invocation.model,
            timeout=invocation.timeout,
            retries=invocation.retries,
            submitted_at=invocation.submitted_at,
            args=ValueRecord.from_wire(invocation.args, invocation.refs),
        )


class ResultRecord(BaseModel):
    """What came back: ``invocations/<id>/result.json``."""

    model_config = _B64

    invocation_id: str
    status: Status
    value: ValueRecord | None = None
    error: ErrorInfo | None = None
    attempt: int = 0
    worker_pid: int = 0
    worker_host: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    recorded_at: float = 0.0
    provenance: dict[str, Any] | None = None  # a runtime._provenance.ProvenanceRecord
    logs: str = ""  # captured stdout and stderr

    @classmethod
    def of(cls, result: Result) -> ResultRecord:
        """The record of a final Result."""
        if result.error is None:
            status: Status = "succeeded"
        else:
            status = "cancelled" if result.error.kind == "cancelled" else "failed"
        return cls(
            invocation_id=result.invocation_id,
            status=status,
            value=None if result.value is None else ValueRecord.from_wire(result.value),
            error=result.error,
            attempt=result.attempt,
            worker_pid=result.worker_pid,
            worker_host=result.worker_host,
            started_at=result.started_at,
            finished_at=result.finished_at,
            recorded_at=time.time(),
            provenance=result.provenance,
            logs=result.logs,
        )

    def to_result(self) -> Result:
        """The Result this record keeps (its value as it travels: inline bytes or a staging marker)."""
        return Result(
            invocation_id=self.invocation_id,
            value=None if self.value is None else self.value.to_wire(),
            error=self.error,
            attempt=self.attempt,
            worker_pid=self.worker_pid,
            worker_host=self.worker_host,
            started_at=self.started_at,
            finished_at=self.finished_at,
            provenance=self.provenance,
            logs=self.logs,
        )


class InvocationRecord(BaseModel):
    """Everything known about one invocation: its request merged with its result, if any.

    Attributes:
        status: ``queued`` until a result is recorded, then ``succeeded``,
            ``failed`` or ``cancelled``.
        logs: What the function wrote to stdout and stderr (empty until the result).
    """

    model_config = _B64

    id: str
    status: Status
    function_name: str = ""
    function_digest: str = ""
    model: str | None = None
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    attempt: int = 0
    args: ValueRecord | None = None
    result: ValueRecord | None = None
    error: ErrorInfo | None = None
    worker_pid: int = 0
    worker_host: str = ""
    logs: str = ""


class RecordStore:
    """Reads and writes invocation records in an ObjectStore.

    Args:
        store: The store (the same one that holds functions and staged values).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def key(invocation_id: str, part: Literal["request", "result"]) -> str:
        """The store key of one part of an invocation's record."""
        return f"invocations/{invocation_id}/{part}.json"

    def write_request(self, invocation: Invocation) -> bool:
        """Record a submitted invocation; False if its id was recorded before."""
        return self._commit(self.key(invocation.id, "request"), RequestRecord.of(invocation))

    def write_result(self, result: Result) -> bool:
        """Record an invocation's final result; False (and nothing written) if one exists."""
        return self._commit(self.key(result.invocation_id, "result"), ResultRecord.of(result))

    def write_result_record(self, record: ResultRecord) -> bool:
        """Record an already built ResultRecord; False (and nothing written) if one exists."""
        return self._commit(self.key(record.invocation_id, "result"), record)

    def write_many(self, entries: Sequence[tuple[str, BaseModel | bytes]]) -> list[bool]:
        """Commit-once writes of several records (or raw objects) at once; a flag per entry as ``_commit``.

        A store that groups writes (``put_many``: the local filesystem) makes them
        durable with one flush to disk; any other store gets them one by one.
        """
        put_many = getattr(self.store, "put_many", None)
        if put_many is None or len(entries) < 2:
            return [self._commit_any(key, value) for key, value in entries]
        data = [
            (k, v if isinstance(v, bytes) else v.model_dump_json(exclude_none=True).encode())
            for k, v in entries
        ]
        fresh: list[bool] = put_many(data, if_absent=True)
        # One already there: a record is checked whole (else replaced) as in _commit; raw objects are kept.
        return [
            new or (not isinstance(v, bytes) and self._commit(k, v))
            for (k, v), new in zip(entries, fresh, strict=True)
        ]

    def _commit_any(self, key: str, value: BaseModel | bytes) -> bool:
        if not isinstance(value, bytes):
            return self._commit(key, value)
        try:
            self.store.put(key, value, if_absent=True)
        except ObjectExists:
            return False
        return True

    def _commit(self, key: str, record: BaseModel) -> bool:
        data = record.model_dump_json(exclude_none=True).encode()
        try:
            self.store.put(key, data, if_absent=True)
        except ObjectExists:
            if self._whole(key, type(record)):
                return False
            # A writer killed mid-PUT can leave a torn object (SeaweedFS keeps a body cut short by a
            # dropped connection). It is no one's record, and keeping it would lose ours.
            log.warning("The record under %s is torn (cut short or altered); writing it again.", key)
            self.store.delete(key)
            try:
                self.store.put(key, data, if_absent=True)
            except ObjectExists:  # another writer replaced it first
                return False
        return True

    def _whole(self, key: str, model: type[BaseModel]) -> bool:
        """Whether the object under ``key`` is a readable record (it matches its digest and parses)."""
        try:
            model.model_validate_json(self.store.get(key))
        except (ObjectNotFound, IntegrityError, ValidationError):  # gone meanwhile, or torn
            return False
        return True

    def request(self, invocation_id: str) -> RequestRecord | None:
        """The request record, or None."""
        try:
            return RequestRecord.model_validate_json(self.store.get(self.key(invocation_id, "request")))
        except ObjectNotFound:
            return None

    def result(self, invocation_id: str) -> ResultRecord | None:
        """The result record, or None while there is none."""
        try:
            return ResultRecord.model_validate_json(self.store.get(self.key(invocation_id, "result")))
        except ObjectNotFound:
            return None

    def get(self, invocation_id: str) -> InvocationRecord:
        """The merged record of an invocation.

        Raises:
            ObjectNotFound: Nothing is recorded under that id.
        """
        request, result = self.request(invocation_id), self.result(invocation_id)
        if request is None and result is None:
            raise ObjectNotFound(f"No invocation {invocation_id!r} is recorded in {self.store.url()}.")
        record = InvocationRecord(id=invocation_id, status="queued")
        if request is not None:
            record = record.model_copy(
                update={
                    "function_name": request.function_name,
                    "function_digest": request.function_digest,
                    "model": request.model,
                    "submitted_at": request.submitted_at,
                    "args": request.args,
                }
            )
        if result is not None:
            record = record.model_copy(
                update={
                    "status": result.status,
                    "result": result.value,
                    "error": result.error,
                    "attempt": result.attempt,
                    "started_at": result.started_at,
                    "finished_at": result.finished_at,
                    "worker_pid": result.worker_pid,
                    "worker_host": result.worker_host,
                    "logs": result.logs,
                }
            )
        return record


_Item = Invocation | Result | tuple[str, bytes]


class RecordWriter:
    """Writes records on background threads, never dropping one.

    Records of one invocation go to the same thread, so its request is written
    before its result; different invocations are written in parallel (an fsync
    or an S3 round trip mostly waits). At most ``max_pending`` records wait:
    beyond that, queuing one blocks until the store catches up.

    Args:
        records: Where to write.
        threads: Writer threads.
        max_pending: Records queued before producers wait.
        retry_delay: First pause after a failed write; doubles up to 10 s.
        group: Most records a thread writes at once: what queued while it
            wrote the last group goes out together, with one flush to disk on a
            store that groups writes (group commit; a retry rewrites the whole
            group, and commit-once keeps what was already written).
        linger: Seconds a thread woken by a first record waits for more before
            it writes (none while ``flush`` or ``close`` waits).
    """

    def __init__(
        self,
        records: RecordStore,
        *,
        threads: int = 2,
        max_pending: int = 10_000,
        retry_delay: float = 0.2,
        group: int = 256,
        linger: float = 0.02,
    ) -> None:
        self.records = records
        self._retry_delay = retry_delay
        self._max_pending = max_pending
        self._group = group
        self._linger = linger
        self._flushers = 0  # threads in flush(): writers write at once meanwhile
        self._queues: list[collections.deque[_Item]] = [collections.deque() for _ in range(threads)]
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # flushers and back-pressured producers wait here
        # One condition per writer thread: a put wakes only the thread that will write it.
        self._ready = [threading.Condition(lock) for _ in self._queues]
        self._pending = 0  # queued or being written
        self._failure: StoreError | None = None
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(q, r), name=f"faas-records-{i}", daemon=True)
            for i, (q, r) in enumerate(zip(self._queues, self._ready, strict=True))
        ]
        for thread in self._threads:
            thread.start()

    def request(self, invocation: Invocation) -> None:
        """Queue the request record of ``invocation``."""
        self._put(invocation.id, invocation)

    def result(self, result: Result) -> None:
        """Queue the result record of ``result``."""
        self._put(result.invocation_id, result)

    def _put(self, invocation_id: str, item: _Item) -> None:
        with self._cond:
            while self._pending >= self._max_pending and not self._closed:
                self._cond.wait()  # back-pressure: the store is slower than the submitters
            if self._closed:
                raise StoreError("The record writer is closed; the record was not queued.")
            n = hash(invocation_id) % len(self._queues)
            queue = self._queues[n]
            queue.append(item)
            self._pending += 1
            if len(queue) == 1 or len(queue) >= self._group or self._flushers:
                self._ready[n].notify()  # else its thread, lingering on the first, takes it too

    def put_once(self, invocation_id: str, key: str, data: bytes) -> None:
        """Queue a commit-once object of ``invocation_id`` (written after its records queued before it)."""
        self._put(invocation_id, (key, data))

    def _write(self, items: list[_Item]) -> None:
        """Write queued items together (one flush to disk where the store groups writes)."""
        entries: list[tuple[str, BaseModel | bytes]] = []
        for item in items:
            if isinstance(item, tuple):
                entries.append(item)
            elif isinstance(item, Invocation):
                entries.append((self.records.key(item.id, "request"), RequestRecord.of(item)))
            else:
                entries.append((self.records.key(item.invocation_id, "result"), ResultRecord.of(item)))
        flags = self.records.write_many(entries)
        for item, (key, _), new in zip(items, entries, flags, strict=True):
            if not new and isinstance(item, tuple):
                log.info("%s was already written; kept the first.", key)
            elif not new:
                log.warning("%s was already recorded; kept the first.", key)

    def _run(self, queue: collections.deque[_Item], ready: threading.Condition) -> None:
        delay = self._retry_delay
        while True:
            with ready:
                while not queue and not self._closed:
                    ready.wait()
                if not queue:
                    return
                # Linger a moment for more (unless flushing or closing): one wake-up and one flush to
                # disk per group, not per record.
                deadline = time.monotonic() + self._linger
                while len(queue) < self._group and not self._closed and not self._flushers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ready.wait(left)
                items = list(itertools.islice(queue, self._group))  # left queued until written
            try:
                self._write(items)
            except Exception as exc:
                failure = exc if isinstance(exc, StoreError) else StoreError(f"{type(exc).__name__}: {exc}")
                with ready:
                    self._failure = failure
                    if not self._closed:
                        ready.wait(delay)  # then retry; close() wakes us to give up sooner
                        delay = min(delay * 2, 10.0)
                        continue
                    log.error("Could not write an invocation record while closing: %s", failure)
            delay = self._retry_delay
            with self._cond:
                for _ in items:
                    queue.popleft()
                self._pending -= len(items)
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record is written.

        Raises:
            StoreError: The time ran out with records unwritten (naming the store's last error).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushers += 1  # writers stop lingering
            for ready in self._ready:
                ready.notify_all()
            try:
                while self._pending:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise StoreError(
                            f"{self._pending} invocation records are not written yet to "
                            f"{self.records.store.url()}; last error: {self._failure or 'none'}."
                        )
                    self._cond.wait(remaining)
            finally:
                self._flushers -= 1

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (retrying for up to ``timeout`` s), then stop the threads.

        Raises:
            StoreError: Some records could not be written.
        """
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                for ready in self._ready:
                    ready.notify_all()
            for thread in self._threads:
                thread.join(timeout)
