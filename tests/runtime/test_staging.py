"""Staging by reference, ObjectRef on file stores, and invocation records (local store, no pool)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import (
    Invocation,
    LocalStore,
    ObjectRef,
    RecordStore,
    RecordWriter,
    Ref,
    Result,
    StagedRef,
    dumps,
    execute,
    stage_args,
    stage_object,
    stage_value,
    staging_threshold,
    unstage_value,
)
from runtime._errors import IntegrityError, ObjectNotFound, SerializationError, StoreError
from runtime._pieces import PiecesReader
from runtime._staging import MARKER, is_marker, parse_marker

MiB = 1 << 20


class CountingStore(LocalStore):
    """A LocalStore that counts writes per key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put(self, key: str, data: bytes, **kw: Any) -> None:
        self.writes.append(key)
        super().put(key, data, **kw)

    def put_file(self, key: str, fileobj: Any, **kw: Any) -> None:
        self.writes.append(key)
        super().put_file(key, fileobj, **kw)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- threshold and content addressing ---------------------------------------------------


def test_small_values_travel_inline(store: CountingStore) -> None:
    data = stage_value(store, {"a": [1, 2, 3]}, MiB)
    assert not is_marker(data)
    assert unstage_value(store, data) == {"a": [1, 2, 3]}
    assert store.writes == []


def test_large_values_are_staged_content_addressed(store: CountingStore) -> None:
    value = os.urandom(2 * MiB)
    data = stage_value(store, value, MiB, what="blob")
    assert is_marker(data) and len(data) < 1024
    ref = parse_marker(data)
    assert ref.key == f"staging/{ref.sha256}" and ref.encoding == "bytes"
    assert sha(store.get(ref.key)) == ref.sha256 == sha(value)  # the object is the value itself
    assert unstage_value(store, data) == value
    again = stage_value(store, value, MiB)
    assert parse_marker(again).key == ref.key
    assert store.writes == [ref.key]  # staged twice, written once


def test_bytearrays_are_staged_as_they_are_and_come_back_as_bytearrays(store: CountingStore) -> None:
    value = bytearray(os.urandom(2 * MiB))
    ref = parse_marker(stage_value(store, value, MiB))
    assert ref.encoding == "bytearray" and ref.size == len(value) and ref.buffers == ()
    assert store.get(ref.key) == value  # the object is the bytes themselves (pickle would copy them)
    back = unstage_value(store, stage_value(store, value, MiB))
    assert type(back) is bytearray and back == value
    back.append(1)  # its own, resizable buffer: no view of it is left exported
    into = bytearray(len(value))
    assert Ref(ref).load(store, out=into) is into and into == value
    assert stage_object(store, value).key == stage_object(store, bytes(value)).key  # same content, once


def test_threshold_is_strictly_above(store: CountingStore) -> None:
    blob = dumps(b"x" * 1000)
    assert not is_marker(stage_value(store, b"x" * 1000, len(blob)))
    assert is_marker(stage_value(store, b"x" * 1000, len(blob) - 1))


def test_large_pickled_value_reuses_the_serde_digest(store: CountingStore) -> None:
    value = [str(i) * 10 for i in range(200_000)]  # no buffer: one in-band pickle stream
    data = stage_value(store, value, MiB)
    ref = parse_marker(data)
    assert ref.encoding == "pickle" and ref.buffers == ()
    assert sha(store.get(ref.key)) == ref.sha256
    assert unstage_value(store, data) == value


def test_numpy_arrays_travel_out_of_band_and_come_back_writable(store: CountingStore) -> None:
    arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    ref = parse_marker(stage_value(store, arr, MiB))
    assert ref.encoding == "pickle" and ref.buffers == (arr.nbytes,)
    assert ref.size < arr.nbytes + 1024  # the array's bytes once, plus a small pickle stream
    back = unstage_value(store, stage_value(store, arr, MiB))
    assert np.array_equal(back, arr) and back.flags.writeable and back.flags.aligned
    staged = stage_object(store, (arr[:, :999].copy(), np.arange(100_001)))  # two buffers
    assert staged.buffers == (999_000 * 8, 100_001 * 8)
    pair = Ref(staged).load(store)
    assert np.array_equal(pair[0], arr[:, :999]) and np.array_equal(pair[1], np.arange(100_001))
    assert all(a.flags.aligned and a.ctypes.data % 16 == 0 for a in pair)
    back[0, 0] = -1.0  # a writable view of the downloaded buffer, not a read-only one
    assert back[0, 0] == -1.0 and arr[0, 0] == 0.0


