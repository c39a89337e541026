"""Pass-by-reference end to end on SeaweedFS: real invocations, real workers, a real S3 server.

Large arguments and results, ``faas.put`` references, ``faas.ObjectRef`` streaming,
invocation records, and the faults: wrong credentials, a missing bucket,
tampered bytes, and the server killed in the middle of an upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import faas
from runtime._s3 import S3Store
from tests._s3_servers import S3Server, aws_env, start_seaweedfs

MiB = 1 << 20
PREFIX = "stage"


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@faas.function(timeout=120)
def flip(data: bytes) -> bytes:
    return data[::-1]


@faas.function(timeout=60)
def total(arr: Any) -> int:
    return int(arr.sum())


@faas.function(timeout=60)
def stream_lines(ref: faas.ObjectRef) -> dict[str, int]:
    import tracemalloc

    lines = nbytes = 0
    with ref.open() as f:  # (the first open in a worker also builds its S3 client)
        tracemalloc.start()
        for line in f:
            lines += 1
            nbytes += len(line)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"lines": lines, "bytes": nbytes, "peak": peak}


@faas.function(timeout=60)
def read_text(ref: faas.ObjectRef) -> str:
    return ref.read_text()


@faas.function()
def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture(scope="module")
def server(seaweedfs_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with aws_env(seaweedfs_server, tmp_path_factory.mktemp("aws")):  # workers inherit it
        yield seaweedfs_server


@pytest.fixture(scope="module")
def bucket(server: S3Server) -> str:
    return server.new_bucket("staging")


@pytest.fixture(scope="module")
def client(server: S3Server, bucket: str) -> Iterator[faas.Client]:
    c = faas.Client(store=server.store_url(bucket, PREFIX), workers=1)
    yield c
    c.shutdown()


def forge(server: S3Server, bucket: str, key: str) -> None:
    """Flip one byte of an object and record the forged bytes' own sha256, as an attacker would."""
    raw = server.client()
    data = bytearray(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata={"sha256": sha(data)})


def test_64_mib_argument_and_result_travel_by_reference(
    client: faas.Client, server: S3Server, bucket: str
) -> None:
    data = os.urandom(64 * MiB)
    future = flip.with_client(client).submit(data)
    out = future.result(timeout=180)
    assert len(out) == len(data) and sha(out) == sha(data[::-1])

    client.flush_records(timeout=30)
    raw = server.client()
    base = f"{PREFIX}/invocations/{future.invocation_id}"
    request = raw.get_object(Bucket=bucket, Key=f"{base}/request.json")["Body"].read()
    result = raw.get_object(Bucket=bucket, Key=f"{base}/result.json")["Body"].read()
    assert len(request) < 4096 and len(result) < 4096  # references only, never the 64 MiB
    args = json.loads(request)["args"]
    [arg_ref] = args["refs"]
    assert (arg_ref["size"], arg_ref["sha256"], arg_ref["encoding"]) == (64 * MiB, sha(data), "bytes")
    assert len(base64.urlsafe_b64decode(args["inline"])) < 1024  # a pickled reference, not the data
    value = json.loads(result)["value"]
    assert "inline" not in value
    assert (value["ref"]["size"], value["ref"]["sha256"]) == (64 * MiB, sha(out))
    for ref in (arg_ref, value["ref"]):
        head = raw.head_object(Bucket=bucket, Key=f"{PREFIX}/{ref['key']}")
        assert head["ContentLength"] == 64 * MiB
        # From the multipart threshold up a value streams to a blob while it is hashed;
        # a manifest under its content address commits it.
        address = f"{PREFIX}/staging/{ref['sha256']}"
        manifest = json.loads(raw.get_object(Bucket=bucket, Key=address)["Body"].read())
        assert (manifest["key"], manifest["sha256"]) == (ref["key"], ref["sha256"])
    record = client.record(future.invocation_id)
    assert record.status == "succeeded" and record.function_name == "flip"
    assert record.args is not None and record.args.staged_bytes == 64 * MiB


