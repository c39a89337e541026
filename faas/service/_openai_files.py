"""OpenAI's files API for the batch API: JSONL files in the tenant's own store.

A file is two objects under the tenant's prefix: ``openai/files/<id>`` (the
bytes, written once) and ``openai/files/<id>.json`` (its metadata, written
after the bytes, so a file listed is a file complete). Batch outputs are files
too (purpose ``batch_output``), written by the batch API. No web code here.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel

from faas.service._core import ServiceCore
from faas.service._tenant import Tenant
from runtime import (
    InvalidParameterError,
    NotFoundError,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    new_id,
    scoped_store,
)

FILES = "openai/files/"
MAX_FILE_BYTES = 200 * 1024 * 1024
"""Largest file accepted (OpenAI's limit for a batch input file)."""
PURPOSES = frozenset({"batch", "batch_output", "user_data"})
"""What a file may be for; the API takes ``batch`` and ``user_data`` from clients."""

FileStatus = Literal["uploaded", "processed", "error"]


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: FileStatus = "processed"
    status_details: str | None = None
    expires_at: int | None = None


def plausible_file_id(file_id: str) -> bool:
    """Whether ``file_id`` has the shape of one of our ids (``file-`` and hex)."""
    rest = file_id.removeprefix("file-")
    return rest != file_id and 0 < len(rest) <= 64 and rest.isalnum()


class OpenAIFiles:
    """Files of each tenant, in that tenant's store.

    Args:
        core: The service core (its store holds the tenants' prefixes).
    """

    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    def store(self, tenant: Tenant) -> ObjectStore:
        """The tenant's view of the store."""
        return scoped_store(self.core.store, tenant.prefix)

    def create(
        self, tenant: Tenant, data: bytes, *, filename: str, purpose: str, file_id: str | None = None
    ) -> FileObject:
        """Store a file for the tenant and return its object.

        Args:
            tenant: Whose store.
            data: The bytes.
            filename: The client's name for it (kept, never used as a key).
            purpose: ``batch``, ``user_data`` (clients) or ``batch_output`` (the batch API).
            file_id: A chosen id (the batch API's outputs), or None for a new one.

        Raises:
            InvalidParameterError: Unknown purpose, empty or too large a file.
        """
        if purpose not in PURPOSES:
            raise InvalidParameterError(
                f"Invalid 'purpose': {purpose!r} is not one of {', '.join(sorted(PURPOSES))}.", "purpose"
            )
        if not data:
            raise InvalidParameterError("Invalid 'file': the file is empty.", "file")
        if len(data) > MAX_FILE_BYTES:
            raise InvalidParameterError(
                f"Invalid 'file': {len(data)} bytes is more than the {MAX_FILE_BYTES} a file may have.",
                "file",
            )
        obj = FileObject(
            id=file_id or f"file-{new_id()}",
            bytes=len(data),
            created_at=int(time.time()),
            filename=filename[:255] or "file",
            purpose=purpose,
        )
        store = self.store(tenant)
        if file_id is not None:  # a batch's output, perhaps written already by an earlier finalize
            try:
                return self.get(tenant, file_id)
            except NotFoundError:
                pass
        store.put(FILES + obj.id, data)
        try:
            store.put(FILES + obj.id + ".json", obj.model_dump_json().encode(), if_absent=True)
        except ObjectExists:
            return self.get(tenant, obj.id)  # a racing writer committed the same output first
        return obj

    def get(self, tenant: Tenant, file_id: str) -> FileObject:
        """One of the tenant's files.

        Raises:
            NotFoundError: No such file (or another tenant's).
        """
        try:
            if not plausible_file_id(file_id):
                raise ObjectNotFound(file_id)
            data = self.store(tenant).get(FILES + file_id + ".json")
        except ObjectNotFound:
            raise NotFoundError(f"No file {file_id!r} is known to this service.", 404) from None
        return FileObject.model_validate_json(data)

    def content(self, tenant: Tenant, file_id: str) -> bytes:
        """The bytes of one of the tenant's files.

        Raises:
            NotFoundError: No such file (or another tenant's).
        """
        self.get(tenant, file_id)
        try:
            return self.store(tenant).get(FILES + file_id)
        except ObjectNotFound:
            raise NotFoundError(f"The content of file {file_id!r} is missing from the store.", 404) from None

    def list(self, tenant: Tenant, purpose: str | None = None) -> list[FileObject]:
        """The tenant's files, newest first."""
        store = self.store(tenant)
        found: list[FileObject] = []
        for key in store.list(FILES):
            if not key.endswith(".json"):
                continue
            try:
                data = store.get(key)
            except ObjectNotFound:
                continue  # deleted while we listed
            obj = FileObject.model_validate_json(data)
            if purpose is None or obj.purpose == purpose:
                found.append(obj)
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        """Delete one of the tenant's files (metadata first: a file half deleted is not listed).

        Raises:
            NotFoundError: No such file (or another tenant's).
        """
        self.get(tenant, file_id)
        store = self.store(tenant)
        store.delete(FILES + file_id + ".json")
        store.delete(FILES + file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSON Lines."""
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)