def test_staging_threshold_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAAS_STAGING_THRESHOLD", raising=False)
    assert staging_threshold() == MiB
    assert staging_threshold(5) == 5
    assert staging_threshold("4MiB") == 4 * MiB
    assert staging_threshold("512KiB") == 512 * 1024
    monkeypatch.setenv("FAAS_STAGING_THRESHOLD", "2M")
    assert staging_threshold() == 2 * MiB
    assert staging_threshold(7) == 7  # an explicit value wins over the environment
    for bad in ("lots", "-1", "1.5MiB"):
        with pytest.raises(ValueError, match="FAAS_STAGING_THRESHOLD"):
            staging_threshold(bad)


def test_no_store_means_inline_only() -> None:
    assert not is_marker(stage_value(None, 1, MiB))
    with pytest.raises(StoreError, match="no object store"):
        stage_value(None, b"x" * (2 * MiB), MiB)


# -- integrity --------------------------------------------------------------------------


def tamper(store: LocalStore, key: str) -> None:
    path = store.root / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [b"b" * (2 * MiB), np.ones(300_000), [str(i) for i in range(400_000)]])
def test_tampered_staged_value_raises_integrity_error(store: CountingStore, value: Any) -> None:
    data = stage_value(store, value, MiB)
    tamper(store, parse_marker(data).key)
    with pytest.raises(IntegrityError, match="sha256"):
        unstage_value(store, data)


def test_truncated_staged_value_raises_integrity_error(store: CountingStore) -> None:
    data = stage_value(store, b"t" * (2 * MiB), MiB)
    path = store.root / parse_marker(data).key
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        unstage_value(store, data)


def test_tampered_staged_argument_is_never_executed(store: CountingStore) -> None:
    calls: list[int] = []

    def fn(data: bytes) -> int:
        calls.append(len(data))
        return len(data)

    blob, refs = stage_args(store, (b"a" * (2 * MiB),), {}, MiB, what="'fn'")
    inv = Invocation(id="i1", function_name="fn", function_digest="d", args=blob, store=store.config())
    assert execute(inv, fn).value == dumps(2 * MiB)  # untampered: it runs
    tamper(store, refs[0].key)
    result = execute(inv.model_copy(update={"id": "i2"}), fn)
    assert result.error is not None and result.error.type_name == "runtime._errors.IntegrityError"
    assert result.error.kind == "system"
    assert calls == [2 * MiB]  # the second invocation never reached the function


def test_marker_must_be_valid() -> None:
    with pytest.raises(SerializationError, match="malformed"):
        parse_marker(MARKER + b"{not json")


# -- references ---------------------------------------------------------------------------


def test_stage_args_spills_large_arguments_one_object_each(store: CountingStore) -> None:
    big, arr = os.urandom(2 * MiB), np.zeros(400_000)
    blob, refs = stage_args(store, (1, big), {"arr": arr, "name": "x"}, MiB, what="'f'")
    assert not is_marker(blob) and len(blob) < 4096  # only references travel
    assert [r.size for r in refs] == [len(big), parse_marker(stage_value(store, arr, MiB)).size]
    assert refs[0].what == "argument 1 of 'f'" and refs[1].what == "argument 'arr' of 'f'"
    args, kwargs = unstage_value(store, blob)
    assert args == (1, big) and np.array_equal(kwargs["arr"], arr) and kwargs["name"] == "x"


def test_refs_resolve_anywhere_in_the_arguments_and_are_listed(store: CountingStore) -> None:
    ref = Ref(stage_object(store, {"weights": list(range(10))}))
    blob, refs = stage_args(store, ([ref, ref],), {"cfg": {"r": ref}}, MiB)
    assert refs == (ref.staged,)
    (items,), kwargs = unstage_value(store, blob)
    assert items[0] == {"weights": list(range(10))} and items[0] is items[1]  # fetched once
    assert kwargs["cfg"]["r"] == items[0]


