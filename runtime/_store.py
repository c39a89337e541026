"""The ObjectStore protocol and the local filesystem backend.

Keys are ``/``-separated strings relative to the store's root (a directory or a
bucket prefix). Every backend satisfies :class:`ObjectStore` without inheriting
from it, and is rebuilt from ``config()`` by :func:`store_from_config`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import pwd
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from runtime._errors import IntegrityError, ObjectExists, ObjectNotFound, StoreConfigError, StoreError

_MMAP_MIN = 1 << 20  # smaller buffers come from the heap


@runtime_checkable
class ObjectStore(Protocol):
    """Where function artifacts, invocation records and staged values live."""

    def put(self, key: str, data: bytes, *, if_absent: bool = False, sha256: str | None = None) -> None:
        """Write ``data`` under ``key`` atomically (readers see all or nothing).

        ``sha256`` is the hex digest of ``data`` when the caller has computed it
        already; a backend that records digests uses it instead of hashing again.

        Raises:
            ObjectExists: ``if_absent`` is set and the key already holds an object.
        """
        ...

    def put_file(
        self, key: str, fileobj: BinaryIO, *, if_absent: bool = False, sha256: str | None = None
    ) -> None:
        """Stream a file object's remaining bytes to ``key`` atomically (``sha256`` as in put)."""
        ...

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the bytes under ``key``; raise ObjectNotFound if there are none.

        With ``sha256``, the bytes must hash to it, else IntegrityError.
        """
        ...

    def get_buffer(self, key: str, *, sha256: str | None = None) -> memoryview:
        """Like :meth:`get`, as a writable buffer the caller owns (no copy of large objects)."""
        ...

    def get_into(
        self,
        key: str,
        layout: Callable[[int], Sequence[memoryview]],
        *,
        sha256: str | None = None,
        first: int | None = None,
    ) -> None:
        """Read ``key`` into the caller's buffers: ``layout(size)`` returns them, end to end.

        ``layout`` raises (before any byte is read) if the size is not what the
        caller expects; ``first`` is the size of the first buffer, a hint. With
        ``sha256``, the bytes must hash to it, else IntegrityError.
        """
        ...

    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for streaming reads; the caller closes the file object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object exists under ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys that start with ``prefix``, in lexicographic order."""
        ...

    def config(self) -> dict[str, Any]:
        """A JSON-able ``{"kind": ..., "options": {...}}`` that rebuilds this store."""
        ...

    def url(self) -> str:
        """The store URL (``file:///...`` or ``s3://...``) naming this store."""
        ...


@runtime_checkable
class HashingUploads(Protocol):
    """A store that hashes a large object while it uploads it (S3's multipart uploads).

    The digest is known only at the end, so the object goes to a key of the
    caller's choosing; staging then commits it under its content address.
    """

    @property
    def stream_threshold(self) -> int:
        """Objects of at least this many bytes are worth :meth:`put_hashing`."""
        ...

    @property
    def look_first_from(self) -> int:
        """From this size a commit-once write of content-addressed bytes asks first whether they are there.

        Below it, sending them (a conditional write the store refuses if they
        are) costs less than the extra round trip every first write would pay.
        """
        ...

    def put_hashing(
        self, key: str, pieces: Sequence[memoryview], decide: Callable[[str], bool]
    ) -> tuple[str, bool]:
        """Upload ``pieces`` to ``key`` while hashing them; ``decide(digest)`` completes or aborts it.

        Returns:
            The hex sha256 and whether the object was committed.
        """
        ...

    def size(self, key: str) -> int | None:
        """The size of the object under ``key``, or None if there is none."""
        ...