def test_put_once_pass_to_three_invocations(client: faas.Client) -> None:
    arr = np.random.default_rng(7).integers(0, 1 << 40, 1_000_000)  # 8 MB
    uploads: list[str] = []
    store = client.store
    assert isinstance(store, S3Store)
    for c in (store.client, store._conditional_client()):
        for op in ("PutObject", "UploadPart"):
            c.meta.events.register(f"before-send.s3.{op}", lambda request, **_: uploads.append(request.url))
    before = set(store.list("staging/"))
    ref = faas.put(arr, client=client)
    assert faas.put(arr, client=client) == ref  # content-addressed: the same reference, no upload
    assert isinstance(ref, faas.Ref) and ref.size >= arr.nbytes
    fn = total.with_client(client)
    assert [fn.remote(ref) for _ in range(3)] == [int(arr.sum())] * 3
    staging_uploads = [u for u in uploads if "/staging/" in u]
    assert len(staging_uploads) == 1
    assert set(store.list("staging/")) - before == {ref.key}  # the workers staged nothing either


def test_object_ref_streams_an_existing_object(client: faas.Client, server: S3Server) -> None:
    inputs = server.new_bucket("inputs")
    body = b"".join(b"line %08d\n" for i in range(1_200_000))  # 16.8 MB
    raw = server.client()
    raw.put_object(Bucket=inputs, Key="corpus/lines.txt", Body=body)
    head = raw.head_object(Bucket=inputs, Key="corpus/lines.txt")
    ref = faas.ObjectRef(inputs, "corpus/lines.txt", etag=head["ETag"], size=head["ContentLength"])
    out = stream_lines.with_client(client).remote(ref)
    assert out["lines"] == 1_200_000 and out["bytes"] == len(body)
    assert out["peak"] < 8 * MiB  # streamed, never held whole
    raw.put_object(Bucket=inputs, Key="note.txt", Body="héllo".encode())
    assert read_text.with_client(client).remote(faas.ObjectRef(inputs, "note.txt")) == "héllo"
    raw.put_object(Bucket=inputs, Key="corpus/lines.txt", Body=b"replaced")
    with pytest.raises(faas.StoreError, match="no longer has ETag"):
        stream_lines.with_client(client).remote(ref)


def test_wrong_secret_is_a_clear_auth_error_without_retries(
    server: S3Server, bucket: str, tmp_path: Path
) -> None:
    wrong = "wrong-secret-" + uuid.uuid4().hex
    with aws_env(server, tmp_path, AWS_SECRET_ACCESS_KEY=wrong):
        bad = faas.Client(store=server.store_url(bucket, "auth"))
    try:
        assert isinstance(bad.store, S3Store)
        sent: list[str] = []
        bad.store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
        t0 = time.monotonic()
        with pytest.raises(faas.StoreAuthError, match=re.escape(server.endpoint_url)) as info:
            bad.put(os.urandom(2 * MiB))
        assert wrong not in str(info.value)
        with pytest.raises(faas.StoreAuthError, match=re.escape(server.endpoint_url)):
            add.with_client(bad).submit(1, 2)
        assert time.monotonic() - t0 < 5
        assert len(sent) == 2  # one request each: no retry storm
    finally:
        bad.shutdown()


def test_missing_bucket_names_the_bucket(server: S3Server) -> None:
    name = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    missing = faas.Client(store=server.store_url(name, "p"))
    try:
        with pytest.raises(faas.StoreError, match=f"bucket '{name}' does not exist"):
            missing.put(os.urandom(2 * MiB))
        with pytest.raises(faas.StoreError, match=f"bucket '{name}' does not exist"):
            add.with_client(missing).submit(1, 2)
    finally:
        missing.shutdown()


def test_tampered_artifact_is_not_executed(
    client: faas.Client, server: S3Server, bucket: str, tmp_path: Path
) -> None:
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"

    @faas.function(timeout=30)
    def touch() -> str:
        marker.write_text("ran")  # a fresh closure: a fresh artifact digest, never cached by a worker
        return "ran"

    fn = touch.with_client(client)
    spec = client.register(fn)
    forge(server, bucket, f"{PREFIX}/registry/artifacts/{spec.digest}")
    with pytest.raises(faas.IntegrityError, match=spec.digest[:12]):
        fn.remote()
    assert not marker.exists()


