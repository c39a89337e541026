"""Buckets a binding reads inputs from and writes outputs to.

:class:`Bucket` is a Protocol; :class:`S3Bucket` (S3 and S3-compatible servers,
boto3's credential chain) and :class:`LocalBucket` (a directory) implement it
without inheriting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from registry import TriggerBinding
from runtime import LocalStore, ObjectRef, ObjectStore, StoreError, file_etag

Origin = Literal["notification", "listing", "retry", "recovery"]


@dataclass(frozen=True)
class ObjectInfo:
    """One object version as a bucket lists it.

    Attributes:
        key: Object key.
        etag: Entity tag without quotes (a directory bucket uses mtime and size).
        size: Bytes.
        modified: Last-modified time, seconds since the epoch.
    """

    key: str
    etag: str
    size: int
    modified: float


@dataclass(frozen=True)
class ObjectEvent:
    """A new object version, from a notification or a listing.

    Attributes:
        bucket: Bucket name (or directory).
        key: Object key, decoded.
        etag: Entity tag without quotes.
        size: Bytes, if known.
        event_time: When the object was created (seconds since the epoch).
        origin: Which kind of source saw it.
        receipt: What the source needs to acknowledge it (an SQS receipt handle).
        body: The raw message, for sources that wrap others (tests drop or duplicate).
    """

    bucket: str
    key: str
    etag: str
    size: int | None
    event_time: float
    origin: Origin = "notification"
    receipt: str | None = field(default=None, compare=False)
    body: str | None = field(default=None, compare=False, repr=False)


@runtime_checkable
class Bucket(Protocol):
    """One bucket (or directory) that a binding reads inputs from or writes outputs to."""

    name: str

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object under ``prefix`` (paginated underneath)."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """The object's current version, or None if there is none."""
        ...

    def store(self) -> ObjectStore:
        """An ObjectStore rooted at the bucket, for outputs (commit-once writes)."""
        ...

    def digest(self, key: str) -> str | None:
        """The sha256 of the object's bytes (None if absent)."""
        ...

    def ref(self, info: ObjectInfo | ObjectEvent) -> ObjectRef:
        """An ObjectRef that a function can open."""
        ...

    def store_config(self) -> dict[str, Any]:
        """The config that rebuilds :meth:`store` in a worker process."""
        ...


class S3Bucket:
    """A Bucket on S3 or an S3-compatible server, reached through boto3's credential chain.

    Args:
        name: Bucket name.
        endpoint_url: S3 endpoint (None: AWS).
        region: Region to sign for.
        path_style: Path-style addressing.
    """

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
    ) -> None:
        from runtime import S3Store

        self.name = name
        self._store = S3Store(name, "", endpoint_url=endpoint_url, region=region, path_style=path_style)
        self._client = self._store.client

    def __repr__(self) -> str:
        return f"S3Bucket({self.name!r} at {self._store.endpoint})"

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Page through ListObjectsV2 under ``prefix``."""
        args: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix, "MaxKeys": 1000}
        while True:
            try:
                page = self._client.list_objects_v2(**args)
            except Exception as exc:
                raise StoreError(f"Listing {prefix!r} in {self!r} failed: {exc}") from exc
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    yield ObjectInfo(
                        obj["Key"], obj["ETag"].strip('"'), int(obj["Size"]), obj["LastModified"].timestamp()
                    )
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def head(self, key: str) -> ObjectInfo | None:
        """HEAD the object; None if it does not exist."""
        try:
            resp = self._client.head_object(Bucket=self.name, Key=key)
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StoreError(f"Inspecting {key!r} in {self!r} failed: {exc}") from exc
        modified = resp["LastModified"].timestamp()
        return ObjectInfo(key, resp["ETag"].strip('"'), int(resp["ContentLength"]), modified)

    def store(self) -> ObjectStore:
        """The S3Store for this bucket."""
        return self._store

    def digest(self, key: str) -> str | None:
        """The recorded ``x-amz-meta-sha256``, else the hash of the bytes."""
        try:
            resp = self._client.head_object(Bucket=self.name, Key=key)
        except Exception:
            return None
        recorded = resp.get("Metadata", {}).get("sha256")
        if recorded:
            return str(recorded)
        return hashlib.sha256(self._store.get(key)).hexdigest()

    def ref(self, info: ObjectInfo | ObjectEvent) -> ObjectRef:
        """An ObjectRef pinned to this version (``If-Match`` on the ETag)."""
        return ObjectRef(self.name, info.key, etag=f'"{info.etag}"', size=info.size)

    def store_config(self) -> dict[str, Any]:
        """The S3Store config."""
        return self._store.config()


class LocalBucket:
    """A Bucket that is a directory; the ETag of a file is its mtime and size.

    Writers should write to a temporary name and rename (as LocalStore does):
    a file seen half-written is processed again once it changes.

    Args:
        root: The directory (created if missing).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = str(self.root)
        self._store = LocalStore(self.root)

    def __repr__(self) -> str:
        return f"LocalBucket({self.name!r})"

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, file_etag(st), st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk the directory for files under ``prefix`` (temporary files are skipped)."""
        start = self.root / prefix[: prefix.rfind("/") + 1]
        for dirpath, dirs, files in os.walk(start):
            dirs.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in sorted(files):
                key = base + name
                if name.startswith(".") or not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    yield self._info(key, os.stat(os.path.join(dirpath, name)))

    def head(self, key: str) -> ObjectInfo | None:
        """Stat the file; None if missing."""
        try:
            return self._info(key, os.stat(self.root / key))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def store(self) -> ObjectStore:
        """A LocalStore on the directory."""
        return self._store

    def digest(self, key: str) -> str | None:
        """The sha256 of the file."""
        try:
            return hashlib.sha256((self.root / key).read_bytes()).hexdigest()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def ref(self, info: ObjectInfo | ObjectEvent) -> ObjectRef:
        """An ObjectRef on the file (its size is checked when read)."""
        return ObjectRef(self.name, info.key, etag=info.etag, size=info.size)

    def store_config(self) -> dict[str, Any]:
        """The LocalStore config."""
        return self._store.config()


def buckets_for(binding: TriggerBinding, store_root: str | None = None) -> tuple[Bucket, Bucket]:
    """The input and output buckets of ``binding``.

    Args:
        binding: The binding.
        store_root: A file store's root, against which relative directories resolve.
    """

    def one(name: str) -> Bucket:
        if binding.storage == "file":
            path = Path(name)
            if not path.is_absolute() and store_root:
                path = Path(store_root) / name
            return LocalBucket(path)
        return S3Bucket(
            name, endpoint_url=binding.endpoint_url, region=binding.region, path_style=binding.path_style
        )

    src = one(binding.bucket)
    return src, (src if binding.out_bucket == binding.bucket else one(binding.out_bucket))
