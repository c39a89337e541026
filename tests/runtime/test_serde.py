from __future__ import annotations

import threading

import pytest

from runtime import IntegrityError, SerializationError, dumps, loads, sha256_hex
from runtime._serde import digest_of


def test_round_trip_and_digest() -> None:
    blob = dumps({"a": [1, 2, 3]})
    assert loads(blob) == {"a": [1, 2, 3]}
    assert digest_of(blob) == sha256_hex(blob[39:])
    assert loads(blob, expected_digest=digest_of(blob)) == {"a": [1, 2, 3]}


def test_lambda_round_trip() -> None:
    k = 3
    assert loads(dumps(lambda x: x * k))(2) == 6


def test_tampered_payload_is_an_integrity_error() -> None:
    blob = bytearray(dumps("hello world"))
    blob[-3] ^= 0xFF
    with pytest.raises(IntegrityError, match="corrupt"):
        loads(bytes(blob))


def test_unexpected_digest_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="expected"):
        loads(dumps(1), expected_digest="0" * 64)


def test_bad_header_and_unpicklable() -> None:
    with pytest.raises(SerializationError, match="header"):
        loads(b"not a value at all, definitely not" * 2)
    with pytest.raises(SerializationError, match="argument 'x'"):
        dumps(threading.Lock(), what="argument 'x'")