def test_tampered_staged_value_is_not_executed(
    client: faas.Client, server: S3Server, bucket: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    @faas.function(timeout=30)
    def consume(data: bytes) -> int:
        marker.write_text("ran")
        return len(data)

    ref = client.put(os.urandom(2 * MiB))
    assert consume.with_client(client).remote(ref) == 2 * MiB
    marker.unlink()
    forge(server, bucket, f"{PREFIX}/{ref.key}")
    with pytest.raises(faas.IntegrityError, match="sha256"):
        consume.with_client(client).remote(ref)
    assert not marker.exists()


def test_server_killed_and_restarted_during_a_large_upload(tmp_path: Path) -> None:
    """The upload retries and succeeds, or fails clearly; no partial object is ever visible."""
    server = start_seaweedfs(tmp_path / "weed")
    try:
        with aws_env(server, tmp_path):
            bucket = server.new_bucket("crash")
            options = "&multipart_threshold=8388608&multipart_chunksize=5242880&max_concurrency=2&retries=8"
            client = faas.Client(store=server.store_url(bucket, "p") + options)
            assert isinstance(client.store, S3Store)
            data = os.urandom(48 * MiB)
            key = f"p/staging/{sha(data)}"
            uploading = threading.Event()
            completing = threading.Event()
            parts_sent: list[int] = []
            for c in (client.store.client, client.store._conditional_client(), client.store._parts_client()):
                c.meta.events.register("before-send.s3.UploadPart", lambda **_: uploading.set())
                c.meta.events.register("before-send.s3.UploadPart", lambda **_: parts_sent.append(1))
                c.meta.events.register("before-send.s3.CompleteMultipartUpload", lambda **_: completing.set())
            outcome: dict[str, Any] = {}

            def upload() -> None:
                try:
                    outcome["ref"] = client.put(data)
                except faas.StoreError as exc:
                    outcome["error"] = exc

            sightings: list[tuple[int, str]] = []
            stop = threading.Event()

            def watch() -> None:  # what any reader would see under the content address, meanwhile
                raw = server.client()
                while not stop.is_set():
                    try:
                        body = raw.get_object(Bucket=bucket, Key=key)["Body"].read()
                        manifest = json.loads(body)  # a streamed value's commit: where its bytes are
                        blob = raw.head_object(Bucket=bucket, Key=f"p/{manifest['key']}")
                        sightings.append((manifest["size"], manifest["sha256"], blob["ContentLength"]))
                    except Exception:
                        pass  # absent, or the server is down
                    stop.wait(0.02)

            uploader = threading.Thread(target=upload)
            watcher = threading.Thread(target=watch)
            uploader.start()
            watcher.start()
            assert uploading.wait(30), "the multipart upload never started"
            mid_upload = not completing.is_set() and uploader.is_alive()
            server.stop(kill=True)
            assert mid_upload, "the kill landed after the upload: this run tests nothing"
            server.start()
            uploader.join(120)
            assert not uploader.is_alive()
            stop.set()
            watcher.join(10)
            parts = -(-len(data) // (5 * MiB))
            assert len(parts_sent) > parts or "error" in outcome, "the kill interrupted no part upload"
            whole = (len(data), sha(data), len(data))
            assert set(sightings) <= {whole}  # nothing partial, ever
            raw = server.client()
            listed = raw.list_objects_v2(Bucket=bucket, Prefix="p/staging/").get("Contents", [])
            blobs = {o["Key"]: o["Size"] for o in listed if o["Key"] != key}
            assert all(k.startswith("p/staging/blobs/") and n == len(data) for k, n in blobs.items())
            if "ref" in outcome:
                assert {o["Key"] for o in listed} == {key, f"p/{outcome['ref'].key}"}
                assert sha(client.store.get(outcome["ref"].key, sha256=sha(data))) == sha(data)
            else:
                message = str(outcome["error"])
                assert server.endpoint_url in message and "staging/" in message
                assert not any(o["Key"] == key for o in listed)  # never committed, so never named
            client.shutdown()
    finally:
        server.stop(kill=True)
