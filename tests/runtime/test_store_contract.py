"""One contract for every ObjectStore backend: local files, S3 on moto, S3 on SeaweedFS.

Then S3-only tests: integrity checks, error mapping, retries and a server restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from runtime._errors import IntegrityError, ObjectExists, ObjectNotFound, StoreAuthError, StoreError
from runtime._s3 import S3Store
from runtime._store import LocalStore, ObjectStore
from runtime._store_factory import store_from_config, store_from_url
from tests._s3_servers import S3Server

# moto_server and seaweedfs_server are session fixtures from tests/conftest.py (one instance each).

MiB = 1 << 20
BACKENDS = ["local", "moto", "seaweedfs"]
_BUCKETS: dict[str, str] = {}  # one bucket per S3 backend for this module; prefixes per test


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def use_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: S3Server) -> None:
    """Point boto3's standard chain at the server's credentials and nothing else."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def s3_store(server: S3Server, bucket: str, prefix: str, **options: Any) -> S3Store:
    options.setdefault("retries", 2)
    return S3Store(
        bucket, prefix, endpoint_url=server.endpoint_url, region=server.region, path_style=True, **options
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., ObjectStore]:
    """Build stores of this backend on one fresh root (S3: a unique prefix in the module's bucket).

    Keyword options go to S3Store and are ignored by LocalStore.
    """
    if backend == "local":
        return lambda **_: LocalStore(tmp_path / "store")
    server: S3Server = request.getfixturevalue(f"{backend}_server")
    use_credentials(monkeypatch, tmp_path, server)
    if backend not in _BUCKETS:
        _BUCKETS[backend] = server.new_bucket("contract")
    prefix = f"runs/{uuid.uuid4().hex[:12]}"
    return lambda **options: s3_store(server, _BUCKETS[backend], prefix, **options)


@pytest.fixture
def store(make_store: Callable[..., ObjectStore]) -> ObjectStore:
    return make_store()


def count_requests(store: Any, operation: str = "*") -> list[str]:
    """Record every HTTP request an S3Store (or boto3 client) sends; always empty for LocalStore."""
    sent: list[str] = []
    client = store.client if isinstance(store, S3Store) else store
    if hasattr(client, "meta"):
        client.meta.events.register(
            f"before-send.s3.{operation}", lambda request, **_: sent.append(request.url)
        )
    return sent


# -- the contract ---------------------------------------------------------------


def test_satisfies_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_round_trip(store: ObjectStore) -> None:
    store.put("a/b/c.bin", b"\x00payload\xff")
    store.put("empty", b"")
    assert store.get("a/b/c.bin") == b"\x00payload\xff"
    assert store.get("empty") == b""


def test_overwrite(store: ObjectStore) -> None:
    store.put("k", b"first")
    store.put("k", b"second, longer")
    assert store.get("k") == b"second, longer"
    store.put_file("k", io.BytesIO(b"third"))
    assert store.get("k") == b"third"


def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="nope/x"):
        store.get("nope/x")
    with pytest.raises(ObjectNotFound, match="nope/x"):
        store.open("nope/x")
    if isinstance(store, S3Store):
        with pytest.raises(ObjectNotFound, match=store.bucket):
            store.get("nope/x")


def test_exists_and_delete(store: ObjectStore) -> None:
    assert not store.exists("d/k")
    store.put("d/k", b"x")
    assert store.exists("d/k")
    store.delete("d/k")
    assert not store.exists("d/k")
    store.delete("d/k")  # deleting a missing key is fine
    store.delete("never/was")


