"""Serialisation: cloudpickle behind a small versioned header and a sha256 digest.

Layout of a serialised value::

    b"TPMF" | format version (1 byte) | python major, minor (2 bytes) | sha256 of payload (32 bytes) | payload

The digest is checked before the payload is unpickled, so tampered or truncated
bytes never reach ``pickle.loads``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
from typing import Any

import cloudpickle

from runtime._errors import FaasError, IntegrityError, SerializationError

MAGIC = b"TPMF"
FORMAT_VERSION = 1
HEADER_LEN = len(MAGIC) + 1 + 2 + 32
_HEADER_LEN = HEADER_LEN


def sha256_hex(data: bytes | memoryview) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def dumps(obj: Any, *, what: str = "value") -> bytes:
    """Serialise ``obj`` with cloudpickle behind the versioned header.

    Args:
        obj: Any cloudpickle-able object.
        what: Describes the value in error messages (e.g. "argument 'x'").

    Raises:
        SerializationError: The object cannot be pickled.
    """
    try:
        payload: bytes = cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:  # pickling raises many unrelated types
        raise SerializationError(
            f"The {what} cannot be serialised with cloudpickle: {type(exc).__name__}: {exc}"
        ) from exc
    header = MAGIC + bytes([FORMAT_VERSION, sys.version_info.major, sys.version_info.minor])
    return header + hashlib.sha256(payload).digest() + payload


def digest_of(data: bytes) -> str:
    """The hex digest recorded in a serialised value's header (the payload's sha256)."""
    _check_header(data)
    return data[len(MAGIC) + 3 : _HEADER_LEN].hex()


def _check_header(data: bytes) -> None:
    if len(data) < _HEADER_LEN or data[: len(MAGIC)] != MAGIC:
        raise SerializationError("The bytes are not a tpm-faas serialised value (bad header).")
    version = data[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise SerializationError(
            f"Serialised value has format version {version}; this installation reads {FORMAT_VERSION}."
        )


def loads(data: bytes, *, expected_digest: str | None = None, what: str = "value") -> Any:
    """Verify and deserialise bytes written by :func:`dumps`.

    Args:
        data: The serialised bytes.
        expected_digest: If given, the payload's sha256 must equal it too.
        what: Describes the value in error messages.

    Raises:
        IntegrityError: The payload does not match its digest (or the expected one).
        SerializationError: The header is wrong or unpickling fails.
    """
    _check_header(data)
    py = (data[len(MAGIC) + 1], data[len(MAGIC) + 2])
    recorded = data[len(MAGIC) + 3 : _HEADER_LEN].hex()
    payload = memoryview(data)[_HEADER_LEN:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != recorded:
        raise IntegrityError(f"The {what} is corrupt: its payload does not match its sha256 digest.")
    if expected_digest is not None and actual != expected_digest:
        raise IntegrityError(
            f"The {what} has digest {actual[:12]}..., not the expected {expected_digest[:12]}...."
        )
    try:
        return cloudpickle.loads(payload)
    except FaasError:
        raise  # e.g. an IntegrityError from a staged value resolved while unpickling
    except Exception as exc:
        hint = ""
        if py != sys.version_info[:2]:
            here = f"{sys.version_info[0]}.{sys.version_info[1]}"
            hint = f" (it was written by Python {py[0]}.{py[1]}, this is {here})"
        raise SerializationError(
            f"The {what} cannot be deserialised{hint}: {type(exc).__name__}: {exc}"
        ) from exc


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise SerializationError(f"Plain data was expected, but the value names {module}.{name}.")


def loads_data(data: bytes, *, what: str = "value") -> Any:
    """Deserialise bytes written by :func:`dumps` that hold plain data only, safely.

    Dicts, lists, tuples, strings, bytes, numbers, booleans and None load; any
    class or function in the payload is refused before it is looked up, so no
    code in the bytes runs. The service reads workers' trigger reports with
    this: a function sharing the worker could have forged them.

    Raises:
        IntegrityError: The payload does not match its digest.
        SerializationError: The header is wrong, or the payload is not plain data.
    """
    _check_header(data)
    payload = memoryview(data)[_HEADER_LEN:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) + 3 : _HEADER_LEN]:
        raise IntegrityError(f"The {what} is corrupt: its payload does not match its sha256 digest.")
    try:
        return _DataOnly(io.BytesIO(payload)).load()
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"The {what} cannot be read as plain data: {type(exc).__name__}: {exc}"
        ) from exc
