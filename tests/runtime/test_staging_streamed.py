"""Streamed staging on S3 (moto and SeaweedFS): hashed while uploading, committed once, read into place.

Values from the store's multipart threshold up are multipart-uploaded to
``staging/blobs/<id>`` while hashed, then committed by a manifest under
``staging/<sha256>``; reads receive the bytes straight into the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime._errors import IntegrityError, StoreError
from runtime._s3 import S3Store
from runtime._s3_upload import PartBody, part_size, split
from runtime._staging import StagedRef, load_staged, stage_object
from runtime._store import LocalStore
from tests._s3_servers import S3Server, aws_env

MiB = 1 << 20
SMALL_PARTS = {"multipart_threshold": 8 * MiB, "multipart_chunksize": 5 * MiB, "range_size": 5 * MiB}


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module", params=["moto", "seaweedfs"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    with aws_env(server, tmp_path_factory.mktemp("aws")):
        yield server


@pytest.fixture(scope="module")
def bucket(server: S3Server) -> str:
    return server.new_bucket("streamed")


def make_store(server: S3Server, bucket: str, prefix: str, **options: Any) -> S3Store:
    options = {**SMALL_PARTS, "retries": 1, **options}
    return S3Store(
        bucket, prefix, endpoint_url=server.endpoint_url, region=server.region, path_style=True, **options
    )


@pytest.fixture
def store(server: S3Server, bucket: str) -> S3Store:
    return make_store(server, bucket, f"p{uuid.uuid4().hex[:10]}")


def count(store: S3Store, operation: str) -> list[str]:
    """Record the requests of one operation from every client of the store."""
    sent: list[str] = []
    for client in (store.client, store._parts_client()):
        client.meta.events.register(
            f"before-send.s3.{operation}", lambda request, **_: sent.append(request.url)
        )
    return sent


def keys(server: S3Server, store: S3Store, under: str = "staging/") -> dict[str, int]:
    listed = server.client().list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/{under}")
    return {o["Key"][len(store.prefix) + 1 :]: o["Size"] for o in listed.get("Contents", [])}


def uploads_in_progress(server: S3Server, store: S3Store) -> list[str]:
    answer = server.client().list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/")
    return [u["Key"] for u in answer.get("Uploads", [])]


def test_a_large_array_streams_to_a_blob_and_commits_a_manifest(server: S3Server, store: S3Store) -> None:
    arr = np.random.default_rng(1).random(3 * MiB)  # 24 MiB of float64: five parts
    puts, parts = count(store, "PutObject"), count(store, "UploadPart")
    ref = stage_object(store, arr)
    assert ref.key.startswith("staging/blobs/") and ref.encoding == "pickle" and ref.buffers == (arr.nbytes,)
    assert len(parts) == 5 and len(puts) == 1  # the parts, then only the manifest
    manifest = json.loads(store.get(f"staging/{ref.sha256}"))
    assert manifest == {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
    assert keys(server, store) == {
        ref.key: ref.size,
        f"staging/{ref.sha256}": len(store.get(f"staging/{ref.sha256}")),
    }
    assert sha(store.get(ref.key)) == ref.sha256  # the digest of the bytes that went up
    back = load_staged(store, ref)
    assert np.array_equal(back, arr) and back.flags.writeable


def test_the_same_content_again_is_not_committed_twice(server: S3Server, store: S3Store) -> None:
    data = os.urandom(20 * MiB)
    ref = stage_object(store, data)
    assert ref.encoding == "bytes" and ref.sha256 == sha(data)
    completes = count(store, "CompleteMultipartUpload")
    again = stage_object(store, data)
    assert again == ref and completes == []  # found by its digest: the second upload was aborted
    assert sorted(keys(server, store)) == sorted([ref.key, f"staging/{ref.sha256}"])
    assert uploads_in_progress(server, store) == []


def test_content_staged_whole_before_is_found_and_reused(server: S3Server, bucket: str) -> None:
    prefix = f"p{uuid.uuid4().hex[:10]}"
    whole = make_store(server, bucket, prefix, multipart_threshold=64 * MiB)
    streamed = make_store(server, bucket, prefix)
    data = os.urandom(12 * MiB)
    old = stage_object(whole, data)
    assert old.key == f"staging/{sha(data)}"  # the whole layout
    assert stage_object(streamed, data) == old
    assert keys(server, streamed) == {old.key: len(data)}


def test_small_values_are_sent_conditionally_larger_ones_looked_up_first(store: S3Store) -> None:
    small, larger = os.urandom(2 * MiB), os.urandom(5 * MiB)
    first = [stage_object(store, v) for v in (small, larger)]
    heads, puts = count(store, "HeadObject"), count(store, "PutObject")
    assert [stage_object(store, v) for v in (small, larger)] == first
    assert len(puts) == 1 and len(heads) == 1  # 2 MiB: sent and refused (If-None-Match); 5 MiB: a HEAD
    assert store.get(first[0].key) == small


def test_a_lost_race_takes_the_winners_blob(
    server: S3Server, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime._staging as staging

    data = os.urandom(10 * MiB)
    first = stage_object(store, data)
    real = staging._existing
    calls: list[str] = []

    def blind_once(*args: Any) -> str | None:  # the other writer commits between our look and our commit
        calls.append("look")
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(staging, "_existing", blind_once)
    second = stage_object(store, data)
    assert second == first and calls == ["look", "look"]
    assert sorted(keys(server, store)) == sorted([first.key, f"staging/{first.sha256}"])  # ours was deleted


def test_a_failed_upload_leaves_nothing_under_the_content_address(server: S3Server, store: S3Store) -> None:
    data = os.urandom(16 * MiB)
    sent = count(store, "UploadPart")

    def fail(**_: Any) -> None:
        if len(sent) >= 2:
            raise ConnectionAbortedError("injected: the client dies mid-upload")

    store._parts_client().meta.events.register("before-send.s3.UploadPart", fail)
    with pytest.raises(ConnectionAbortedError):
        stage_object(store, data)
    assert keys(server, store) == {}  # no manifest, no blob
    assert uploads_in_progress(server, store) == []  # and the upload was aborted
    assert not store.exists(f"staging/{sha(data)}")


def test_tampered_and_truncated_blobs_are_detected(server: S3Server, store: S3Store) -> None:
    arr = np.arange(2 * MiB, dtype=np.float64)  # 16 MiB
    ref = stage_object(store, arr)
    raw, full = server.client(), f"{store.prefix}/{ref.key}"
    genuine = store.get(ref.key)
    forged = bytearray(genuine)
    forged[9 * MiB] ^= 1
    raw.put_object(Bucket=store.bucket, Key=full, Body=bytes(forged))
    with pytest.raises(IntegrityError, match="sha256"):
        load_staged(store, ref)
    out = np.zeros_like(arr)
    with pytest.raises(IntegrityError, match="sha256"):
        load_staged(store, ref, out=out)
    raw.put_object(Bucket=store.bucket, Key=full, Body=genuine[:-MiB])
    with pytest.raises(IntegrityError, match="sha256"):
        load_staged(store, ref)
    out[:] = 7.0
    with pytest.raises(IntegrityError, match="bytes, not"):
        load_staged(store, ref, out=out)
    assert (out == 7.0).all()  # refused before a byte landed


@pytest.mark.parametrize("layout", ["streamed", "whole", "file"])
def test_load_into_a_preallocated_array(server: S3Server, bucket: str, tmp_path: Path, layout: str) -> None:
    if layout == "file":
        store: Any = LocalStore(tmp_path / "store")
    else:
        threshold = 8 * MiB if layout == "streamed" else 64 * MiB
        store = make_store(server, bucket, f"p{uuid.uuid4().hex[:10]}", multipart_threshold=threshold)
    arr = np.random.default_rng(2).standard_normal((1024, 1536))  # 12 MiB
    ref = stage_object(store, arr)
    out = np.empty_like(arr)
    back = load_staged(store, ref, out=out)
    assert np.shares_memory(back, out) and np.array_equal(out, arr) and back.shape == arr.shape
    data = os.urandom(9 * MiB + 3)
    into = bytearray(len(data))
    bref = stage_object(store, data)
    assert load_staged(store, bref, out=into) is into and into == data


def test_a_weights_file_streams_from_its_mapping_into_a_preallocated_buffer(
    store: S3Store, tmp_path: Path
) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(12 * MiB))
    mapped = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # the page cache, not a copy
    ref = stage_object(store, mapped)
    assert ref.key.startswith("staging/blobs/") and ref.buffers == (12 * MiB,)
    out = np.empty(12 * MiB, dtype=np.uint8)
    back = load_staged(store, ref, out=out)
    assert np.shares_memory(back, out) and out.tobytes() == path.read_bytes()


def test_load_into_refuses_buffers_that_do_not_fit(store: S3Store) -> None:
    arr = np.ones(1 * MiB)
    ref = stage_object(store, arr)
    gets = count(store, "GetObject")
    with pytest.raises(ValueError, match="holds 4194304 bytes, but the staged value has 8388608"):
        load_staged(store, ref, out=np.empty(MiB // 2))
    with pytest.raises(ValueError, match="read-only"):
        load_staged(store, ref, out=bytes(arr.nbytes))
    with pytest.raises(ValueError, match="C-contiguous"):
        load_staged(store, ref, out=np.empty((MiB, 2))[:, 0])
    whole = StagedRef(key=ref.key, size=ref.size, sha256=ref.sha256)  # pickled with no array data
    with pytest.raises(ValueError, match="no array data"):
        load_staged(store, whole, out=np.empty(MiB))
    assert gets == []  # refused before any request


def test_reads_fill_fresh_bytes_and_buffers_in_place(store: S3Store) -> None:
    data = os.urandom(17 * MiB + 11)
    store.put("r/obj", data)
    back = store.get("r/obj", sha256=sha(data))
    assert type(back) is bytes and back == data and hash(back) == hash(data)
    assert bytes(store.get_buffer("r/obj")) == data
    with pytest.raises(IntegrityError):
        store.get("r/obj", sha256=sha(b"other"))
    with pytest.raises(StoreError, match="hold"):
        store.get_into("r/obj", lambda size: [memoryview(bytearray(size - 1))])


def test_ranges_are_received_by_the_socket_or_through_read(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime._s3_download as download

    data = os.urandom(11 * MiB)
    store.put("r/fast", data)
    body = store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/r/fast", Range="bytes=0-9")[
        "Body"
    ]
    assert download._raw_response(body) is not None  # botocore's stack still lets the socket fill our buffers
    body.close()
    monkeypatch.setattr(download, "_raw_response", lambda _: None)  # a stack without it: read() and copy
    assert store.get("r/fast", sha256=sha(data)) == data


def test_parts_are_views_sized_from_the_object() -> None:
    assert part_size(64 * MiB, 32 * MiB, 8) == 8 * MiB  # every thread busy
    assert part_size(256 * MiB, 32 * MiB, 8) == 16 * MiB
    assert part_size(4 << 30, 32 * MiB, 8) == 32 * MiB
    assert part_size(1 << 40, 32 * MiB, 8) >= (1 << 40) // 10_000
    a, b = memoryview(bytearray(b"a" * 7)), memoryview(bytearray(b"b" * 5))
    parts = split([a, b], 4)
    assert [b"".join(bytes(v) for v in p) for p in parts] == [b"aaaa", b"aaab", b"bbbb"]
    assert all(v.obj is a.obj or v.obj is b.obj for p in parts for v in p)  # views, not copies
    body = PartBody(parts[1])
    assert len(body) == 4 and bytes(body.read(2)) == b"aa" and bytes(body.read()) == b"a"
    assert bytes(body.read()) == b"b" and body.read() == b"" and body.seek(0) == 0 and len(body) == 4
