"""Uploads for the S3 backend: buffers sent as multipart parts where they lie, hashed while they go.

:func:`upload_hashing` starts a multipart upload to a key of the caller's
choosing (a unique one: the digest is not known yet), sends the parts in
parallel straight from the caller's buffers (a part that spans two buffers is
sent from both, never joined), and meanwhile hashes the buffers in order in
the calling thread. Once the digest is known the caller decides: complete the
upload, or abort it (the content is in the store already) without waiting for
the parts still to send. A failure aborts the upload, so nothing is left
visible; an upload cut short by a crash stays incomplete, and invisible.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime._s3 import S3Store

MiB = 1 << 20
_MIN_PART = 8 * MiB  # as s3transfer's default; S3's own minimum is 5 MiB
_MAX_PARTS = 10_000  # S3's limit


def part_size(size: int, chunksize: int, concurrency: int) -> int:
    """Bytes per part for an object of ``size``: two parts per thread, 8 MiB to ``chunksize``.

    Small objects still get every thread busy; large ones are not split into
    more requests than they need; no object needs more than 10,000 parts.
    """
    per_thread = -(-size // (2 * concurrency))
    per_thread = -(-per_thread // MiB) * MiB
    part = max(min(_MIN_PART, chunksize), min(per_thread, chunksize))
    return max(part, -(-size // _MAX_PARTS))


def split(pieces: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``pieces`` into parts of ``size`` bytes (views, no copies)."""
    parts: list[list[memoryview]] = [[]]
    room = size
    for piece in pieces:
        view = piece.cast("B") if piece.format != "B" or piece.ndim != 1 else piece
        while view.nbytes:
            if not room:
                parts.append([])
                room = size
            take = view[:room]
            parts[-1].append(take)
            room -= take.nbytes
            view = view[take.nbytes :]
    return [p for p in parts if p]


class PartBody:
    """A seekable file over a few buffers, read as one; ``read`` hands out views, not copies.

    botocore asks its length, reads it to sign it and to send it, and seeks back
    to the start to retry; the socket sends each view as it is.
    """

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._size = sum(v.nbytes for v in views)
        self._pos = 0

    def __len__(self) -> int:
        return self._size - self._pos

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + offset), self._size)
        return self._pos

    def read(self, size: int | None = -1) -> memoryview | bytes:
        want = self._size - self._pos if size is None or size < 0 else min(size, self._size - self._pos)
        start = 0
        for view in self._views:
            if self._pos < start + view.nbytes:
                offset = self._pos - start
                out = view[offset : offset + want]
                self._pos += out.nbytes
                return out
            start += view.nbytes
        return b""


def upload_hashing(
    store: S3Store, key: str, pieces: Sequence[memoryview], decide: Callable[[str], bool]
) -> tuple[str, bool]:
    """Multipart-upload ``pieces`` to ``key`` while hashing them; ``decide(digest)`` says whether to keep it.

    Args:
        store: The store.
        key: Where the object goes (a key no one else writes).
        pieces: The object's bytes, in order.
        decide: Called once with the hex sha256 as soon as it is known (parts may
            still be in flight); True completes the upload, False aborts it.

    Returns:
        The hex sha256 and whether the object was committed.

    Raises:
        StoreError: The upload failed (it was aborted: nothing is visible).
    """
    size = sum(p.nbytes for p in pieces)
    opts = store._options
    part = part_size(size, int(opts["multipart_chunksize"]), int(opts["max_concurrency"]))
    client, parts_client, full, bucket = store.client, store._parts_client(), store._full(key), store.bucket
    upload_id: str = store._run(
        "write", key, lambda: client.create_multipart_upload(Bucket=bucket, Key=full)["UploadId"]
    )
    stop = threading.Event()

    def send(number: int, views: list[memoryview]) -> dict[str, Any]:
        body = PartBody(views)

        def attempt() -> Any:
            body.seek(0)
            return parts_client.upload_part(
                Bucket=bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
            )

        if stop.is_set():
            return {}
        return {"PartNumber": number, "ETag": store._run("write", key, attempt)["ETag"]}

    pool = store._executor()
    futures = [pool.submit(send, n, views) for n, views in enumerate(split(pieces, part), start=1)]
    committed = False
    try:
        hasher = hashlib.sha256()
        for piece in pieces:
            hasher.update(piece)  # releases the GIL: the parts go out meanwhile
        digest = hasher.hexdigest()
        if not decide(digest):
            return digest, False
        parts = [future.result() for future in futures]
        store._run(
            "write",
            key,
            lambda: client.complete_multipart_upload(
                Bucket=bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
        committed = True
        return digest, True
    finally:
        if not committed:
            stop.set()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            with contextlib.suppress(Exception):  # best effort: an incomplete upload is invisible anyway
                client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload_id)
