"""Reads for the S3 backend: parallel ranged GETs, hashed in order as they arrive, and verified streams.

A read asks for the first ``range_size`` bytes; the answer's ``Content-Range``
tells the object's size. The other ranges are requested at once, in parallel
(``max_concurrency`` threads), each pinned to the first answer's ETag with
``If-Match`` so every byte comes from one version of the object. No HEAD
request, and the digest is computed in the same pass:

- :func:`fetch_bytes` streams the pieces, in order, into a growing BytesIO
  whose buffer becomes the returned ``bytes`` without a copy, hashing each
  piece on the way. (Preallocating instead would make CPython zero-fill the
  whole buffer first, holding the GIL: ~60 ms per 64 MiB of serial page
  faults on a small VM.)
- :func:`fetch_buffer` reads every range straight into its place in one NumPy
  buffer (not zero-filled, and backed by huge pages where the kernel grants
  them), while the calling thread hashes each range once the ones before it
  have arrived.

A range that breaks off is retried from the first byte it has not delivered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import botocore.exceptions as bce

from runtime._errors import StoreError
from runtime._s3_errors import _PRECONDITION_CODES, _code, _status
from runtime._store import new_buffer

if TYPE_CHECKING:
    from runtime._s3 import S3Store

MiB = 1 << 20
_PIECE = MiB  # bytes read from a response body at a time


def _total_size(resp: dict[str, Any]) -> int:
    content_range = resp.get("ContentRange")
    if content_range:  # "bytes 0-1048575/73400320"
        return int(str(content_range).rsplit("/", 1)[1])
    return int(resp.get("ContentLength") or 0)  # the server ignored Range and sent everything


@dataclass
class _Range:
    start: int
    end: int
    pos: int  # the next byte not yet delivered
    body: Any = None  # an answer already requested for it


class _Read:
    """One read of one object: its first answer, its ranges, and how to (re)request them."""

    def __init__(self, store: S3Store, key: str) -> None:
        self.store, self.key = store, key
        self.full = store._full(key)
        chunk = int(store._options["range_size"])

        def first() -> Any:
            try:
                first_range = f"bytes=0-{chunk - 1}"
                return store.client.get_object(Bucket=store.bucket, Key=self.full, Range=first_range)
            except bce.ClientError as exc:
                if _code(exc) != "InvalidRange":
                    raise
                return store.client.get_object(Bucket=store.bucket, Key=self.full)  # empty: no byte 0

        resp = store._run("read", key, first)
        self.total = _total_size(resp)
        self.etag = str(resp.get("ETag", ""))
        self.recorded: str | None = resp.get("Metadata", {}).get("sha256")
        # A server that ignored the Range header is sending everything: take it all from this answer.
        first_end = min(chunk, self.total) if resp.get("ContentRange") else self.total
        self.ranges = [_Range(0, first_end, 0, resp["Body"])]
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

    def stream(
        self, rng: _Range, emit: Callable[[int, bytes], None] | None, into: memoryview | None = None
    ) -> None:
        """Deliver ``rng`` piece by piece to ``emit(offset, data)``, or into ``into[offset:]``.

        A broken-off range is asked for again from the first byte not delivered.
        """

        def attempt() -> None:
            body, rng.body = rng.body, None
            with contextlib.closing(body if body is not None else self._request(rng)) as stream:
                while rng.pos < rng.end:
                    data = stream.read(min(_PIECE, rng.end - rng.pos))
                    if not data:
                        raise bce.IncompleteReadError(actual_bytes=rng.pos, expected_bytes=rng.end)
                    if into is not None:
                        into[rng.pos : rng.pos + len(data)] = data
                    elif emit is not None:
                        emit(rng.pos, data)
                    rng.pos += len(data)

        self.store._run("read", self.key, attempt)

    def verify(self, digest: str, expected: str | None) -> None:
        self.store._check_digest(self.key, digest, self.recorded)
        self.store._check_digest(self.key, digest, expected, what="the reference to it records")


def _finish(futures: list[concurrent.futures.Future[None]]) -> None:
    for future in futures:
        future.cancel()
    concurrent.futures.wait(futures)  # nothing may touch the output after we return


def fetch_bytes(store: S3Store, key: str, expected: str | None) -> bytes:
    """Download ``key`` as ``bytes``, verified against its recorded sha256 and ``expected``.

    Raises:
        ObjectNotFound: No object under ``key``.
        IntegrityError: The bytes do not match a digest.
        StoreError: The read failed, or the object changed while being read.
    """
    read = _Read(store, key)
    out, hasher = io.BytesIO(), hashlib.sha256()

    def take(_: int, data: bytes) -> None:
        hasher.update(data)
        out.write(data)

    if len(read.ranges) == 1:
        read.stream(read.ranges[0], take)
    else:
        queues: list[queue.SimpleQueue[bytes | None]] = [queue.SimpleQueue() for _ in read.ranges]

        def produce(i: int) -> None:
            try:
                read.stream(read.ranges[i], lambda _, data: queues[i].put(data))
            finally:
                queues[i].put(None)  # done, or failed: the future says which

        pool = store._executor()
        futures = [pool.submit(produce, i) for i in range(len(read.ranges))]
        try:
            for i, q in enumerate(queues):
                while (data := q.get()) is not None:
                    take(0, data)
                futures[i].result()  # raises if the range failed
        finally:
            _finish(futures)
    read.verify(hasher.hexdigest(), expected)
    return out.getvalue()  # BytesIO hands over its buffer: no copy


def fetch_buffer(store: S3Store, key: str, expected: str | None) -> memoryview:
    """Download ``key`` into a fresh writable buffer, verified as in :func:`fetch_bytes`."""
    read = _Read(store, key)
    if not read.total:
        read.stream(read.ranges[0], lambda _, __: None)
        read.verify(hashlib.sha256().hexdigest(), expected)
        return memoryview(bytearray())
    view = new_buffer(read.total)
    pool = store._executor()
    futures = [pool.submit(read.stream, rng, None, view) for rng in read.ranges]
    hasher = hashlib.sha256()
    try:
        for rng, future in zip(read.ranges, futures, strict=True):
            future.result()
            hasher.update(view[rng.start : rng.end])  # overlaps the ranges still arriving
    finally:
        _finish(futures)
    read.verify(hasher.hexdigest(), expected)
    return view


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
