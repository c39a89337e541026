"""Reads for the S3 backend: parallel ranged GETs straight into the caller's memory, hashed in order.

A read asks for the first ``range_size`` bytes; the answer's ``Content-Range``
tells the object's size. The other ranges are requested at once, in parallel
(``max_concurrency`` threads), each pinned to the first answer's ETag with
``If-Match`` so every byte comes from one version of the object. No HEAD
request, and the digest is computed in the same pass:

- every range is received straight into its place in the destination (the
  socket's ``recv_into`` writes it there: no intermediate ``bytes``, no copy);
- the object is hashed in order as it arrives, by whichever receiving thread
  finds bytes contiguous with those hashed so far, so when the last byte
  lands only the last piece is left to hash.

The destination is one or more buffers laid end to end: a fresh NumPy buffer
(:func:`fetch_buffer`), a fresh ``bytes`` object (:func:`fetch_bytes`), or the
caller's own memory (:func:`fetch_into`, e.g. a preallocated array and a small
buffer for the pickle stream after it).

A range that breaks off is retried from the first byte it has not delivered.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import ctypes
import hashlib
import http.client
import io
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import botocore.exceptions as bce

from runtime._errors import StoreError
from runtime._s3_errors import _PRECONDITION_CODES, _code, _status
from runtime._store import new_buffer

if TYPE_CHECKING:
    from runtime._s3 import S3Store

MiB = 1 << 20
_PIECE = MiB  # bytes received at a time (the hashing thread follows at this grain)


def _total_size(resp: dict[str, Any]) -> int:
    content_range = resp.get("ContentRange")
    if content_range:  # "bytes 0-1048575/73400320"
        return int(str(content_range).rsplit("/", 1)[1])
    return int(resp.get("ContentLength") or 0)  # the server ignored Range and sent everything


def _raw_response(body: Any) -> Any:
    """The ``http.client`` response under a botocore body, if the stack is the usual one (else None).

    botocore and urllib3 offer only ``read()``, which allocates a ``bytes`` per
    call that then has to be copied into place; ``http.client``'s
    ``readinto`` lets the socket write into the destination itself.
    """
    pooled = getattr(body, "_raw_stream", None)  # urllib3's HTTPResponse (botocore asks it not to decode)
    raw = getattr(pooled, "_fp", None)
    return raw if isinstance(raw, http.client.HTTPResponse) else None


def _readinto(body: Any, raw: Any, view: memoryview) -> int:
    """Receive up to ``len(view)`` bytes of ``body`` into ``view``; 0 means the body ended early."""
    try:
        if raw is not None:
            return int(raw.readinto(view) or 0)
        data = body.read(len(view))
    except (OSError, http.client.HTTPException) as exc:  # a dropped or timed-out connection
        raise bce.IncompleteReadError(actual_bytes=0, expected_bytes=len(view)) from exc
    view[: len(data)] = data
    return len(data)


def _release(body: Any, raw: Any) -> None:
    """Hand a fully read connection back to urllib3's pool (what its own ``read()`` does at the end)."""
    pooled: Any = getattr(body, "_raw_stream", None)
    if raw is not None and raw.isclosed() and hasattr(pooled, "release_conn"):
        pooled.release_conn()


_MAX_RANGE = 64 * MiB


