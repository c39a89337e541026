"""The S3 backend of the ObjectStore protocol: AWS S3 and S3-compatible servers.

Credentials come only from boto3's standard chain (environment, shared files,
SSO, instance and container roles); none appear in ``config()``, ``url()``,
``repr()`` or error messages.

Integrity: every write stores the content's SHA-256 as ``x-amz-meta-sha256``.
``get()`` verifies it; ``open()`` hashes what the caller reads and verifies
when a read reaches end of file (a reader that stops early gets no check).
Objects written by other tools, without that metadata, are read unverified.

Commit-once writes send ``If-None-Match: *`` on PutObject and on
CompleteMultipartUpload, and turn 412 (or 409, a race in flight) into
ObjectExists. s3transfer refuses ``IfNoneMatch`` as an upload argument, so
commit-once uploads use a second client whose PutObject and
CompleteMultipartUpload get the header from a botocore event hook.

Retries: botocore's own are off (one attempt a call). tenacity retries each
operation with full-jitter exponential backoff, bounded by ``retries`` and
``retry_deadline``, on transient failures only: 5xx except 501, throttling,
connection errors and timeouts. A multipart upload is retried as a whole.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlparse

import boto3
import botocore.exceptions as bce
import tenacity
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from runtime._errors import IntegrityError, ObjectExists, StoreError
from runtime._s3_download import VerifyingBody, fetch_buffer, fetch_bytes, fetch_into
from runtime._s3_errors import _NOT_FOUND_CODES, _PRECONDITION_CODES, _code, _status, is_transient, translate
from runtime._s3_upload import upload_hashing
from runtime._store import _check_key

T = TypeVar("T")
MiB = 1 << 20
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{1,253}[A-Za-z0-9]")
SHA256_META = "sha256"  # travels as the x-amz-meta-sha256 header

# The constructor's keyword options and their types, for config() and URL queries.
_OPTIONS: dict[str, type] = {
    "endpoint_url": str,
    "region": str,
    "path_style": bool,
    "multipart_threshold": int,
    "multipart_chunksize": int,
    "max_concurrency": int,
    "range_size": int,
    "retries": int,
    "retry_deadline": float,
    "page_size": int,
}


def _require_absent(params: dict[str, Any], **_: Any) -> None:
    params["IfNoneMatch"] = "*"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"Expected a boolean (true/false), got {text!r}.")


class S3Store:
    """An ObjectStore on an S3 bucket, optionally under a key prefix.

    Defaults: objects of 64 MiB or more go up as multipart uploads of 32 MiB
    parts on 8 threads. 32 MiB parts keep per-request overhead under 1% and
    allow 312 GiB objects within S3's 10,000-part limit (s3transfer grows the
    part size beyond that); s3transfer buffers at most 10 parts (~320 MiB).
    8 connections fill a 10 Gbit/s link; more mostly cost memory.

    Args:
        bucket: Bucket name.
        prefix: Key prefix inside the bucket; keys are relative to it.
        endpoint_url: S3-compatible endpoint such as ``http://127.0.0.1:9000``; None for AWS.
        region: Region to sign for; None takes boto3's default chain.
        path_style: Use path-style addressing (``endpoint/bucket/key``).
        multipart_threshold: Size in bytes from which uploads are multipart.
        multipart_chunksize: Part size in bytes (at least 5 MiB).
        max_concurrency: Threads per multipart upload or ranged read.
        range_size: Bytes per ranged GET when reading (8 MiB, as s3transfer).
        retries: Retries after the first attempt, on transient failures only. The
            default rides out a store restart of about half a minute (the backoff
            doubles to 10 s); ``retry_deadline`` bounds it.
        retry_deadline: Seconds after the first attempt past which no retry starts.
        page_size: Keys per ListObjectsV2 request (1 to 1000).

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 32 * MiB,
        max_concurrency: int = 8,
        range_size: int = 8 * MiB,
        retries: int = 10,
        retry_deadline: float = 60.0,
        page_size: int = 1000,
    ) -> None:
        given = locals()
        if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
            raise ValueError(
                f"Invalid bucket name {str(bucket)[:80]!r}: 3 to 255 letters, digits, '.', '-' or '_'."
            )
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        if multipart_chunksize < 5 * MiB or multipart_threshold < 1:
            raise ValueError("multipart_chunksize must be at least 5 MiB (an S3 limit).")
        if max_concurrency < 1 or retries < 0 or retry_deadline < 0 or range_size < 1:
            raise ValueError("max_concurrency and range_size must be >= 1; retries and retry_deadline >= 0.")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be between 1 and 1000, not {page_size}.")
        self.bucket, self.prefix = bucket, prefix
        self._key_prefix = prefix + "/" if prefix else ""
        self._options: dict[str, Any] = {
            name: None if given[name] is None else kind(given[name]) for name, kind in _OPTIONS.items()
        }
        self._session = boto3.session.Session()
        self._lock = threading.Lock()
        self._client = self._new_client()
        self._conditional: Any = None
        self._parts: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",  # the CRT client would bypass our event hooks
        )

    def _new_client(self, sign_payload: bool | None = None) -> Any:
        opts = self._options
        s3: dict[str, Any] = {"addressing_style": "path" if opts["path_style"] else "auto"}
        if sign_payload is not None:
            s3["payload_signing_enabled"] = sign_payload
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # tenacity retries instead
            # Every object carries a sha256 that every read checks; a CRC32 of each body on top
            # would cost a pass over the bytes for nothing.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3=s3,
            max_pool_connections=max(10, opts["max_concurrency"] + 2),
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
        )
        return self._session.client(
            "s3", endpoint_url=opts["endpoint_url"], region_name=opts["region"], config=config
        )

    def _conditional_client(self) -> Any:
        with self._lock:
            if self._conditional is None:
                client = self._new_client()
                for op in ("PutObject", "CompleteMultipartUpload"):
                    client.meta.events.register(f"before-parameter-build.s3.{op}", _require_absent)
                self._conditional = client
            return self._conditional

    def _parts_client(self) -> Any:
        """The client that sends the parts of streamed uploads, without hashing each part to sign it.

        On plain HTTP botocore signs every body with its sha256: a second pass
        over the bytes. A streamed object is checked against the sha256 in its
        reference on every read, so a part changed on the way is caught there;
        the requests themselves stay signed. (On HTTPS botocore signs no bodies anyway.)
        """
        with self._lock:
            if self._parts is None:
                self._parts = self._new_client(sign_payload=False)
            return self._parts

    def _executor(self) -> ThreadPoolExecutor:
        """Threads for the parallel ranges of large reads (started on first use)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._options["max_concurrency"], thread_name_prefix="faas-s3-read"
                )
            return self._pool

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (for instrumentation and tests)."""
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint URL the client talks to."""
        return str(self._client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store({self.url()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3Store.from_config, (self.config()["options"],))

    def _full(self, key: str) -> str:
        return self._key_prefix + _check_key(key)

    def _where(self, key: str | None) -> str:
        place = f"bucket {self.bucket!r} at {self.endpoint}"
        return place if key is None else f"{key!r} (S3 key {self._key_prefix + key!r}) in {place}"

    # -- errors and retries -------------------------------------------------------

    def _translate(self, exc: Exception, action: str, key: str | None, tries: int) -> StoreError:
        return translate(exc, action, self._where(key), key is not None, tries, self.endpoint, self.bucket)

    def _run(self, action: str, key: str | None, fn: Callable[[], T]) -> T:
        opts = self._options
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(opts["retries"] + 1)
            | tenacity.stop_after_delay(opts["retry_deadline"]),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=10.0),
            retry=tenacity.retry_if_exception(is_transient),
            reraise=True,
        )
        try:
            return retrying(fn)
        except (bce.ClientError, bce.BotoCoreError) as exc:
            tries = int(retrying.statistics.get("attempt_number", 1))
            raise self._translate(exc, action, key, tries) from exc

    def _check_digest(
        self, key: str, actual: str, expected: str | None, what: str = "its x-amz-meta-sha256 records"
    ) -> None:
        if expected and expected.lower() != actual:
            raise IntegrityError(
                f"The object under {self._where(key)} has sha256 {actual}, but {what} "
                f"{expected.lower()}; it changed after it was written."
            )

    # -- writes -------------------------------------------------------------------

    def _write(
        self, key: str, send: Callable[[], None], digest: str, if_absent: bool, big: bool, size: int
    ) -> None:
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                # Before a big commit-once upload, look first rather than send every part
                # to be refused at the end; the conditional complete still decides.
                if not (if_absent and big and self._head(key) is not None):
                    send()
                    return
            except bce.ClientError as exc:
                if not (if_absent and _code(exc) in _PRECONDITION_CODES):
                    raise
            # On a retry, our digest there is our earlier attempt's commit -- or a torn write of it
            # (seen on SeaweedFS SIGKILLed mid-PUT: the digest over fewer bytes), which is replaced
            # by the whole object. A first attempt is refused without a look: a dedupe costs one PUT.
            found = self._head(key) if attempts > 1 else None
            if found is not None and found[0] == digest:
                # A single PUT can be torn with its length intact, so its bytes are read back;
                # a multipart upload lands whole at its complete or not at all.
                if found[1] not in (size, -1) or (not big and not self._holds(key, digest)):
                    self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
                    raise bce.ConnectionClosedError(endpoint_url=f"{self.endpoint} (torn {key} removed)")
                return
            raise ObjectExists(
                f"An object already exists under {self._where(key)}; the commit-once write was refused."
            )

        self._run("write", key, attempt)

    def _holds(self, key: str, digest: str) -> bool:
        """Whether the bytes under ``key`` hash to ``digest`` (a missing object does not)."""
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except bce.ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return False
            raise
        return hashlib.sha256(body).hexdigest() == digest

    def _head(self, key: str) -> tuple[str, int] | None:
        """The recorded sha256 and the size of the object under ``key``, or None if there is none."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except bce.ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return None
            raise
        return str(head.get("Metadata", {}).get(SHA256_META, "")), int(head.get("ContentLength", -1))

    def _upload(self, full: str, src: BinaryIO, start: int, digest: str, if_absent: bool) -> None:
        src.seek(start)
        client = self._conditional_client() if if_absent else self._client
        extra = {"Metadata": {SHA256_META: digest}}
        client.upload_fileobj(src, self.bucket, full, ExtraArgs=extra, Config=self._transfer)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, sha256: str | None = None) -> None:
        """Write ``data`` under ``key``; readers see the old or the new object, never a mix.

        Args:
            key: Object key, relative to the store prefix.
            data: The bytes; sent as a multipart upload from ``multipart_threshold`` up.
            if_absent: Refuse to replace an existing object.
            sha256: The hex sha256 of ``data`` if the caller has it (recorded as
                ``x-amz-meta-sha256`` without hashing again; it must be right).

        Raises:
            ObjectExists: ``if_absent`` is set and the key already holds an object.
            StoreError: The write failed.
        """
        full = self._full(key)
        digest = sha256.lower() if sha256 else hashlib.sha256(data).hexdigest()
        if len(data) >= self._options["multipart_threshold"]:
            buf = io.BytesIO(data)
            send = functools.partial(self._upload, full, buf, 0, digest, if_absent)
            self._write(key, send, digest, if_absent, big=True, size=len(data))
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        args["Metadata"] = {SHA256_META: digest}
        if if_absent:
            args["IfNoneMatch"] = "*"
        self._write(
            key, lambda: self._client.put_object(**args), digest, if_absent, big=False, size=len(data)
        )

    def put_file(
        self, key: str, fileobj: BinaryIO, *, if_absent: bool = False, sha256: str | None = None
    ) -> None:
        """Stream a file object's remaining bytes to ``key``.

        A first pass hashes the bytes (a non-seekable stream is spooled to a
        temporary file on the way), then they are uploaded, multipart if large.
        Given ``sha256``, a seekable stream is uploaded without the first pass.

        Args:
            key: Object key, relative to the store prefix.
            fileobj: Binary file object, read from its current position to EOF.
            if_absent: Refuse to replace an existing object.
            sha256: The hex sha256 of the remaining bytes, if the caller has it.

        Raises:
            ObjectExists: ``if_absent`` is set and the key already holds an object.
            StoreError: The upload failed.
        """
        full = self._full(key)
        with contextlib.ExitStack() as stack:
            hasher, size, seekable = hashlib.sha256(), 0, False
            with contextlib.suppress(AttributeError, OSError):
                seekable = fileobj.seekable()
            src: BinaryIO = fileobj if seekable else stack.enter_context(tempfile.TemporaryFile())
            start = fileobj.tell() if seekable else 0
            if sha256 and seekable:
                size = fileobj.seek(0, os.SEEK_END) - start
            else:
                while block := fileobj.read(MiB):
                    hasher.update(block)
                    size += len(block)
                    if not seekable:
                        src.write(block)
            digest = sha256.lower() if sha256 else hasher.hexdigest()
            big = size >= self._options["multipart_threshold"]
            send = functools.partial(self._upload, full, src, start, digest, if_absent)
            self._write(key, send, digest, if_absent, big=big, size=size)

    @property
    def stream_threshold(self) -> int:
        """Objects from ``multipart_threshold`` up are hashed while they upload (:meth:`put_hashing`)."""
        return int(self._options["multipart_threshold"])

    @property
    def look_first_from(self) -> int:
        """Content-addressed writes from 4 MiB up send a HEAD first; smaller ones just send, If-None-Match."""
        return 4 * MiB

    def put_hashing(
        self, key: str, pieces: Sequence[memoryview], decide: Callable[[str], bool]
    ) -> tuple[str, bool]:
        """Multipart-upload ``pieces`` to ``key`` from where they lie, hashing them meanwhile.

        See :func:`runtime._s3_upload.upload_hashing`. ``key`` should be unique
        (the write is not commit-once); ``decide(digest)`` completes the upload
        (True) or aborts it (False). The object records no ``x-amz-meta-sha256``:
        it was not known when the upload began; references carry it.

        Raises:
            StoreError: The upload failed; it was aborted and nothing is visible.
        """
        return upload_hashing(self, key, pieces, decide)

    def size(self, key: str) -> int | None:
        """The size of the object under ``key`` (one HEAD request), or None if there is none."""

        def attempt() -> int | None:
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
            except bce.ClientError as exc:
                if _code(exc) in _NOT_FOUND_CODES:
                    return None
                raise
            return int(head["ContentLength"])

        return self._run("check", key, attempt)

    # -- reads ------------------------------------------------------------------

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the bytes under ``key``, verified against their recorded sha256.

        Objects larger than ``range_size`` are read as parallel ranges
        (see :mod:`runtime._s3_download`).

        Args:
            key: Object key, relative to the store prefix.
            sha256: A digest the bytes must also match (e.g. from a reference).

        Raises:
            ObjectNotFound: No object under ``key``.
            IntegrityError: The bytes do not match ``x-amz-meta-sha256`` or ``sha256``.
            StoreError: The read failed.
        """
        return fetch_bytes(self, key, sha256)

    def get_buffer(self, key: str, *, sha256: str | None = None) -> memoryview:
        """Like :meth:`get`, as a writable view of a buffer the caller owns."""
        return fetch_buffer(self, key, sha256)

    def get_into(
        self,
        key: str,
        layout: Callable[[int], Sequence[memoryview]],
        *,
        sha256: str | None = None,
        first: int | None = None,
    ) -> None:
        """Read ``key`` straight into the caller's buffers, verified as :meth:`get` is."""
        fetch_into(self, key, sha256, layout, first)

    def open(self, key: str, *, etag: str | None = None) -> BinaryIO:
        """Open ``key`` for streaming reads over the response body.

        The file object hashes what is read; a read that reaches end of file
        raises IntegrityError if the digest does not match. Failures while
        streaming raise StoreError and are not retried.

        Args:
            key: Object key, relative to the store prefix.
            etag: If given, the object must still have this ETag (``If-Match``).

        Raises:
            ObjectNotFound: No object under ``key``.
            StoreError: The request failed, or the object no longer has ``etag``.
        """
        full = self._full(key)
        extra = {"IfMatch": etag} if etag else {}

        def attempt() -> Any:
            return self._client.get_object(Bucket=self.bucket, Key=full, **extra)

        try:
            resp = self._run("open", key, attempt)
        except StoreError as exc:
            if etag and isinstance(exc.__cause__, bce.ClientError) and _status(exc.__cause__) == 412:
                raise StoreError(
                    f"The object under {self._where(key)} no longer has ETag {etag}: it was "
                    "replaced after the reference to it was made."
                ) from exc
            raise
        raw = VerifyingBody(self, key, resp["Body"], resp.get("Metadata", {}).get(SHA256_META))
        return io.BufferedReader(raw, buffer_size=MiB)

    def exists(self, key: str) -> bool:
        """Tell whether an object exists under ``key``.

        A missing bucket reads as False too: S3 answers HEAD with a bare 404.
        """
        return self._run("check", key, lambda: self._head(key) is not None)

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        full = self._full(key)
        self._run("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys that start with ``prefix``, in lexicographic order.

        Pages through ListObjectsV2, ``page_size`` keys a request, each page
        retried on its own. The keys are collected and sorted before the first
        is yielded (about 100 bytes a key), because not every server lists in
        byte order: SeaweedFS walks its directory tree (``a/b`` before ``a-b``),
        and S3 Express directory buckets promise no order at all.
        """
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key_prefix + prefix}
        args["MaxKeys"] = self._options["page_size"]
        keys: list[str] = []
        while True:
            page = self._run("list", None, lambda: self._client.list_objects_v2(**args))
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self._key_prefix) :]
                if key and not key.endswith("/"):  # skip directory markers
                    keys.append(key)
            if not page.get("IsTruncated"):
                break
            args["ContinuationToken"] = page["NextContinuationToken"]
        yield from sorted(keys)

    # -- configuration --------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Return the JSON-able ``{"kind": "s3", "options": {...}}`` that rebuilds this store."""
        return {"kind": "s3", "options": {"bucket": self.bucket, "prefix": self.prefix, **self._options}}

    @classmethod
    def from_config(cls, options: dict[str, Any]) -> S3Store:
        """Build an S3Store from ``config()["options"]``.

        Raises:
            ValueError: An option is missing, unknown or out of range.
        """
        options = dict(options)
        unknown = sorted(set(options) - set(_OPTIONS) - {"bucket", "prefix"})
        if unknown or "bucket" not in options:
            raise ValueError(f"Bad S3 store options: need 'bucket'; unknown options {unknown}.")
        return cls(options.pop("bucket"), options.pop("prefix", ""), **options)

    def url(self) -> str:
        """Return ``s3://bucket/prefix?option=value``, leaving out options at their defaults."""
        defaults = S3Store.__init__.__kwdefaults__ or {}
        query = {
            name: str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in self._options.items()
            if value is not None and value != defaults.get(name)
        }
        return f"s3://{self.bucket}/{quote(self.prefix)}" + (
            "?" + urlencode(query, safe=":/") if query else ""
        )

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """Open ``s3://bucket/prefix?endpoint_url=...&path_style=true&region=...``.

        Raises:
            ValueError: The URL is not an s3 URL or has an unknown option.
        """
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"Not an S3 store URL: {url!r}; expected s3://bucket/prefix.")
        options: dict[str, Any] = {}
        for name, text in parse_qsl(parsed.query, keep_blank_values=True):
            kind = _OPTIONS.get(name)
            if kind is None:
                raise ValueError(f"Unknown option {name!r} in S3 store URL {url!r}.")
            try:
                options[name] = _parse_bool(text) if kind is bool else kind(text)
            except ValueError:
                raise ValueError(
                    f"Option {name!r} of S3 store URL {url!r} is not a {kind.__name__}: {text!r}."
                ) from None
        return cls(parsed.netloc, unquote(parsed.path), **options)
