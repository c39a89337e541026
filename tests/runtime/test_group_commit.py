"""Group commit of records on the local store: many objects, one flush to disk."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import runtime._store
from runtime import Invocation, LocalStore, RecordStore, RecordWriter, Result, StoreError, new_id
from runtime._records import RequestRecord


def _invocation() -> Invocation:
    return Invocation(id=new_id(), function_name="f", function_digest="0" * 64, args=b"a")


def _count_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the local store's flush to disk; the returned list gets each call's file count."""
    calls: list[int] = []
    real = runtime._store._flush_to_disk

    def counting(root: Path, fds: Any) -> None:
        calls.append(len(fds))
        real(root, fds)

    monkeypatch.setattr(runtime._store, "_flush_to_disk", counting)
    return calls


def test_put_many_writes_all_with_one_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = _count_flushes(monkeypatch)
    store = LocalStore(tmp_path)
    store.put("a/kept", b"first")
    entries = [("a/kept", b"second"), *((f"b/{i}/x.json", f"{i}".encode()) for i in range(50))]
    assert store.put_many(entries, if_absent=True) == [False] + [True] * 50
    assert flushes == [51]
    assert store.get("a/kept") == b"first"  # commit-once: the object there stays
    assert [store.get(f"b/{i}/x.json") for i in range(50)] == [f"{i}".encode() for i in range(50)]
    assert store.put_many([("a/kept", b"third")]) == [True]  # not if_absent: replaced
    assert store.get("a/kept") == b"third"
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary file is left behind


def test_put_many_failing_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)

    def broken(root: Path, fds: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(runtime._store, "_flush_to_disk", broken)
    with pytest.raises(StoreError, match=r"Writing 2 objects .* failed"):
        store.put_many([("c/1", b"x"), ("c/2", b"y")], if_absent=True)
    assert not store.exists("c/1") and not store.exists("c/2")
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_write_many_keeps_a_whole_record_and_replaces_a_torn_one(tmp_path: Path) -> None:
    records = RecordStore(LocalStore(tmp_path))
    whole, torn, fresh = (_invocation() for _ in range(3))
    assert records.write_request(whole)
    records.store.put(records.key(torn.id, "request"), b'{"id": "cut sh')  # a writer killed mid-write
    entries: list[tuple[str, BaseModel | bytes]] = [
        (records.key(inv.id, "request"), RequestRecord.of(inv)) for inv in (whole, torn, fresh)
    ]
    entries.append(("raw/once", b"bytes"))
    assert records.write_many(entries) == [False, True, True, True]
    assert records.request(torn.id) == RequestRecord.of(torn)
    assert records.write_many([("raw/once", b"other"), entries[2]]) == [False, False]
    assert records.store.get("raw/once") == b"bytes"


def test_record_writer_groups_what_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = _count_flushes(monkeypatch)
    records = RecordStore(LocalStore(tmp_path))
    gate = threading.Event()
    real = records.write_many

    def held(entries: Any) -> list[bool]:
        gate.wait(10)  # the first group waits while the rest queue up behind it
        return real(entries)

    monkeypatch.setattr(records, "write_many", held)
    writer = RecordWriter(records, threads=1)
    invocations = [_invocation() for _ in range(300)]
    for inv in invocations:
        writer.request(inv)
    for inv in invocations:
        writer.result(Result(invocation_id=inv.id, value=b"v"))
    gate.set()
    writer.close()
    assert all(records.get(inv.id).status == "succeeded" for inv in invocations)
    assert sum(flushes) == 600
    assert len(flushes) <= 5, flushes  # groups of up to 256, not one flush per record
