"""Trigger outputs, written by the worker inside the invocation.

A trigger invocation carries an :class:`runtime._wire.OutputTarget`. The worker
hands a function that declares a parameter annotated :class:`Outputs` a
handle for outputs of its own (:func:`with_outputs`), and writes the return
value to the target commit-once (:func:`write_output`) before the invocation
finishes. The invocation's result is then a small report (plain data) that the
trigger runner turns into the object's done marker. Because the write happens
in the invocation, an invocation that a restarted service runs again finds its
own output and writes nothing twice.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any, BinaryIO

from runtime._errors import ObjectExists
from runtime._objectref import cached_store
from runtime._store import ObjectStore
from runtime._wire import OutputTarget

REPORT_STATES = ("written", "existing", "replaced", "none", "done_elsewhere", "superseded", "deleted")
"""What :func:`write_output` reports: the first four commit the object, the last three settle it otherwise."""


class Outputs:
    """The handle a trigger function uses to write outputs of its own.

    Declare a parameter annotated ``faas.Outputs`` to receive it. Every name is
    written below ``base`` (``output_prefix + <name of the input>``), commit-once:
    a retried attempt that writes the same bytes again changes nothing.

    Attributes:
        bucket: The output bucket (or directory).
        base: Key prefix of this object's outputs.
    """

    def __init__(self, store_config: dict[str, Any], bucket: str, base: str) -> None:
        self.store_config, self.bucket, self.base = store_config, bucket, base

    def __repr__(self) -> str:
        return f"<faas.Outputs {self.bucket}/{self.base}/*>"

    def key(self, name: str) -> str:
        """The key that output ``name`` is written to.

        Raises:
            ValueError: ``name`` is absolute or has ``.``/``..`` parts.
        """
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
            raise ValueError(f"Output name {name!r} must be a relative path without '.' or '..' parts.")
        return f"{self.base}/{name}"

    def _store(self) -> ObjectStore:
        return cached_store(self.store_config)

    def put(self, name: str, data: bytes | str) -> str:
        """Write output ``name`` and return its key (a retry with other bytes replaces it)."""
        blob = data.encode() if isinstance(data, str) else bytes(data)
        key, digest = self.key(name), hashlib.sha256(blob).hexdigest()
        store = self._store()
        try:
            store.put(key, blob, if_absent=True, sha256=digest)
        except ObjectExists:
            if stored_digest(store, key) != digest:
                store.put(key, blob, sha256=digest)
        return key

    def put_file(self, name: str, fileobj: BinaryIO) -> str:
        """Stream a file object to output ``name`` and return its key."""
        key = self.key(name)
        self._store().put_file(key, fileobj)
        return key


def stored_digest(store: ObjectStore, key: str) -> str | None:
    """The sha256 of an object: recorded metadata where the store keeps it, else its hash."""
    client = getattr(store, "client", None)
    if client is not None and hasattr(store, "bucket"):
        try:
            head = client.head_object(Bucket=store.bucket, Key=_full_key(store, key))  # type: ignore[attr-defined]
            recorded = head.get("Metadata", {}).get("sha256")
            if recorded:
                return str(recorded)
        except Exception:
            return None
    try:
        return hashlib.sha256(store.get(key)).hexdigest()
    except Exception:
        return None


def _full_key(store: ObjectStore, key: str) -> str:
    prefix = str(getattr(store, "prefix", "") or "")
    return f"{prefix}/{key}" if prefix else key


def file_etag(st: os.stat_result) -> str:
    """The version tag of a file in a directory bucket: its mtime and size."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def current_etag(store: ObjectStore, key: str) -> str | None:
    """The current version tag (S3 ETag without quotes, or :func:`file_etag`) of an object; None if absent.

    Raises:
        StoreError: The store could not be asked.
    """
    config = store.config()
    if config["kind"] == "file":
        try:
            return file_etag(os.stat(Path(config["options"]["root"]) / key))
        except (FileNotFoundError, NotADirectoryError):
            return None
    from runtime._s3 import S3Store

    if not isinstance(store, S3Store):
        raise TypeError(f"Cannot read the version of an object in a {type(store).__name__}.")
    try:
        head = store.client.head_object(Bucket=store.bucket, Key=_full_key(store, key))
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        from runtime._errors import StoreError

        raise StoreError(f"Inspecting {key!r} in bucket {store.bucket!r} failed: {exc}") from exc
    return str(head["ETag"]).strip('"')


def encode_output(value: Any) -> bytes | None:
    """The bytes written for a trigger function's return value (None: write nothing).

    Raises:
        TypeError: The value is not bytes, str, None or JSON-able.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    try:
        return json.dumps(value, sort_keys=True).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"A trigger function returns bytes, str, a JSON-able value or None; it returned a "
            f"{type(value).__name__} ({exc})."
        ) from None


def outputs_parameter(fn: Any) -> str | None:
    """The name of the parameter annotated ``faas.Outputs``, if any."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    for pname, param in sig.parameters.items():
        ann = hints.get(pname, param.annotation)
        if ann is Outputs or (isinstance(ann, str) and ann.rsplit(".", 1)[-1] == "Outputs"):
            return pname
    return None


def with_outputs(fn: Any, target: OutputTarget, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus an :class:`Outputs` handle, if ``fn`` declares a parameter for one."""
    param = outputs_parameter(fn)
    if param is None:
        return kwargs
    return {**kwargs, param: Outputs(target.store, target.bucket, target.base)}


def write_output(target: OutputTarget, value: Any, store: ObjectStore | None) -> dict[str, Any]:
    """Write a trigger function's return value to ``target`` commit-once; return the report.

    An output already there with the same bytes (an earlier run of this
    invocation, cut off by a crash) counts as written. One with other bytes is
    replaced (an older version's output, or a nondeterministic earlier
    attempt's) unless another attempt committed the object already
    (``done_elsewhere``) or the input was deleted or replaced since
    (``deleted``, ``superseded``): then nothing is written.

    Args:
        target: Where the output goes.
        value: The function's return value.
        store: The invocation's store (holding the done marker).

    Returns:
        Plain data: ``state`` (one of :data:`REPORT_STATES`), and for a written
        output its ``key``, ``sha256`` and ``bytes``.

    Raises:
        TypeError: The value cannot be an output.
        StoreError: A store could not be read or written.
    """
    data = encode_output(value)
    if data is None:
        return {"state": "none"}
    digest = hashlib.sha256(data).hexdigest()
    out = cached_store(target.store)
    state = "written"
    try:
        out.put(target.key, data, if_absent=True, sha256=digest)
    except ObjectExists:
        state = "existing"
        if stored_digest(out, target.key) != digest:
            if store is not None and store.exists(target.done_key):
                return {"state": "done_elsewhere"}
            current = current_etag(cached_store(target.source), target.source_key)
            if current != target.source_etag:
                return {"state": "deleted" if current is None else "superseded"}
            out.put(target.key, data, sha256=digest)
            state = "replaced"
    return {"state": state, "key": target.key, "sha256": digest, "bytes": len(data)}