def test_refs_stay_references_outside_resolution(store: CountingStore) -> None:
    ref = Ref(stage_object(store, "value"))
    again = pickle.loads(pickle.dumps(ref))
    assert isinstance(again, Ref) and again == ref and hash(again) == hash(ref)
    assert again.load(store) == "value"
    assert ref.key.startswith("staging/") and ref.size == ref.staged.size and len(ref.sha256) == 64


def test_pieces_reader_reads_and_seeks_across_pieces() -> None:
    pieces = [memoryview(b"abc"), memoryview(b""), memoryview(b"defgh")]
    reader = PiecesReader(pieces)
    assert reader.read(2) == b"ab" and reader.read(4) == b"cdef" and reader.read() == b"gh"
    assert reader.read(1) == b""
    reader.seek(1)
    buf = bytearray(5)
    assert reader.readinto(buf) == 5 and bytes(buf) == b"bcdef"
    assert reader.seek(0, io.SEEK_END) == 8 and reader.tell() == 8


# -- local store extensions ----------------------------------------------------------------


def test_local_get_checks_an_expected_digest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"payload")
    assert store.get("k", sha256=sha(b"payload")) == b"payload"
    with pytest.raises(IntegrityError, match="k"):
        store.get("k", sha256=sha(b"other"))
    view = store.get_buffer("k", sha256=sha(b"payload"))
    view[0:1] = b"P"
    assert bytes(view) == b"Payload" and store.get("k") == b"payload"
    with pytest.raises(ObjectNotFound):
        store.get_buffer("missing")


# -- ObjectRef on a file store ----------------------------------------------------------------


def test_object_ref_reads_files_relative_to_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "inputs" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "inputs" / "sub" / "a.txt").write_text("line 1\nline 2\n")
    ref = ObjectRef("inputs", "sub/a.txt", size=14)
    assert ref.read_text(store=store) == "line 1\nline 2\n"
    assert list(ref.lines(store=store)) == ["line 1\n", "line 2\n"]
    with ref.open(store=store) as f:
        assert f.read(4) == b"line"
    absolute = ObjectRef(str(tmp_path / "root" / "inputs"), "sub/a.txt")
    assert absolute.read_bytes(store=store) == b"line 1\nline 2\n"
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert ObjectRef("b", "k", etag="e", size=3).model_dump() == {
        "bucket": "b",
        "key": "k",
        "etag": "e",
        "size": 3,
    }


def test_object_ref_errors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"12345")
    with pytest.raises(IntegrityError, match="has 5 bytes"):
        ObjectRef("d", "f", size=4).read_bytes(store=store)
    with pytest.raises(ObjectNotFound, match="nope"):
        ObjectRef("d", "nope").open(store=store)
    with pytest.raises(ValueError, match="Invalid object key"):
        ObjectRef("d", "../f").open(store=store)


# -- records ---------------------------------------------------------------------------------


def invocation(store: LocalStore, inv_id: str, *args: Any) -> Invocation:
    blob, refs = stage_args(store, args, {}, MiB, what="'f'")
    return Invocation(id=inv_id, function_name="f", function_digest="d" * 64, args=blob, refs=refs)


