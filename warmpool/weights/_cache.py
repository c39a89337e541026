"""The node-local weights cache: weights fetched from the object store once, verified, published atomically.

Layout under the cache root (``$FAAS_WEIGHTS_CACHE``, default ``<cache dir>/weights``)::

    entries/<digest>/          published weights: the model's files, ``.faas-entry.json``, ``.faas-used``
    partial/<digest>/          a fetch in progress; ``.faas-done`` lists the files already verified
    locks/<digest>.fetch       held (exclusive) by the process fetching ``<digest>``
    locks/<digest>.use         held (shared) by everyone using ``<digest>``; eviction needs it exclusive
    uris/<sha256 of uri>.json  the digest last staged from a URI (for the tier shown in status)
    trash/                     entries being deleted

A fetch writes each file through parallel ranged GETs straight into the file
(``ObjectStore.get_into`` over a shared memory map of it), checks its sha256
against the manifest, and appends it to ``.faas-done``. A process killed
mid-fetch leaves only ``partial/<digest>``, which nothing loads from; the next
stage of the same weights takes the fetch lock (the kernel released the dead
process's), keeps the files ``.faas-done`` lists, fetches the rest, and
publishes the whole directory with one ``rename`` into ``entries/``.

The cache holds at most ``max_bytes`` (``$FAAS_WEIGHTS_CACHE_BYTES``, default
80% of its filesystem): to make room, the least recently used entries that no
one holds, and partial fetches no one is running, are deleted.

Files are not fsynced before publishing unless ``sync=True``
(``$FAAS_WEIGHTS_SYNC=1``): a killed process cannot leave a half-written entry
(the page cache keeps what was written), but a kernel crash or power loss could.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime import IntegrityError, ObjectStore, WeightsError, cache_dir
from warmpool.weights._manifest import WeightFile, WeightsManifest, read_manifest, redact, weights_store

CACHE_ENV = "FAAS_WEIGHTS_CACHE"
BYTES_ENV = "FAAS_WEIGHTS_CACHE_BYTES"
SYNC_ENV = "FAAS_WEIGHTS_SYNC"
ENTRY_FILE = ".faas-entry.json"
USED_FILE = ".faas-used"
DONE_FILE = ".faas-done"

Tier = Literal["hot", "staged", "cold"]


def _parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _lock(path: Path, mode: int, *, block: bool = True) -> int | None:
    """An open file descriptor holding ``flock(mode)`` on ``path``, or None if not blocking and taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(eq=False)
class StagedWeights:
    """Weights in the node's cache, held so eviction leaves them alone until :meth:`release`.

    Attributes:
        path: The model directory to load.
        digest: The manifest's digest.
        uri: Where they came from (without its query).
        cache_hit: They were in the cache already: nothing was fetched.
        fetched_bytes: Bytes downloaded by this stage.
        reused_bytes: Bytes of an interrupted fetch that were kept (verified before).
        seconds: How long staging took.
    """

    path: Path
    digest: str
    uri: str
    cache_hit: bool
    fetched_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    _hold: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Stop holding the entry (it may be evicted from now on)."""
        fd, self._hold = self._hold, None
        if fd is not None:
            os.close(fd)

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for status and provenance."""
        return {
            "digest": self.digest,
            "uri": self.uri,
            "path": str(self.path),
            "cache_hit": self.cache_hit,
            "fetched_bytes": self.fetched_bytes,
            "reused_bytes": self.reused_bytes,
        }

    def __enter__(self) -> StagedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class CacheEntry:
    """One published entry of the cache."""

    digest: str
    bytes: int
    last_used: float
    uri: str


