"""The bytes of a staged object as a list of buffers, uploaded without joining them.

A value is pickled with protocol 5; large ``PickleBuffer``s (NumPy arrays and
the like) stay out of band, so their memory is hashed and uploaded where it
lies. Each buffer starts at a multiple of 64 bytes (zero padding between), and
the pickle stream comes last.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle

from runtime._errors import SerializationError

OOB_MIN = 64 * 1024  # buffers smaller than this stay inside the pickle stream
ALIGN = 64  # out-of-band buffers start at multiples of this in a staged object


class PiecesReader(io.RawIOBase):
    """A seekable file over a list of buffers, read as if they were one (no concatenation)."""

    def __init__(self, pieces: list[memoryview]) -> None:
        super().__init__()
        self._pieces = pieces
        self._starts: list[int] = []
        total = 0
        for piece in pieces:
            self._starts.append(total)
            total += piece.nbytes
        self._size, self._pos = total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        for piece, start in zip(self._pieces, self._starts, strict=True):
            if done == len(out):
                break
            end = start + piece.nbytes
            if self._pos >= end:
                continue
            offset = self._pos - start
            n = min(end - self._pos, len(out) - done)
            out[done : done + n] = piece[offset : offset + n]
            done += n
            self._pos += n
        return done

    def read(self, size: int | None = -1) -> bytes:
        # One copy per read (s3transfer reads a whole part at a time).
        want = self._size - self._pos if size is None or size < 0 else size
        parts: list[memoryview] = []
        for piece, start in zip(self._pieces, self._starts, strict=True):
            end = start + piece.nbytes
            if want <= 0:
                break
            if self._pos >= end:
                continue
            n = min(end - self._pos, want)
            parts.append(piece[self._pos - start : self._pos - start + n])
            self._pos += n
            want -= n
        return b"".join(parts)


def pad(offset: int) -> int:
    """Zero bytes that bring ``offset`` to the next multiple of 64."""
    return -offset % ALIGN


def pickle_pieces(obj: Any, what: str) -> tuple[list[memoryview], tuple[int, ...]]:
    """Pickle ``obj`` with large ``PickleBuffer``s out of band: the aligned buffers, then the stream."""
    buffers: list[memoryview] = []

    def take(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: keep it in band
            return True
        if raw.nbytes < OOB_MIN:
            return True
        buffers.append(raw)
        return False

    try:
        stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=take)
    except Exception as exc:
        raise SerializationError(
            f"The {what} cannot be serialised with cloudpickle: {type(exc).__name__}: {exc}"
        ) from exc
    pieces: list[memoryview] = []
    offset = 0
    for buf in buffers:
        pieces.append(buf)
        offset += buf.nbytes
        if pad(offset):
            pieces.append(memoryview(bytes(pad(offset))))
            offset += pad(offset)
    pieces.append(memoryview(stream))
    return pieces, tuple(b.nbytes for b in buffers)