def test_list_prefix_and_order(store: ObjectStore) -> None:
    keys = ["b", "a/c", "a/b", "a-b", "a0", "ab/x/y", "z/1"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/")) == ["a/b", "a/c"]
    assert list(store.list("a")) == ["a-b", "a/b", "a/c", "a0", "ab/x/y"]
    assert list(store.list("nothing")) == []


def test_list_pagination(make_store: Callable[..., ObjectStore]) -> None:
    store = make_store(page_size=2)
    keys = [f"p/{i:02d}" for i in range(7)]
    for key in reversed(keys):
        store.put(key, b".")
    pages = count_requests(store, "ListObjectsV2")
    assert list(store.list("p/")) == keys
    if isinstance(store, S3Store):
        assert len(pages) == 4  # 2 + 2 + 2 + 1


def test_list_stays_inside_the_store(make_store: Callable[..., ObjectStore], tmp_path: Path) -> None:
    store = make_store()
    store.put("mine", b"1")
    if isinstance(store, S3Store):
        sibling: ObjectStore = S3Store.from_config(
            {**store.config()["options"], "prefix": store.prefix + "x"}
        )
    else:
        sibling = LocalStore(tmp_path / "storex")
    sibling.put("theirs", b"2")
    assert list(store.list()) == ["mine"]
    assert list(sibling.list()) == ["theirs"]


def test_large_multipart_streaming(make_store: Callable[..., ObjectStore], tmp_path: Path) -> None:
    store = make_store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    data = os.urandom(20 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with path.open("rb") as f:
        store.put_file("big/file", f)
    hasher = hashlib.sha256()
    with store.open("big/file") as f:
        while block := f.read(MiB + 17):
            hasher.update(block)
    assert hasher.hexdigest() == sha(data)
    store.put("big/bytes", data[: 11 * MiB])
    assert sha(store.get("big/bytes")) == sha(data[: 11 * MiB])
    if isinstance(store, S3Store):  # a multipart ETag ends in -<number of parts>
        raw = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/big/file")
        assert raw["ETag"].strip('"').endswith("-4")
        assert raw["Metadata"]["sha256"] == sha(data)


def test_put_file_from_unseekable_stream(store: ObjectStore) -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as w:
        w.write(b"piped bytes")
    with os.fdopen(read_fd, "rb", buffering=0) as r:
        store.put_file("pipe", r)  # type: ignore[arg-type]
    assert store.get("pipe") == b"piped bytes"


def test_put_file_from_current_position(store: ObjectStore) -> None:
    f = io.BytesIO(b"skip:keep")
    f.read(5)
    store.put_file("pos", f)
    assert store.get("pos") == b"keep"


def test_if_absent(store: ObjectStore) -> None:
    store.put("once", b"first", if_absent=True)
    with pytest.raises(ObjectExists, match="once"):
        store.put("once", b"second", if_absent=True)
    with pytest.raises(ObjectExists):
        store.put_file("once", io.BytesIO(b"third"), if_absent=True)
    assert store.get("once") == b"first"


def test_if_absent_multipart(make_store: Callable[..., ObjectStore]) -> None:
    store = make_store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    first, second = os.urandom(6 * MiB), os.urandom(6 * MiB)
    store.put_file("mp-once", io.BytesIO(first), if_absent=True)
    with pytest.raises(ObjectExists, match="mp-once"):
        store.put_file("mp-once", io.BytesIO(second), if_absent=True)
    with pytest.raises(ObjectExists):
        store.put("mp-once", second, if_absent=True)
    assert sha(store.get("mp-once")) == sha(first)


def test_config_and_url_round_trip(store: ObjectStore) -> None:
    store.put("cfg/k", b"v")
    config = json.loads(json.dumps(store.config()))
    again = store_from_config(config)
    assert again.config() == store.config()
    assert again.get("cfg/k") == b"v"
    by_url = store_from_url(store.url())
    assert by_url.config() == store.config()
    assert by_url.url() == store.url()
    assert by_url.get("cfg/k") == b"v"
    assert pickle.loads(pickle.dumps(store)).config() == store.config()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", ".", "a/./b", "a\\b", "trailing/"])
def test_invalid_keys_rejected(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.put_file(key, io.BytesIO(b"x")),
        lambda: store.get(key),
        lambda: store.open(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError):
            call()


# -- S3 only ----------------------------------------------------------------------

S3_BACKENDS = ["moto", "seaweedfs"]


@pytest.fixture(params=S3_BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    srv: S3Server = request.getfixturevalue(f"{request.param}_server")
    use_credentials(monkeypatch, tmp_path, srv)
    return srv


@pytest.fixture
def s3(server: S3Server) -> S3Store:
    if server.name not in _BUCKETS:
        _BUCKETS[server.name] = server.new_bucket("contract")
    return s3_store(server, _BUCKETS[server.name], f"s3only/{uuid.uuid4().hex[:12]}")


def test_s3_url_and_config_carry_no_secrets(s3: S3Store, server: S3Server) -> None:
    text = json.dumps(s3.config()) + s3.url() + repr(s3)
    assert server.secret_key not in text and server.access_key not in text
    assert s3.url().startswith(f"s3://{s3.bucket}/{s3.prefix}?")
    assert "path_style=true" in s3.url() and "endpoint_url=" in s3.url()


def test_s3_from_url_parses_options() -> None:
    store = S3Store.from_url(
        "s3://bkt/some/prefix?endpoint_url=http://127.0.0.1:9000&path_style=true&region=us-east-1"
        "&multipart_chunksize=8388608&retries=1"
    )
    options = store.config()["options"]
    assert (options["bucket"], options["prefix"], options["path_style"]) == ("bkt", "some/prefix", True)
    assert (options["multipart_chunksize"], options["retries"]) == (8 * MiB, 1)
    assert options["endpoint_url"] == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match="secret"):
        S3Store.from_url("s3://bkt/p?secret=x")


def test_tampered_bytes_raise_integrity_error(s3: S3Store, server: S3Server) -> None:
    s3.put("t/obj", b"genuine")
    server.client().put_object(  # same recorded digest, different bytes
        Bucket=s3.bucket, Key=f"{s3.prefix}/t/obj", Body=b"forged!", Metadata={"sha256": sha(b"genuine")}
    )
    with pytest.raises(IntegrityError, match="t/obj"):
        s3.get("t/obj")
    with s3.open("t/obj") as f, pytest.raises(IntegrityError, match="t/obj"):
        f.read()


def test_tampered_metadata_raises_integrity_error(s3: S3Store, server: S3Server) -> None:
    s3.put("t/meta", b"genuine")
    full = f"{s3.prefix}/t/meta"
    server.client().copy_object(
        Bucket=s3.bucket,
        Key=full,
        CopySource={"Bucket": s3.bucket, "Key": full},
        Metadata={"sha256": "0" * 64},
        MetadataDirective="REPLACE",
    )
    with pytest.raises(IntegrityError, match="0000"):
        s3.get("t/meta")


def test_foreign_object_without_digest_is_read_unverified(s3: S3Store, server: S3Server) -> None:
    server.client().put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/foreign", Body=b"from elsewhere")
    assert s3.get("foreign") == b"from elsewhere"
    assert s3.open("foreign").read() == b"from elsewhere"


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_bad_credentials_fail_fast(
    seaweedfs_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wrong: str
) -> None:
    srv = seaweedfs_server
    use_credentials(monkeypatch, tmp_path, srv)
    bucket = srv.new_bucket("auth")
    bad = "not-the-" + wrong + "-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY" if wrong == "secret" else "AWS_ACCESS_KEY_ID", bad)
    store = s3_store(srv, bucket, "p", retries=5)
    sent = count_requests(store)
    for call in (lambda: store.get("k"), lambda: store.put("k", b"x"), lambda: list(store.list())):
        with pytest.raises(StoreAuthError, match=srv.endpoint_url) as info:
            call()
        assert bad not in str(info.value)
    assert len(sent) == 3  # one HTTP request per call: no retries
    assert bad not in repr(store) + json.dumps(store.config())


def test_missing_bucket(server: S3Server) -> None:
    store = s3_store(server, f"no-such-bucket-{uuid.uuid4().hex[:8]}", "p")
    sent = count_requests(store)
    for call in (lambda: store.get("k"), lambda: list(store.list()), lambda: store.put("k", b"x")):
        with pytest.raises(StoreError, match=store.bucket) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert "does not exist" in str(info.value)
    assert len(sent) == 3


def test_missing_key_is_not_retried(s3: S3Store) -> None:
    sent = count_requests(s3)
    with pytest.raises(ObjectNotFound):
        s3.get("absent")
    assert not s3.exists("absent")
    assert len(sent) == 2


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def inject(store: S3Store, operation: str, answers: list[tuple[int, str]]) -> list[str]:
    """Answer the next len(answers) requests for ``operation`` with these S3 errors, unsent."""
    pending, sent = list(answers), []

    def handler(request: Any, **_: Any) -> AWSResponse | None:
        sent.append(request.url)
        if not pending:
            return None
        status, code = pending.pop(0)
        body = f"<Error><Code>{code}</Code><Message>Injected {code}.</Message></Error>".encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Body(body))

    store.client.meta.events.register(f"before-send.s3.{operation}", handler)
    return sent


def test_transient_errors_are_retried(
    moto_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_credentials(monkeypatch, tmp_path, moto_server)
    store = s3_store(moto_server, moto_server.new_bucket("retry"), "p", retries=3)
    store.put("k", b"value")
    sent = inject(store, "GetObject", [(503, "ServiceUnavailable"), (500, "InternalError")])
    assert store.get("k") == b"value"
    assert len(sent) == 3
    sent = inject(store, "PutObject", [(503, "SlowDown")])
    store.put("k2", b"v2")
    assert store.get("k2") == b"v2"
    assert len(sent) == 2


def test_auth_and_client_errors_are_not_retried(
    moto_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_credentials(monkeypatch, tmp_path, moto_server)
    store = s3_store(moto_server, moto_server.new_bucket("noretry"), "p", retries=3)
    sent = inject(store, "GetObject", [(403, "AccessDenied")])
    with pytest.raises(StoreAuthError, match=moto_server.endpoint_url):
        store.get("k")
    assert len(sent) == 1
    sent = inject(store, "HeadObject", [(501, "NotImplemented")])
    with pytest.raises(StoreError, match=r"does not implement"):
        store.exists("k")
    assert len(sent) == 1


def test_retries_are_bounded(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_credentials(monkeypatch, tmp_path, moto_server)
    store = s3_store(moto_server, moto_server.new_bucket("bounded"), "p", retries=2)
    sent = inject(store, "GetObject", [(503, "SlowDown")] * 10)
    with pytest.raises(StoreError, match="3 attempts") as info:
        store.get("k")
    assert "SlowDown" in str(info.value) and store.bucket in str(info.value)
    assert len(sent) == 3


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_server: S3Server) -> None:
    from tests._s3_servers import free_port

    use_credentials(monkeypatch, tmp_path, moto_server)
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store("bkt", endpoint_url=endpoint, path_style=True, region="us-east-1", retries=2)
    sent = count_requests(store)
    with pytest.raises(StoreError, match=endpoint.replace(".", r"\.")):
        store.get("k")
    assert len(sent) == 3


def _first_put_lands_then_503(store: S3Store, raw: Any, body: bytes) -> list[str]:
    """Before the first PutObject, put ``body`` under the digest of b"mine" ourselves; answer it 503."""
    calls: list[str] = []

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        calls.append(request.url)
        if len(calls) > 1:
            return None
        raw.put_object(Bucket=store.bucket, Key="p/k", Body=body, Metadata={"sha256": sha(b"mine")})
        return AWSResponse(request.url, 503, {}, _Body(b"<Error><Code>SlowDown</Code></Error>"))

    store.client.meta.events.register("before-send.s3.PutObject", hook)
    return calls


@pytest.mark.parametrize(
    ("landed", "puts"),
    [(b"mine", 2), (b"", 3), (b"m\0ne", 3)],
    ids=["its-own-commit", "torn-short", "torn-full-length"],
)
def test_if_absent_retry_after_a_lost_answer(
    landed: bytes, puts: int, moto_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PutObject whose answer was lost is retried and meets 412 (the object exists).

    Whole (our bytes under our digest), it is our own commit: done. Torn (a server killed
    mid-PUT kept our digest over fewer or other bytes; a single PUT is read back), it is
    removed and written again whole.
    """
    use_credentials(monkeypatch, tmp_path, moto_server)
    store = s3_store(moto_server, moto_server.new_bucket("lost"), "p", retries=3)
    calls = _first_put_lands_then_503(store, moto_server.client(), landed)
    store.put("k", b"mine", if_absent=True)
    assert len(calls) == puts
    assert store.get("k") == b"mine"
    with pytest.raises(ObjectExists):  # still commit-once: a second writer is refused
        store.put("k", b"other", if_absent=True)


def test_if_absent_multipart_race_is_refused_by_the_server(s3: S3Store) -> None:
    """The look-before-upload check misses a racing writer; the conditional complete still refuses."""
    store = S3Store.from_config(
        {**s3.config()["options"], "multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}
    )
    store.put("race", b"the winner", if_absent=True)
    heads = inject(store, "HeadObject", [(404, "NotFound")])  # the pre-check sees no object
    completes = count_requests(store._conditional_client(), "CompleteMultipartUpload")
    with pytest.raises(ObjectExists, match="race"):
        store.put("race", os.urandom(6 * MiB), if_absent=True)
    assert len(heads) == 1 and len(completes) == 1
    assert store.get("race") == b"the winner"


def test_no_credentials_is_an_auth_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = S3Server("none", "http://127.0.0.1:9", process=None)  # type: ignore[arg-type]
    use_credentials(monkeypatch, tmp_path, server)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = s3_store(server, "bkt", "p")
    with pytest.raises(StoreAuthError, match="credentials"):
        store.get("k")


# -- digests given and checked by the caller (staging uses them) ----------------------------


def test_get_checks_an_expected_digest(store: ObjectStore) -> None:
    store.put("dg/k", b"content", sha256=sha(b"content"))
    assert store.get("dg/k", sha256=sha(b"content")) == b"content"
    with pytest.raises(IntegrityError, match="dg/k"):
        store.get("dg/k", sha256=sha(b"something else"))
    with pytest.raises(IntegrityError):
        store.get_buffer("dg/k", sha256=sha(b"something else"))
    view = store.get_buffer("dg/k", sha256=sha(b"content"))
    view[:1] = b"C"  # the caller's own writable copy
    assert bytes(view) == b"Content" and store.get("dg/k") == b"content"
    store.put("dg/empty", b"")
    assert store.get("dg/empty", sha256=sha(b"")) == b"" and bytes(store.get_buffer("dg/empty")) == b""


def test_put_file_with_known_digest_skips_the_hashing_pass(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB)
    store.put_file("dg/file", io.BytesIO(data), sha256=sha(data))
    assert store.get("dg/file", sha256=sha(data)) == data
    if isinstance(store, S3Store):
        raw = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/dg/file")
        assert raw["Metadata"]["sha256"] == sha(data)


def test_large_reads_use_parallel_ranges(s3: S3Store, server: S3Server) -> None:
    store = S3Store.from_config({**s3.config()["options"], "range_size": 5 * MiB})
    data = os.urandom(12 * MiB + 7)
    store.put("ranged", data)
    gets = count_requests(store, "GetObject")
    assert store.get("ranged") == data
    assert len(gets) == 3  # 5 + 5 + 2 MiB, no HEAD first
    assert bytes(store.get_buffer("ranged", sha256=sha(data))) == data
    store.put("tail", data[: 10 * MiB + 100])
    gets.clear()
    assert store.get("tail") == data[: 10 * MiB + 100]
    assert len(gets) == 2  # 5 MiB, then 5 MiB + the 100-byte tail in one range
    forged = bytearray(data)
    forged[11 * MiB] ^= 1  # a byte in the last range
    server.client().put_object(
        Bucket=store.bucket, Key=f"{store.prefix}/ranged", Body=bytes(forged), Metadata={"sha256": sha(data)}
    )
    with pytest.raises(IntegrityError, match="ranged"):
        store.get("ranged")


def test_open_pins_an_etag(s3: S3Store) -> None:
    s3.put("etag/k", b"v1")
    etag = s3.client.head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/etag/k")["ETag"]
    with s3.open("etag/k", etag=etag) as f:
        assert f.read() == b"v1"
    s3.put("etag/k", b"v2, replaced")
    with pytest.raises(StoreError, match="no longer has ETag"):
        s3.open("etag/k", etag=etag)


# Last: it restarts the shared SeaweedFS server.
def test_seaweedfs_restart_keeps_data(
    seaweedfs_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srv = seaweedfs_server
    use_credentials(monkeypatch, tmp_path, srv)
    store = s3_store(srv, srv.new_bucket("restart"), "p", retries=1)
    store.put("durable", b"still here")
    srv.stop()
    try:
        with pytest.raises(StoreError, match=srv.endpoint_url):
            store.get("durable")
    finally:
        srv.start()
    assert store.get("durable") == b"still here"