def new_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes to read an object into.

    Anonymous memory from ``mmap``: not zero-filled first (``bytearray(size)``
    writes every byte while holding the GIL), its pages are faulted in by the
    threads that receive into them, in parallel, and it goes back to the
    system as soon as the last view of it is released. (A NumPy array would
    ask for transparent huge pages, which on a busy host can stall for
    compaction: 0.1 to 0.5 s for 256 MiB, measured.)
    """
    if size < _MMAP_MIN:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size))


def check_sha256(actual: str, expected: str | None, where: str) -> None:
    """Raise IntegrityError if ``expected`` is given and differs from ``actual``."""
    if expected is not None and expected.lower() != actual:
        raise IntegrityError(
            f"The object under {where} has sha256 {actual}, not the expected {expected.lower()}; "
            "its bytes changed after the digest was recorded."
        )


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"Invalid object key {key!r}: keys are relative '/'-separated paths.")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"Invalid object key {key[:80]!r}: keys are UTF-8 text (no lone surrogates)."
        ) from None
    # Limits every backend can hold: a file name (255 bytes) and an S3 key (1,024 bytes).
    if len(key.encode()) > 1024 or any(len(p.encode()) > 255 for p in key.split("/")):
        raise ValueError(
            f"Invalid object key {key[:80]!r}...: keys are at most 1,024 bytes, each part at most 255."
        )
    return key


def _valid_key(key: str) -> bool:
    try:
        _check_key(key)
    except ValueError:
        return False
    return True


class LocalStore:
    """An ObjectStore on the local filesystem.

    Writes go to a temporary file in the target directory, are fsynced, then
    renamed into place, so a reader never sees a half-written object.
    Commit-once writes use ``os.link``, which fails if the target exists.

    Args:
        root: Directory holding the objects; created if missing.
        owner: A Unix user who owns ``root`` and everything written under it (0700
            directories, 0600 files): a tenant's part of the store when its workers run
            as that user. Giving files away needs root; a process that is that user
            already writes them as its own.

    Raises:
        StoreConfigError: ``owner`` does not exist, or files cannot be given to it.
    """

    def __init__(self, root: str | os.PathLike[str], *, owner: str | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.owner = owner
        self._ids = _owner_ids(owner)
        self._mkdirs(self.root)
        if self._ids is not None and self.root.stat().st_uid != self._ids[0]:
            for path in [self.root, *self.root.rglob("*")]:  # first use as that user's: hand it over
                os.chown(path, *self._ids, follow_symlinks=False)
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o700)

    def _mkdirs(self, path: Path) -> None:
        """Create ``path`` and missing parents; those under ``root`` go to the owner."""
        missing = []
        probe = path
        while self._ids is not None and not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        path.mkdir(parents=True, exist_ok=True)
        for made in missing:
            if made == self.root or self.root in made.parents:
                os.chown(made, *self._ids)  # type: ignore[misc]
                made.chmod(0o700)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, sha256: str | None = None) -> None:
        """Write ``data`` under ``key`` atomically (files record no digest; ``sha256`` is unused)."""
        self._commit(key, lambda f: f.write(data), if_absent=if_absent)

    def put_file(
        self, key: str, fileobj: BinaryIO, *, if_absent: bool = False, sha256: str | None = None
    ) -> None:
        """Stream ``fileobj`` to ``key`` atomically (``sha256`` is unused)."""
        self._commit(key, lambda f: shutil.copyfileobj(fileobj, f, 1 << 20), if_absent=if_absent)

    def _commit(self, key: str, write: Any, *, if_absent: bool) -> None:
        path = self._path(key)
        self._mkdirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                if self._ids is not None:
                    os.fchown(f.fileno(), *self._ids)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExists(f"An object already exists under {key!r} in {self!r}.") from None
            else:
                os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"Writing {key!r} to {self!r} failed: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_many(self, entries: Sequence[tuple[str, bytes]], *, if_absent: bool = False) -> list[bool]:
        """Write several small objects with one flush to disk for all of them (group commit).

        Each object is written to a temporary file, then one ``syncfs`` makes
        all of them durable at once (``fsync`` of each where that call is
        missing), then each is linked (or renamed) into place: as durable and
        as atomic as ``put``, for a fraction of the disk flushes.

        Returns:
            One flag per entry: False where ``if_absent`` found an object already there
            (that entry was not written).

        Raises:
            StoreError: The filesystem failed; some entries may be in place, none is half-written.
        """
        written: list[tuple[int, Path, str]] = []
        try:
            for key, data in entries:
                path = self._path(key)
                self._mkdirs(path.parent)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                written.append((fd, path, tmp))
                if self._ids is not None:
                    os.fchown(fd, *self._ids)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            _flush_to_disk(self.root, [fd for fd, _, _ in written])
            out = []
            for _, path, tmp in written:
                if not if_absent:
                    os.replace(tmp, path)
                    out.append(True)
                    continue
                try:
                    os.link(tmp, path)
                    out.append(True)
                except FileExistsError:
                    out.append(False)
            return out
        except OSError as exc:
            raise StoreError(f"Writing {len(entries)} objects to {self!r} failed: {exc}") from exc
        finally:
            for fd, _, tmp in written:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the bytes under ``key``, checked against ``sha256`` when given."""
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"No object under {key!r} in {self!r}.") from None
        if sha256 is not None:
            check_sha256(hashlib.sha256(data).hexdigest(), sha256, f"{key!r} in {self!r}")
        return data

    def get_buffer(self, key: str, *, sha256: str | None = None) -> memoryview:
        """Read ``key`` into a writable buffer, checked against ``sha256`` when given."""
        try:
            with self._path(key).open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                view = new_buffer(size)
                got = 0
                while got < size and (n := f.readinto(view[got:])):
                    got += n
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"No object under {key!r} in {self!r}.") from None
        except OSError as exc:
            raise StoreError(f"Reading {key!r} from {self!r} failed: {exc}") from exc
        if got != size:
            raise StoreError(f"Reading {key!r} from {self!r} failed: it changed size while being read.")
        if sha256 is not None:
            check_sha256(hashlib.sha256(view).hexdigest(), sha256, f"{key!r} in {self!r}")
        return view

    def get_into(
        self,
        key: str,
        layout: Callable[[int], Sequence[memoryview]],
        *,
        sha256: str | None = None,
        first: int | None = None,
    ) -> None:
        """Read ``key`` into the buffers ``layout(size)`` returns, checked against ``sha256`` when given."""
        hasher = hashlib.sha256()
        try:
            with self._path(key).open("rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                views = [v.cast("B") for v in layout(size)]
                if sum(v.nbytes for v in views) != size:
                    raise StoreError(f"The buffers for {key!r} in {self!r} do not hold its {size} bytes.")
                for view in views:
                    got = 0
                    while got < view.nbytes and (n := f.readinto(view[got:])):
                        got += n
                    if got != view.nbytes:
                        raise StoreError(f"Reading {key!r} from {self!r} failed: it shrank while being read.")
                    hasher.update(view)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"No object under {key!r} in {self!r}.") from None
        except OSError as exc:
            raise StoreError(f"Reading {key!r} from {self!r} failed: {exc}") from exc
        if sha256 is not None:
            check_sha256(hasher.hexdigest(), sha256, f"{key!r} in {self!r}")

    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for streaming reads."""
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"No object under {key!r} in {self!r}.") from None

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Delete ``key`` if present."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield keys under ``prefix`` in lexicographic order."""
        keys: list[str] = []
        # Walk from the directory the prefix names, pruning what it rules out: the cost follows
        # what is listed, not the size of the store (a long-running service's store grows).
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(head) if head and _valid_key(head) else self.root
        for dirpath, dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            dirs[:] = [
                d for d in dirs if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            if not (base.startswith(prefix) or prefix.startswith(base)):
                continue
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                key = base + name
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def config(self) -> dict[str, Any]:
        """The config that rebuilds this store."""
        options: dict[str, Any] = {"root": str(self.root)}
        if self.owner is not None:
            options["owner"] = self.owner
        return {"kind": "file", "options": options}

    def url(self) -> str:
        """The ``file://`` URL of this store."""
        return self.root.as_uri()

    @classmethod
    def from_config(cls, options: dict[str, Any]) -> LocalStore:
        """Build a LocalStore from ``config()["options"]``."""
        unknown = set(options) - {"root", "owner"}
        if unknown:
            raise ValueError(f"unknown file store options {sorted(unknown)}")
        return cls(options["root"], owner=options.get("owner"))


def _syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(fd)``, or None where libc has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    return call  # type: ignore[no-any-return]


_SYNCFS = _syncfs()


def _flush_to_disk(root: Path, fds: Sequence[int]) -> None:
    """Make the written files durable: one ``syncfs`` for the filesystem, else one ``fsync`` each."""
    if not fds:
        return
    if _SYNCFS is not None and len(fds) > 1:
        dirfd = os.open(root, os.O_RDONLY)
        try:
            if _SYNCFS(dirfd) == 0:
                return
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs failed: {os.strerror(errno)}")
        finally:
            os.close(dirfd)
    for fd in fds:
        os.fsync(fd)


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    """``(uid, gid)`` to give written files to; None when there is no owner or we are it."""
    if owner is None:
        return None
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise StoreConfigError(f"The file store's owner {owner!r} is not a user on this machine.") from None
    if os.geteuid() == entry.pw_uid:
        return None
    if os.geteuid() != 0:
        raise StoreConfigError(
            f"Only root can write a file store for user {owner!r}; this process runs as uid {os.geteuid()}."
        )
    return entry.pw_uid, entry.pw_gid


def new_id() -> str:
    """A new random identifier (hex, 32 characters)."""
    return uuid.uuid4().hex
