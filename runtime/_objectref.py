"""``ObjectRef``: names an existing object in a bucket, for a function to stream.

An ObjectRef is not resolved for the function: it arrives as it is, and the
function reads it when and how it wants (``open()`` streams it without loading
it all into memory). The bytes are reached through the *current store*: the
store of the invocation being run (set by :func:`runtime.execute`), else the
process's ``$FAAS_STORE`` (or the embedded default). With an S3 store the
object is read with that store's endpoint, region and addressing style and
boto3's standard credential chain; with a file store the bucket is a
directory (absolute, or relative to the store's root).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from runtime._errors import IntegrityError, ObjectNotFound, StoreError
from runtime._paths import default_store_url
from runtime._store import ObjectStore, _check_key
from runtime._store_factory import store_from_config, store_from_url

_CURRENT: contextvars.ContextVar[ObjectStore | None] = contextvars.ContextVar(
    "faas_current_store", default=None
)
_state: dict[str, ObjectStore] = {}  # "last": the store of the last invocation in this process
_stores: dict[str, ObjectStore] = {}  # cached stores, by their config (or URL)
_lock = threading.Lock()


@contextlib.contextmanager
def using_store(store: ObjectStore | None) -> Iterator[None]:
    """Make ``store`` the current store within the block (and this process's fallback after it)."""
    if store is None:
        yield
        return
    _state["last"] = store  # threads the user's function starts do not inherit context variables
    token = _CURRENT.set(store)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_store() -> ObjectStore:
    """The store of the running invocation, else the process's last one, else ``$FAAS_STORE``."""
    store = _CURRENT.get() or _state.get("last")
    if store is not None:
        return store
    url = default_store_url()
    with _lock:
        if url not in _stores:
            _stores[url] = store_from_url(url)
        return _stores[url]


def cached_store(config: dict[str, Any]) -> ObjectStore:
    """A store built from ``config``, one per distinct config in this process."""
    text = json.dumps(config, sort_keys=True)
    with _lock:
        store = _stores.get(text)
        if store is None:
            store = _stores[text] = store_from_config(config)
        return store


class ObjectRef(BaseModel):
    """An existing object in an S3 bucket (or a file under a directory of a file store).

    Pass it as an argument: the function receives the ObjectRef itself and
    streams the object with :meth:`open`, or reads it with :meth:`read_bytes`
    or :meth:`read_text`. Nothing is downloaded before the function asks.

    Args:
        bucket: Bucket name (file stores: a directory, absolute or relative to the store root).
        key: Object key within the bucket.
        etag: If given, reads fail unless the object still has this ETag (S3 ``If-Match``).
        size: If given, reads fail unless the object still has this many bytes.
    """

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    etag: str | None = None
    size: int | None = None

    def __init__(self, bucket: str, key: str, *, etag: str | None = None, size: int | None = None) -> None:
        super().__init__(bucket=bucket, key=key, etag=etag, size=size)

    def __repr__(self) -> str:
        extra = "".join(f" {k}={v!r}" for k, v in (("etag", self.etag), ("size", self.size)) if v)
        return f"<faas.ObjectRef {self.bucket}/{self.key}{extra}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_object_ref, (self.bucket, self.key, self.etag, self.size))

    def open(self, *, store: ObjectStore | None = None) -> BinaryIO:
        """Open the object for streaming reads; the caller closes it.

        On S3 the bytes are hashed as they are read and checked against the
        ``x-amz-meta-sha256`` that tpm-faas records when it wrote the object (if
        it did) once the reader reaches end of file.

        Args:
            store: Whose endpoint and credentials to use (default: the current store).

        Raises:
            ObjectNotFound: No such object.
            IntegrityError: The file no longer has ``size`` bytes.
            StoreError: It cannot be read (StoreAuthError for rejected credentials),
                or it no longer has ``etag``.
        """
        base = store or current_store()
        config = base.config()
        if config["kind"] == "s3":
            options = {**config["options"], "bucket": self.bucket, "prefix": ""}
            s3 = cached_store({"kind": "s3", "options": options})
            return s3.open(self.key, etag=self.etag)  # type: ignore[call-arg]
        if config["kind"] != "file":
            raise StoreError(f"ObjectRef cannot read from a store of kind {config['kind']!r}.")
        root = Path(self.bucket)
        if not root.is_absolute():
            root = Path(config["options"]["root"]) / self.bucket
        path = root / _check_key(self.key)
        try:
            f = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"No object {self.key!r} in directory {str(root)!r}.") from None
        if self.size is not None and os.fstat(f.fileno()).st_size != self.size:
            actual = os.fstat(f.fileno()).st_size
            f.close()
            raise IntegrityError(
                f"The object {str(path)!r} has {actual} bytes, but the reference to it says {self.size}; "
                "it changed after the reference was made."
            )
        return f

    def read_bytes(self, *, store: ObjectStore | None = None) -> bytes:
        """Read the whole object (verified as in :meth:`open`)."""
        with self.open(store=store) as f:
            data = f.read()
        if self.size is not None and len(data) != self.size:
            raise IntegrityError(
                f"The object {self.bucket}/{self.key} has {len(data)} bytes, but the reference to it "
                f"says {self.size}; it changed after the reference was made."
            )
        return data

    def read_text(
        self, encoding: str = "utf-8", errors: str = "strict", *, store: ObjectStore | None = None
    ) -> str:
        """Read the whole object as text."""
        return self.read_bytes(store=store).decode(encoding, errors)

    def lines(self, encoding: str = "utf-8", *, store: ObjectStore | None = None) -> Iterator[str]:
        """Stream the object line by line, without loading it all."""
        with self.open(store=store) as f, io.TextIOWrapper(f, encoding=encoding) as text:
            yield from text


def _object_ref(bucket: str, key: str, etag: str | None, size: int | None) -> ObjectRef:
    return ObjectRef(bucket, key, etag=etag, size=size)