def test_records_are_commit_once_and_merge(store: CountingStore) -> None:
    records = RecordStore(store)
    inv = invocation(store, "r1", 1, 2)
    with pytest.raises(ObjectNotFound, match="r1"):
        records.get("r1")
    assert records.write_request(inv)
    assert not records.write_request(inv)
    assert records.get("r1").status == "queued"
    first = Result(invocation_id="r1", value=dumps(3), worker_pid=7, started_at=1.0, finished_at=2.0)
    assert records.write_result(first)
    second = Result(invocation_id="r1", value=dumps(4), attempt=1)
    assert not records.write_result(second)  # a retry cannot produce a second result
    record = records.get("r1")
    assert record.status == "succeeded" and record.worker_pid == 7 and record.attempt == 0
    assert record.result is not None and unstage_value(store, record.result.to_wire()) == 3
    assert record.args is not None and unstage_value(store, record.args.to_wire()) == ((1, 2), {})


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_torn_record_is_replaced_not_kept(store: CountingStore, damage: str) -> None:
    """A writer killed mid-PUT left a torn record: the next commit-once write replaces it."""
    records = RecordStore(store)
    first = Result(invocation_id="t1", value=dumps(3), worker_pid=7)
    assert records.write_result(first)
    path = store.root / RecordStore.key("t1", "result")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "flip":
        tamper(store, RecordStore.key("t1", "result"))
    else:  # a body with a fresh digest that is not a record at all
        store.delete(RecordStore.key("t1", "result"))
        store.put(RecordStore.key("t1", "result"), b'{"invocation_id": "t1", "stat')
    assert records.write_result(first)  # replaced: the write counts as the commit
    record = records.result("t1")
    assert record is not None and record.worker_pid == 7
    assert not records.write_result(Result(invocation_id="t1", value=dumps(4)))  # whole now: kept


def test_failed_and_cancelled_status(store: CountingStore) -> None:
    from runtime import error_info

    records = RecordStore(store)
    for inv_id, kind in (("f1", "user"), ("c1", "cancelled")):
        records.write_request(invocation(store, inv_id))
        records.write_result(Result(invocation_id=inv_id, error=error_info(ValueError("no"), kind)))
    assert records.get("f1").status == "failed"
    assert records.get("f1").error.type_name == "ValueError"  # type: ignore[union-attr]
    assert records.get("c1").status == "cancelled"


def test_records_hold_references_not_large_values(store: CountingStore) -> None:
    records = RecordStore(store)
    inv = invocation(store, "big", os.urandom(3 * MiB))
    records.write_request(inv)
    result_value = stage_value(store, os.urandom(3 * MiB), MiB)
    records.write_result(Result(invocation_id="big", value=result_value))
    request_json = store.get("invocations/big/request.json")
    result_json = store.get("invocations/big/result.json")
    assert len(request_json) < 4096 and len(result_json) < 4096
    request = json.loads(request_json)
    assert [r["size"] for r in request["args"]["refs"]] == [3 * MiB]
    assert json.loads(result_json)["value"]["ref"]["size"] == 3 * MiB
    assert records.get("big").args.staged_bytes == 3 * MiB  # type: ignore[union-attr]


class FlakyStore(LocalStore):
    """Fails the first ``failures`` writes with a StoreError."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.lock = threading.Lock()

    def _fail(self) -> None:
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise StoreError("Injected failure.")

    def put(self, key: str, data: bytes, **kw: Any) -> None:
        self._fail()
        super().put(key, data, **kw)

    def put_many(self, entries: Any, **kw: Any) -> list[bool]:  # a group write fails as a whole
        self._fail()
        return super().put_many(entries, **kw)


def test_record_writer_retries_and_never_drops(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path, failures=3)
    writer = RecordWriter(RecordStore(store), retry_delay=0.01)
    ids = [f"w{i}" for i in range(20)]
    for inv_id in ids:
        writer.request(invocation(store, inv_id, inv_id))
        writer.result(Result(invocation_id=inv_id, value=dumps(inv_id)))
    writer.close(timeout=30)
    records = RecordStore(store)
    assert [records.get(i).status for i in ids] == ["succeeded"] * 20
    assert store.failures == 0
    with pytest.raises(StoreError, match="closed"):
        writer.request(invocation(store, "late"))


def test_record_writer_flush_reports_a_dead_store(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path, failures=10**9)
    writer = RecordWriter(RecordStore(store), retry_delay=0.01)
    writer.request(invocation(store, "x"))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"1 invocation records are not written yet.*Injected"):
        writer.flush(timeout=0.3)
    assert time.monotonic() - t0 < 5
    store.failures = 0
    writer.close(timeout=30)
    assert RecordStore(store).get("x").status == "queued"


def test_staged_ref_validates_digest() -> None:
    with pytest.raises(ValueError):
        StagedRef(key="staging/x", size=1, sha256="not-a-digest")