def range_size(total: int, smallest: int, concurrency: int) -> int:
    """Bytes per ranged GET for an object of ``total`` bytes: two ranges per thread, within limits.

    At least ``smallest`` (the store's ``range_size``), at most 64 MiB: fewer
    requests cost less on both ends, while enough of them keep every thread
    busy and the in-order hashing close behind the download.
    """
    per_thread = -(-total // (2 * concurrency))
    return max(smallest, min(-(-per_thread // MiB) * MiB, _MAX_RANGE))


@dataclass
class _Range:
    start: int
    end: int
    pos: int  # the next byte not yet delivered
    body: Any = None  # an answer already requested for it


class _Destination:
    """Buffers laid end to end that together hold the object (views of the caller's memory)."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
        self.starts: list[int] = []
        total = 0
        for view in self.views:
            self.starts.append(total)
            total += view.nbytes
        self.size = total

    def slice(self, start: int, end: int) -> memoryview:
        """The longest view of bytes ``start`` up to at most ``end`` that lies in one buffer."""
        i = bisect.bisect_right(self.starts, start) - 1
        while self.views[i].nbytes == 0:  # empty buffers own no bytes
            i += 1
        offset = start - self.starts[i]
        return self.views[i][offset : min(end - self.starts[i], self.views[i].nbytes)]


class _Read:
    """One read of one object: its first answer, its ranges, and how to (re)request them."""

    def __init__(self, store: S3Store, key: str, first: int | None = None) -> None:
        self.store, self.key = store, key
        self.full = store._full(key)
        chunk = int(store._options["range_size"])
        head = max(1, min(chunk, first or chunk))

        def first_request() -> Any:
            try:
                return store.client.get_object(
                    Bucket=store.bucket, Key=self.full, Range=f"bytes=0-{head - 1}"
                )
            except bce.ClientError as exc:
                if _code(exc) != "InvalidRange":
                    raise
                return store.client.get_object(Bucket=store.bucket, Key=self.full)  # empty: no byte 0

        resp = store._run("read", key, first_request)
        self.total = _total_size(resp)
        self.etag = str(resp.get("ETag", ""))
        self.recorded: str | None = resp.get("Metadata", {}).get("sha256")
        # A server that ignored the Range header is sending everything: take it all from this answer.
        first_end = min(head, self.total) if resp.get("ContentRange") else self.total
        self.ranges = [_Range(0, first_end, 0, resp["Body"])]
        chunk = range_size(self.total, chunk, int(store._options["max_concurrency"]))
        starts = list(range(first_end, self.total, chunk))
        if len(starts) > 1 and self.total - starts[-1] < chunk // 4:
            starts.pop()  # a short tail (a pickle stream after an array) joins the range before it
        ends = [*starts[1:], self.total] if starts else []
        self.ranges += [_Range(s, e, s) for s, e in zip(starts, ends, strict=True)]

    def _request(self, rng: _Range) -> Any:
        extra = {"IfMatch": self.etag} if self.etag else {}
        try:
            resp = self.store.client.get_object(
                Bucket=self.store.bucket, Key=self.full, Range=f"bytes={rng.pos}-{rng.end - 1}", **extra
            )
        except bce.ClientError as exc:
            if _code(exc) not in _PRECONDITION_CODES and _status(exc) != 412:
                raise
            raise StoreError(
                f"The object under {self.store._where(self.key)} changed while it was being read "
                f"(its ETag is no longer {self.etag}); read it again."
            ) from exc
        if _total_size(resp) != self.total or int(resp.get("ContentLength", -1)) != rng.end - rng.pos:
            where = self.store._where(self.key)
            raise StoreError(f"The server answered a range of {where} with the wrong size.")
        return resp["Body"]

    def stream(self, rng: _Range, dest: _Destination, hashing: _InOrder) -> None:
        """Receive ``rng`` into its place in ``dest``; a broken-off range is asked for again from ``pos``."""

        def attempt() -> None:
            body, rng.body = rng.body, None
            with contextlib.closing(body if body is not None else self._request(rng)) as stream:
                raw = _raw_response(stream)
                while rng.pos < rng.end:
                    n = _readinto(stream, raw, dest.slice(rng.pos, min(rng.end, rng.pos + _PIECE)))
                    if not n:
                        raise bce.IncompleteReadError(actual_bytes=rng.pos, expected_bytes=rng.end)
                    rng.pos += n
                    hashing.advance()
                _release(stream, raw)

        self.store._run("read", self.key, attempt)

    def verify(self, digest: str, expected: str | None) -> None:
        self.store._check_digest(self.key, digest, self.recorded)
        self.store._check_digest(self.key, digest, expected, what="the reference to it records")

    def receive(self, dest: _Destination, expected: str | None) -> None:
        """Fetch every range into ``dest`` in parallel, hash the bytes in order, and verify them."""
        hashing = _InOrder(self.ranges, dest)
        if len(self.ranges) == 1:
            self.stream(self.ranges[0], dest, hashing)
        else:
            pool = self.store._executor()
            futures = [pool.submit(self.stream, rng, dest, hashing) for rng in self.ranges]
            try:
                for future in futures:
                    future.result()
            finally:
                _finish(futures)
        self.verify(hashing.finish(), expected)


class _InOrder:
    """The sha256 of an object arriving in parallel ranges, advanced by whichever thread can.

    After each piece a receiving thread hashes whatever has become contiguous
    from the start, unless another thread is already at it. The hashing thus
    keeps pace with the download, and gets the CPU share of every receiving
    thread rather than of one waiting thread among many (which, on a busy
    machine, left most of the hashing until after the last byte).
    """

    def __init__(self, ranges: list[_Range], dest: _Destination) -> None:
        self.ranges, self.dest = ranges, dest
        self.lock = threading.Lock()
        self.hasher = hashlib.sha256()
        self.index = 0  # the first range not yet hashed to its end
        self.done = 0  # bytes hashed

    def advance(self, wait: bool = False) -> None:
        if not self.lock.acquire(blocking=wait):
            return  # another thread is hashing; it looks again before it stops
        try:
            while self.index < len(self.ranges):
                rng = self.ranges[self.index]
                ready = rng.pos  # only ever grows
                if ready > self.done:
                    _hash(self.hasher, self.dest, self.done, ready)
                    self.done = ready
                    continue
                if self.done < rng.end:
                    return
                self.index += 1
        finally:
            self.lock.release()

    def finish(self) -> str:
        self.advance(wait=True)
        if self.index < len(self.ranges):
            raise StoreError("A range ended before its last byte.")  # unreachable: stream() checks
        return self.hasher.hexdigest()


def _hash(hasher: Any, dest: _Destination, start: int, end: int) -> None:
    while start < end:
        view = dest.slice(start, end)
        hasher.update(view)
        start += view.nbytes


def _finish(futures: list[concurrent.futures.Future[None]]) -> None:
    for future in futures:
        future.cancel()
    concurrent.futures.wait(futures)  # nothing may touch the output after we return


_BYTES_DATA = bytes.__basicsize__ - 1  # where a bytes object's data starts (CPython)


def _new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new, not yet shared ``bytes`` object of ``size`` bytes and a writable view of its data.

    Every ``bytes`` is immutable once anyone else sees it; this one is filled
    before it is returned, exactly as CPython's own readers fill theirs. It
    spares the copy from a staging buffer (or the zero fill of a BytesIO).
    """
    if sys.implementation.name != "cpython" or not size:
        raise NotImplementedError
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    obj = new(None, size)
    array = (ctypes.c_char * size).from_address(id(obj) + _BYTES_DATA)
    return obj, memoryview(array).cast("B")


def fetch_bytes(store: S3Store, key: str, expected: str | None) -> bytes:
    """Download ``key`` as ``bytes``, verified against its recorded sha256 and ``expected``.

    Raises:
        ObjectNotFound: No object under ``key``.
        IntegrityError: The bytes do not match a digest.
        StoreError: The read failed, or the object changed while being read.
    """
    read = _Read(store, key)
    try:
        obj, view = _new_bytes(read.total)
    except NotImplementedError:
        buffer = bytearray(read.total)
        read.receive(_Destination([memoryview(buffer)]), expected)
        return bytes(buffer)
    with view:
        read.receive(_Destination([view]), expected)
    return obj


def fetch_buffer(store: S3Store, key: str, expected: str | None) -> memoryview:
    """Download ``key`` into a fresh writable buffer, verified as in :func:`fetch_bytes`."""
    read = _Read(store, key)
    view = new_buffer(read.total)
    read.receive(_Destination([view]), expected)
    return view


def fetch_into(
    store: S3Store,
    key: str,
    expected: str | None,
    layout: Callable[[int], Sequence[memoryview]],
    first: int | None = None,
) -> None:
    """Download ``key`` into the caller's buffers, verified as in :func:`fetch_bytes`.

    Args:
        store: The store.
        key: Object key.
        expected: A digest the bytes must match.
        layout: Given the object's size, the writable buffers that hold it, end
            to end; it raises (before any byte is received) if the size is wrong.
        first: Size of the first buffer, so the first request does not run past it.
    """
    read = _Read(store, key, first)
    try:
        dest = _Destination(layout(read.total))
        if dest.size != read.total:
            raise StoreError(f"The buffers for {store._where(key)} hold {dest.size} bytes, not {read.total}.")
    except BaseException:
        read.ranges[0].body.close()  # nothing is received into buffers that do not fit
        raise
    read.receive(dest, expected)


class VerifyingBody(io.RawIOBase):
    """A raw reader over a GetObject body that checks the sha256 at end of file."""

    def __init__(self, store: S3Store, key: str, body: Any, expected: str | None) -> None:
        super().__init__()
        self._store, self._key, self._body, self._expected = store, key, body, expected
        self._hasher = hashlib.sha256()
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._store._translate(exc, "read", self._key, 1) from exc
        view[: len(data)] = data
        if data:
            self._hasher.update(data)
        elif len(view) and not self._verified:
            self._store._check_digest(self._key, self._hasher.hexdigest(), self._expected)
            self._verified = True  # on a mismatch every read at EOF raises again
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