class WeightsCache:
    """A node-local cache of model weights staged from an object store.

    Args:
        root: The cache directory (default ``$FAAS_WEIGHTS_CACHE`` or ``<cache dir>/weights``).
        max_bytes: The most bytes it holds (default ``$FAAS_WEIGHTS_CACHE_BYTES``, e.g. ``500G``,
            or 80% of its filesystem's size).
        sync: fsync every file and directory before publishing (default ``$FAAS_WEIGHTS_SYNC``).
        threads: Files fetched at once (each file's ranges share the store's own threads).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int | None = None,
        sync: bool | None = None,
        threads: int = 4,
    ) -> None:
        env_root = os.environ.get(CACHE_ENV)
        self.root = Path(root or env_root or cache_dir() / "weights").expanduser()
        for sub in ("entries", "partial", "locks", "uris", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if max_bytes is None and os.environ.get(BYTES_ENV):
            max_bytes = _parse_bytes(os.environ[BYTES_ENV])
        self.max_bytes = max_bytes if max_bytes is not None else int(shutil.disk_usage(self.root).total * 0.8)
        self.sync = sync if sync is not None else os.environ.get(SYNC_ENV, "") in ("1", "true", "yes")
        self.threads = max(1, threads)

    def __repr__(self) -> str:
        return f"WeightsCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- paths ---------------------------------------------------------------------
    def entry_path(self, digest: str) -> Path:
        """Where the weights of ``digest`` are published."""
        return self.root / "entries" / digest

    def partial_path(self, digest: str) -> Path:
        """Where a fetch of ``digest`` writes before publishing."""
        return self.root / "partial" / digest

    def _uri_file(self, uri: str) -> Path:
        return self.root / "uris" / (hashlib.sha256(uri.encode()).hexdigest() + ".json")

    # -- reading -------------------------------------------------------------------
    def tier(self, uri: str) -> Tier:
        """``staged`` if the weights last staged from ``uri`` are published here, else ``cold``.

        Reads two local files, never the store: a manifest replaced in the store
        since is noticed at the next stage, not here.
        """
        try:
            digest = json.loads(self._uri_file(uri).read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return "cold"
        return "staged" if self.entry_path(str(digest)).is_dir() else "cold"

    def entries(self) -> list[CacheEntry]:
        """The published entries, least recently used first."""
        out = []
        for path in (self.root / "entries").iterdir():
            try:
                info = json.loads((path / ENTRY_FILE).read_text())
                used = (path / USED_FILE).stat().st_mtime
            except (OSError, ValueError):
                continue  # being evicted
            out.append(CacheEntry(path.name, int(info["bytes"]), used, str(info.get("uri", ""))))
        return sorted(out, key=lambda e: e.last_used)

    def usage(self) -> int:
        """Bytes held: published entries plus partial fetches."""
        partial = sum(self._dir_bytes(p) for p in (self.root / "partial").iterdir())
        return sum(e.bytes for e in self.entries()) + partial

    @staticmethod
    def _dir_bytes(path: Path) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
        return total

    # -- staging -------------------------------------------------------------------
    def stage(self, uri: str, *, store: ObjectStore | None = None) -> StagedWeights:
        """Make the weights under ``uri`` available on local disk and hold them.

        A published entry is used as it is (a cache hit: only the manifest is
        read from the store). Otherwise this process fetches them, or waits for
        the process on this node that already is, then uses its entry.

        Args:
            uri: The weights' store URI (``s3://bucket/prefix?...``, ``file:///dir``).
            store: The store at that URI, if the caller has it open already.

        Returns:
            The staged weights; call ``release()`` (or use ``with``) when done with them.

        Raises:
            WeightsError: No manifest at ``uri``, or the cache cannot hold the weights.
            IntegrityError: A file in the store does not match the manifest; nothing was published.
            StoreError: A read from the store failed.
        """
        t0 = time.monotonic()
        store = store if store is not None else _store(uri)
        manifest = read_manifest(store, uri)
        digest = manifest.digest
        self._uri_file(uri).write_text(json.dumps({"uri": redact(uri), "digest": digest}))
        hold = _lock(self.root / "locks" / f"{digest}.use", fcntl.LOCK_SH)
        staged = StagedWeights(self.entry_path(digest), digest, redact(uri), True, _hold=hold)
        try:
            if not self._use(digest):
                fetching = _lock(self.root / "locks" / f"{digest}.fetch", fcntl.LOCK_EX)
                try:
                    if not self._use(digest):  # nobody else published it while we waited
                        staged.cache_hit = False
                        staged.fetched_bytes, staged.reused_bytes = self._fetch(store, manifest, uri)
                        self._use(digest)
                finally:
                    if fetching is not None:
                        os.close(fetching)
        except BaseException:
            staged.release()
            raise
        staged.seconds = time.monotonic() - t0
        return staged

    def _use(self, digest: str) -> bool:
        """Mark ``digest``'s entry as used now; False if it is not published."""
        entry = self.entry_path(digest)
        if not entry.is_dir():
            return False
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            (entry / USED_FILE).touch()
            os.utime(entry / USED_FILE, ns=(now, now))
        return True

    def _fetch(self, store: ObjectStore, manifest: WeightsManifest, uri: str) -> tuple[int, int]:
        """Fetch what the partial directory lacks, verify it, publish it; (fetched, reused) bytes."""
        digest = manifest.digest
        partial = self.partial_path(digest)
        partial.mkdir(parents=True, exist_ok=True)
        done = self._done(partial, manifest)
        todo = sorted((f for f in manifest.files if f.path not in done), key=lambda f: f.size)
        reused = sum(f.size for f in manifest.files if f.path in done)
        self._make_room(manifest, uri)
        log_lock = threading.Lock()

        def one(f: WeightFile) -> None:
            self._fetch_file(store, f, partial, uri, digest)
            with log_lock, (partial / DONE_FILE).open("a") as log:
                log.write(json.dumps([f.path, f.size, f.sha256]) + "\n")

        if todo:
            with ThreadPoolExecutor(min(self.threads, len(todo)), thread_name_prefix="faas-weights") as pool:
                futures = [pool.submit(one, f) for f in todo]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    future.cancel()
                for future in finished:
                    future.result()  # the first failure, once the others have stopped
        info = {"uri": redact(uri), "bytes": manifest.total_bytes, "published_at": time.time()}
        (partial / ENTRY_FILE).write_text(json.dumps({**info, "manifest": manifest.model_dump(mode="json")}))
        (partial / DONE_FILE).unlink(missing_ok=True)
        if self.sync:
            self._sync_tree(partial)
        os.rename(partial, self.entry_path(digest))  # the publish: all of it or nothing
        if self.sync:
            _fsync_dir(self.root / "entries")
        return sum(f.size for f in todo), reused

    @staticmethod
    def _done(partial: Path, manifest: WeightsManifest) -> set[str]:
        """Files of an interrupted fetch that were verified and are still whole."""
        wanted = {(f.path, f.size, f.sha256) for f in manifest.files}
        done: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for line in (partial / DONE_FILE).read_text().splitlines():
                try:
                    path, size, sha = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the kill
                target = partial / path
                if (path, size, sha) in wanted and target.is_file() and target.stat().st_size == size:
                    done.add(path)
        return done

    def _fetch_file(self, store: ObjectStore, f: WeightFile, partial: Path, uri: str, digest: str) -> None:
        """Ranged GETs of one file straight into it, checked against its manifest sha256."""
        dest = partial / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if f.size == 0:
                store.get(f.path, sha256=f.sha256)
                dest.write_bytes(b"")
                return
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, f.size)
                mm = mmap.mmap(fd, f.size)
            finally:
                os.close(fd)  # the map holds its own descriptor
            try:
                self._receive(store, f, mm)
                if self.sync:
                    mm.flush()
            finally:
                with contextlib.suppress(BufferError):  # a view kept alive by a traceback: GC closes it
                    mm.close()
        except IntegrityError as exc:
            dest.unlink(missing_ok=True)
            raise IntegrityError(
                f"The weight file {f.path!r} under {redact(uri)} does not match its manifest "
                f"(sha256 {f.sha256}): {exc} It was refused; nothing of weights {digest[:12]} was published."
            ) from exc
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    @staticmethod
    def _receive(store: ObjectStore, f: WeightFile, mm: mmap.mmap) -> None:
        view = memoryview(mm)
        try:

            def layout(size: int) -> list[memoryview]:
                if size != f.size:
                    raise IntegrityError(
                        f"The object is {size} bytes, but the manifest lists {f.size} for it."
                    )
                return [view]

            store.get_into(f.path, layout, sha256=f.sha256)
        finally:
            view.release()

    def _sync_tree(self, path: Path) -> None:
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(dirpath))

    # -- eviction ------------------------------------------------------------------
    def _make_room(self, manifest: WeightsManifest, uri: str) -> None:
        """Evict least recently used entries (and abandoned partial fetches) until ``manifest`` fits.

        Raises:
            WeightsError: The weights are larger than the cache, or what is in use leaves too little room.
        """
        need = manifest.total_bytes
        if need > self.max_bytes:
            raise WeightsError(
                f"The weights under {redact(uri)} need {need} bytes, but the weights cache at {self.root} "
                f"holds at most {self.max_bytes}; raise {BYTES_ENV} or point {CACHE_ENV} at a larger disk."
            )
        mine = manifest.digest
        partials = [p for p in (self.root / "partial").iterdir() if p.name != mine]
        used = sum(e.bytes for e in self.entries()) + sum(self._dir_bytes(p) for p in partials)
        if used + need <= self.max_bytes:
            return
        candidates: list[tuple[float, str, Path]] = [
            (e.last_used, "entry", self.entry_path(e.digest)) for e in self.entries()
        ]
        candidates += [(p.stat().st_mtime, "partial", p) for p in partials]
        for _when, kind, path in sorted(candidates):
            lock_name = f"{path.name}.use" if kind == "entry" else f"{path.name}.fetch"
            fd = _lock(self.root / "locks" / lock_name, fcntl.LOCK_EX, block=False)
            if fd is None:
                continue  # in use, or being fetched
            try:
                size = self._dir_bytes(path)
                trash = self.root / "trash" / f"{path.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(path, trash)
                except FileNotFoundError:
                    continue
            finally:
                os.close(fd)
            shutil.rmtree(trash, ignore_errors=True)
            used -= size
            if used + need <= self.max_bytes:
                return
        raise WeightsError(
            f"The weights cache at {self.root} cannot make room for the {need} bytes under {redact(uri)}: "
            f"{used} of its {self.max_bytes} bytes are held by weights in use or being fetched."
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_stores: dict[str, ObjectStore] = {}
_stores_lock = threading.Lock()


def _store(uri: str) -> ObjectStore:
    """The store at ``uri``, opened once per process (a boto3 client costs about 0.1 s to make)."""
    with _stores_lock:
        store = _stores.get(uri)
        if store is None:
            if len(_stores) >= 32:
                _stores.pop(next(iter(_stores)))
            store = _stores[uri] = weights_store(uri)
        return store


def default_cache() -> WeightsCache:
    """The cache the environment names (``$FAAS_WEIGHTS_CACHE``, ``$FAAS_WEIGHTS_CACHE_BYTES``, ...)."""
    return WeightsCache()
