"""Staging: large values travel through the object store by reference, never inline.

A value on the wire (an invocation's arguments, a result) is either

- the serialised value itself (:func:`runtime.dumps` bytes) when it is at most
  the staging threshold (default 1 MiB, ``$FAAS_STAGING_THRESHOLD``), or
- a *marker*: ``b"TPMR"`` followed by the JSON of a :class:`StagedRef`, after the
  value was written to ``staging/<sha256>`` in the store.

Staged objects are content-addressed and written commit-once: the same value
is uploaded once however often it is staged, and an object that exists is
never replaced. Every read checks the bytes against the digest in the
reference before anything is unpickled, so tampered or truncated bytes raise
:class:`IntegrityError` and never reach ``pickle.loads``.

Two layouts, both committed once under the content address ``staging/<sha256>``:

- *whole*: the object itself is there (values below the store's
  ``stream_threshold``, every value on a file store, and everything staged
  before streamed uploads existed). The digest is computed first, then the
  bytes are sent (or not: a HEAD finds them there already).
- *streamed* (stores with :class:`~runtime._store.HashingUploads`, S3 from its
  multipart threshold up): the bytes are multipart-uploaded to
  ``staging/blobs/<random id>`` while they are hashed, so no pass over the data
  precedes the upload. When the digest is known, a HEAD on
  ``staging/<sha256>`` decides: present, the upload is aborted and the
  reference names what is there; absent, the upload completes and a small
  manifest (JSON: blob key, size, sha256) is committed under
  ``staging/<sha256>`` with If-None-Match. The reference names the blob
  itself, so reads go straight to it and check it against the reference's
  sha256. An upload that fails or is cut short leaves nothing under the
  content address; the loser of a race deletes its blob and takes the
  winner's.

Encodings of a staged object:

- ``bytes``: a ``bytes`` value, stored as is (no pickling, no copy either way);
- ``bytearray``: a ``bytearray`` value, stored as is and read back into a new
  ``bytearray`` (pickle would copy it into the stream: two copies in memory);
- ``pickle``: a pickle (protocol 5) stream, preceded by its out-of-band buffers
  (each at an offset that is a multiple of 64, zero-padded), whose sizes the
  reference lists. NumPy arrays (and anything else that hands pickle a
  ``PickleBuffer``) are uploaded from their own memory and rebuilt on an
  aligned, writable view of the downloaded buffer, without copies.

A :class:`Ref` stands for a staged value inside other values. Pickled, it is
only its reference; unpickled inside :func:`resolving` (as a worker does with
arguments and a client with results) it becomes the value again.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime import _serde
from runtime._errors import FaasError, IntegrityError, ObjectExists, SerializationError, StoreError
from runtime._pieces import PiecesReader, pad, pickle_pieces
from runtime._store import HashingUploads, ObjectStore, new_buffer, new_id

MiB = 1 << 20
DEFAULT_THRESHOLD = MiB
MARKER = b"TPMR"
STAGING_PREFIX = "staging/"
BLOBS_PREFIX = STAGING_PREFIX + "blobs/"  # streamed uploads, named before their digest is known
_PY = f"{sys.version_info.major}.{sys.version_info.minor}"


class StagedRef(BaseModel):
    """Where a staged value lives and how to check and decode it.

    Attributes:
        key: Store key of the object (``staging/<sha256>``, or ``staging/blobs/<id>``
            for a streamed upload).
        size: Size of the object in bytes.
        sha256: Hex sha256 of the object's bytes (its content address).
        encoding: ``bytes`` or ``bytearray`` (the object is the value's bytes) or
            ``pickle`` (out-of-band buffers, then a pickle stream).
        buffers: Sizes of the out-of-band buffers at the start of a ``pickle``
            object; each starts at the next multiple of 64 bytes.
        python: ``major.minor`` of the Python that pickled it.
        what: What the value was, for error messages (e.g. ``argument 0 of 'f'``).
    """

    model_config = ConfigDict(frozen=True)

    key: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    encoding: Literal["bytes", "bytearray", "pickle"] = "pickle"
    buffers: tuple[int, ...] = ()
    python: str = _PY
    what: str = "value"


def staging_threshold(value: int | str | None = None) -> int:
    """The staging threshold in bytes: ``value``, else ``$FAAS_STAGING_THRESHOLD``, else 1 MiB.

    Accepts an int or a string such as ``"1048576"``, ``"512KiB"``, ``"4MiB"``, ``"1GiB"``.

    Raises:
        ValueError: The value is not a non-negative size.
    """
    raw: int | str | None = value if value is not None else os.environ.get("FAAS_STAGING_THRESHOLD")
    if raw is None or raw == "":
        return DEFAULT_THRESHOLD
    if isinstance(raw, int):
        size = raw
    else:
        text = raw.strip()
        units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        scale = next((m for u, m in units.items() if text.endswith(u)), 1)
        number = text.rstrip("KMGiB").strip() if scale != 1 else text
        try:
            size = int(number) * scale
        except ValueError:
            size = -1
    if size < 0:
        raise ValueError(
            f"Invalid staging threshold {raw!r} (from FAAS_STAGING_THRESHOLD or staging_threshold=): "
            "give a number of bytes such as 1048576 or 4MiB."
        )
    return size


# -- writing ------------------------------------------------------------------------


_SMALL = 8 * MiB  # up to this size the pieces are joined and sent in one request


def _commit(store: ObjectStore, pieces: list[memoryview], digest: str) -> None:
    """Write the pieces under ``staging/<digest>`` unless an object is there already."""
    key = STAGING_PREFIX + digest
    size = sum(p.nbytes for p in pieces)
    look_first = store.look_first_from if isinstance(store, HashingUploads) else 0
    if size >= look_first and store.exists(key):
        return  # content-addressed: the same bytes are there already; a HEAD beats sending them again
    whole = pieces[0].obj if len(pieces) == 1 else None
    try:
        if isinstance(whole, bytes) and len(whole) == size:
            store.put(key, whole, if_absent=True, sha256=digest)
        elif size <= _SMALL:
            store.put(key, b"".join(pieces), if_absent=True, sha256=digest)
        else:
            store.put_file(key, PiecesReader(pieces), if_absent=True, sha256=digest)  # type: ignore[arg-type]
    except ObjectExists:
        pass  # another writer committed the same content first


class _Manifest(BaseModel):
    """What a streamed upload commits under its content address: where the bytes are."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(pattern=r"^staging/blobs/[0-9a-f]{32}$")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def _existing(store: ObjectStore, size_of: Callable[[str], int | None], digest: str, size: int) -> str | None:
    """Where the content with ``digest`` is already stored (the object, or a manifest's blob), if anywhere.

    Raises:
        IntegrityError: A manifest under the content address is not one.
    """
    address = STAGING_PREFIX + digest
    found = size_of(address)
    if found is None:
        return None
    if found == size:
        return address  # the whole object (a manifest is a few hundred bytes; streamed values are MiBs)
    try:
        manifest = _Manifest.model_validate_json(store.get(address))
    except ValidationError:
        manifest = None
    if manifest is None or (manifest.sha256, manifest.size) != (digest, size):
        raise IntegrityError(f"The object under {address!r} is neither the staged value nor its manifest.")
    return manifest.key


def _commit_streamed(
    store: ObjectStore, uploads: HashingUploads, pieces: Sequence[memoryview], size: int
) -> tuple[str, str]:
    """Upload the pieces while hashing them, then commit them under their content address once.

    Returns:
        The key the reference names, and the digest.
    """
    blob = BLOBS_PREFIX + new_id()
    found: list[str] = []

    def decide(digest: str) -> bool:
        key = _existing(store, uploads.size, digest, size)
        if key is not None:
            found.append(key)
        return key is None

    digest, kept = uploads.put_hashing(blob, pieces, decide)
    if not kept:
        return found[0], digest
    manifest = _Manifest(key=blob, size=size, sha256=digest).model_dump_json().encode()
    try:
        store.put(STAGING_PREFIX + digest, manifest, if_absent=True)
    except ObjectExists:  # another writer committed the same content meanwhile: take theirs
        theirs = _existing(store, uploads.size, digest, size)
        if theirs is None:
            return blob, digest  # gone again; ours is complete, and the reference checks it
        store.delete(blob)
        return theirs, digest
    return blob, digest


def stage_object(store: ObjectStore, obj: Any, *, what: str = "value") -> StagedRef:
    """Write ``obj`` to the store (once per distinct content) and return its reference.

    Args:
        store: Where to write it.
        obj: Any cloudpickle-able value; ``bytes`` and ``bytearray`` are stored as they
            are, from their own memory (never copied into a pickle stream).
        what: Describes the value in error messages.

    Raises:
        SerializationError: The value cannot be pickled.
        StoreError: The write failed (StoreAuthError for rejected credentials).
    """
    sizes: tuple[int, ...] = ()
    if type(obj) is bytes:
        pieces, encoding = [memoryview(obj)], "bytes"
    elif type(obj) is bytearray:
        pieces, encoding = [memoryview(obj)], "bytearray"
    else:
        pieces, sizes = pickle_pieces(obj, what)
        encoding = "pickle"
    size = sum(p.nbytes for p in pieces)
    if isinstance(store, HashingUploads) and size >= store.stream_threshold:
        key, digest = _commit_streamed(store, store, pieces, size)
    else:
        hasher = hashlib.sha256()
        for piece in pieces:
            hasher.update(piece)
        digest = hasher.hexdigest()
        _commit(store, pieces, digest)
        key = STAGING_PREFIX + digest
    return StagedRef(
        key=key,
        size=size,
        sha256=digest,
        encoding=encoding,  # type: ignore[arg-type]
        buffers=sizes,
        what=what,
    )


def buffer_nbytes(obj: Any) -> int | None:
    """Size of ``obj``'s buffer if it exposes one (bytes, bytearray, NumPy arrays, ...), else None."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, (str, int, float, bool, type(None), tuple, list, dict)):
        return None
    try:
        with memoryview(obj) as view:
            return view.nbytes
    except (TypeError, ValueError, BufferError):
        return None


def marker(ref: StagedRef) -> bytes:
    """The wire form of a staged value: ``b"TPMR"`` and the reference's JSON."""
    return MARKER + ref.model_dump_json().encode()


def is_marker(data: bytes | None) -> bool:
    """Whether wire bytes are a staged-value marker rather than an inline value."""
    return data is not None and data[: len(MARKER)] == MARKER


def parse_marker(data: bytes) -> StagedRef:
    """The reference inside a marker.

    Raises:
        SerializationError: The bytes are not a valid marker.
    """
    if not is_marker(data):
        raise SerializationError("The bytes are not a staged-value marker (no TPMR prefix).")
    try:
        return StagedRef.model_validate_json(data[len(MARKER) :])
    except ValidationError as exc:
        raise SerializationError(f"A staged-value marker is malformed: {exc}") from None


def stage_value(store: ObjectStore | None, obj: Any, threshold: int, *, what: str = "value") -> bytes:
    """Serialise ``obj`` for the wire, staging it in the store if it is above ``threshold`` bytes.

    Args:
        store: Where to stage; None allows only inline values.
        obj: The value.
        threshold: Largest size, in bytes, that travels inline.
        what: Describes the value in error messages.

    Returns:
        Inline serialised bytes, or a marker naming the staged object.

    Raises:
        SerializationError: The value cannot be pickled.
        StoreError: Staging failed, or the value is too large and there is no store.
    """
    nbytes = buffer_nbytes(obj)
    if nbytes is not None and nbytes > threshold:
        return marker(stage_object(_need(store, what), obj, what=what))
    blob = _serde.dumps(obj, what=what)
    if len(blob) <= threshold:
        return blob
    # The serde header already holds the payload's sha256: stage the payload under it.
    payload = memoryview(blob)[_serde.HEADER_LEN :]
    digest = _serde.digest_of(blob)
    _commit(_need(store, what), [payload], digest)
    return marker(StagedRef(key=STAGING_PREFIX + digest, size=payload.nbytes, sha256=digest, what=what))


def _need(store: ObjectStore | None, what: str) -> ObjectStore:
    if store is None:
        raise StoreError(f"The {what} is above the staging threshold, but no object store is configured.")
    return store


# -- reading ------------------------------------------------------------------------


def load_staged(store: ObjectStore, ref: StagedRef, *, out: Any = None) -> Any:
    """Fetch, verify and decode a staged value.

    Args:
        store: Where it is staged.
        ref: Its reference.
        out: A writable, C-contiguous buffer (a NumPy array, a bytearray, ...)
            to receive the value's bytes directly: as many bytes as a ``bytes`` or ``bytearray``
            value, or as the first out-of-band buffer of a pickled one (a NumPy
            array's data). The value is rebuilt on ``out``'s memory (for an
            array of the same dtype and shape: a view of ``out``) and returned.
            If the bytes fail verification, ``out`` holds them but nothing is
            unpickled.

    Raises:
        ValueError: ``out`` is not a writable contiguous buffer of the right size.
        ObjectNotFound: The staged object is gone.
        IntegrityError: Its bytes do not match the reference's sha256 (nothing is unpickled).
        SerializationError: It cannot be unpickled.
    """
    if out is not None:
        return _load_into(store, ref, out)
    if ref.encoding == "bytearray":
        return _load_into(store, ref, bytearray(ref.size))  # straight into the value: one copy in memory
    if ref.encoding == "bytes":
        data = store.get(ref.key, sha256=ref.sha256)
        _check_size(ref, len(data))
        return data
    view = store.get_buffer(ref.key, sha256=ref.sha256)
    _check_size(ref, view.nbytes)
    buffers, start = [], 0
    for size in ref.buffers:
        buffers.append(view[start : start + size])
        start += size + pad(start + size)
    if start > ref.size:
        raise IntegrityError(f"The staged {ref.what} under {ref.key!r} is shorter than its buffers.")
    return _unpickle(ref, view[start:], buffers)


def _load_into(store: ObjectStore, ref: StagedRef, out: Any) -> Any:
    try:
        view = memoryview(out).cast("B")
    except TypeError:
        raise ValueError(
            f"out= must be a writable, C-contiguous buffer (a NumPy array, a bytearray, ...), "
            f"not {type(out).__name__}."
        ) from None
    if view.readonly:
        raise ValueError(f"out= must be writable; this {type(out).__name__} is read-only.")
    if ref.encoding in ("bytes", "bytearray"):
        want = ref.size
    elif ref.buffers:
        want = ref.buffers[0]
    else:
        raise ValueError(f"The staged {ref.what} has no array data to read into out= (it is pickled whole).")
    if view.nbytes != want:
        raise ValueError(
            f"out= holds {view.nbytes} bytes, but the staged {ref.what} has {want} to put there."
        )
    tail = new_buffer(ref.size - want) if ref.encoding == "pickle" else None

    def layout(size: int) -> list[memoryview]:
        _check_size(ref, size)  # before a byte lands in out
        return [view] if tail is None else [view, tail]

    store.get_into(ref.key, layout, sha256=ref.sha256, first=want)
    if tail is None:
        with contextlib.suppress(BufferError):  # a bytearray with a live export cannot be resized
            view.release()
        return out
    buffers, start = [view], want + pad(want)
    for size in ref.buffers[1:]:
        buffers.append(tail[start - want : start - want + size])
        start += size + pad(start + size)
    if start > ref.size:
        raise IntegrityError(f"The staged {ref.what} under {ref.key!r} is shorter than its buffers.")
    return _unpickle(ref, tail[start - want :], buffers)


def _unpickle(ref: StagedRef, stream: memoryview, buffers: list[memoryview]) -> Any:
    try:
        return pickle.loads(stream, buffers=buffers)
    except FaasError:
        raise
    except Exception as exc:
        hint = f" (it was pickled by Python {ref.python}, this is {_PY})" if ref.python != _PY else ""
        raise SerializationError(
            f"The staged {ref.what} cannot be deserialised{hint}: {type(exc).__name__}: {exc}"
        ) from exc


def _check_size(ref: StagedRef, size: int) -> None:
    if size != ref.size:
        raise IntegrityError(f"The staged {ref.what} under {ref.key!r} has {size} bytes, not {ref.size}.")


def unstage_value(store: ObjectStore | None, data: bytes, *, what: str = "value") -> Any:
    """Turn wire bytes back into the value, fetching it if it was staged.

    :class:`Ref` objects inside are resolved to their values (see :func:`resolving`).

    Raises:
        IntegrityError: Inline or staged bytes do not match their digest.
        SerializationError: The bytes cannot be deserialised.
        StoreError: The staged object cannot be read, or there is no store to read it from.
    """
    with resolving(store):
        if is_marker(data):
            ref = parse_marker(data)
            if store is None:
                raise StoreError(f"The {what} was staged in an object store, but none is configured.")
            return load_staged(store, ref)
        return _serde.loads(data, what=what)


# -- references inside values ---------------------------------------------------------

_RESOLVER: contextvars.ContextVar[Callable[[StagedRef], Any] | None] = contextvars.ContextVar(
    "faas_ref_resolver", default=None
)
_COLLECTOR: contextvars.ContextVar[list[StagedRef] | None] = contextvars.ContextVar(
    "faas_ref_collector", default=None
)


class Ref:
    """A value staged in the object store, passed by reference.

    ``faas.put(obj)`` returns one. Pass it as an argument (anywhere inside the
    arguments) to as many invocations as you like: only the reference travels,
    the value is uploaded once, and the function receives the value itself.

    Attributes:
        staged: The :class:`StagedRef` (key, size, sha256, encoding).
    """

    __slots__ = ("staged",)

    def __init__(self, staged: StagedRef) -> None:
        self.staged = staged

    @property
    def key(self) -> str:
        """Store key of the staged object."""
        return self.staged.key

    @property
    def size(self) -> int:
        """Size of the staged object in bytes."""
        return self.staged.size

    @property
    def sha256(self) -> str:
        """sha256 of the staged object (its content address)."""
        return self.staged.sha256

    def load(self, store: ObjectStore, *, out: Any = None) -> Any:
        """Fetch, verify and decode the value from ``store``.

        Args:
            store: The store it was staged in.
            out: A preallocated writable buffer to receive the bytes without a
                copy (see :func:`load_staged`), e.g. a NumPy array of the
                staged array's dtype and shape.

        Raises:
            ValueError: ``out`` does not fit.
            IntegrityError: The bytes do not match the reference's sha256.
        """
        return load_staged(store, self.staged, out=out)

    def __repr__(self) -> str:
        return f"<faas.Ref {self.staged.key} {self.staged.size} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.staged == self.staged

    def __hash__(self) -> int:
        return hash((self.staged.sha256, self.staged.encoding))

    def __reduce__(self) -> tuple[Any, ...]:
        collector = _COLLECTOR.get()
        if collector is not None:
            collector.append(self.staged)
        return (_ref_from_json, (self.staged.model_dump_json(),))


def _ref_from_json(text: str) -> Any:
    staged = StagedRef.model_validate_json(text)
    resolver = _RESOLVER.get()
    return Ref(staged) if resolver is None else resolver(staged)


@contextlib.contextmanager
def resolving(store: ObjectStore | None) -> Iterator[None]:
    """Within the block, unpickled :class:`Ref` objects become their values (each fetched once)."""
    if store is None:
        yield
        return
    loaded: dict[tuple[str, str], Any] = {}

    def resolve(staged: StagedRef) -> Any:
        key = (staged.sha256, staged.encoding)
        if key not in loaded:
            loaded[key] = load_staged(store, staged)
        return loaded[key]

    token = _RESOLVER.set(resolve)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def stage_args(
    store: ObjectStore | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    threshold: int,
    *,
    what: str = "arguments",
) -> tuple[bytes, tuple[StagedRef, ...]]:
    """Serialise ``(args, kwargs)`` for the wire, staging what is large.

    Each argument whose buffer (bytes, bytearray, NumPy array, ...) is above
    ``threshold`` is staged as an object of its own and replaced by a
    :class:`Ref`; then the whole ``(args, kwargs)`` is staged too if it is
    still above ``threshold``.

    Returns:
        The wire bytes and every staged object the arguments refer to (those
        staged here and the Refs the caller passed), for the invocation record.
    """

    def spill(value: Any, name: str) -> Any:
        nbytes = buffer_nbytes(value)
        if nbytes is None or nbytes <= threshold:
            return value
        return Ref(stage_object(_need(store, name), value, what=name))

    args = tuple(spill(a, f"argument {i} of {what}") for i, a in enumerate(args))
    kwargs = {k: spill(v, f"argument {k!r} of {what}") for k, v in kwargs.items()}
    refs: list[StagedRef] = []
    token = _COLLECTOR.set(refs)
    try:
        data = stage_value(store, (args, kwargs), threshold, what=f"arguments of {what}")
    finally:
        _COLLECTOR.reset(token)
    return data, tuple(dict.fromkeys(refs))
