"""The Globus Compute cloud backend, tested up to the SDK boundary (no cloud is reachable here).

Real: the SDK's ``Executor`` and ``Client`` (function registration, batching,
task submission thread, ``ComputeSerializer``, result matching and
deserialisation in its ``_ResultWatcher``), the endpoint's own
``execute_task`` running each task in a separate spawned process, the faas
runtime on that "endpoint" (``run_cloud_invocation`` -> ``run_invocation`` ->
``execute``), the CPU engine on the tiny model, and a real S3 server
(SeaweedFS, which checks signatures) for the store.

Faked: the two network edges of the SDK. ``Client._compute_web_client`` (the
HTTPS API of the web service) is a loopback object that stores registered
functions, builds each task's buffer from the function and the batch's
argument buffers as the service does, and hands it to ``execute_task``; the
AMQP results queue is replaced by a subclass of the SDK's ``_ResultWatcher``
whose thread takes the packed Result messages from the loopback instead of
from RabbitMQ and feeds them to the SDK's own ``_on_message`` and
``_match_results_to_futures``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import faas
from faas.clients._gc_cloud import ENDPOINT_ENV, GlobusComputeCloudClient, run_cloud_invocation
from runtime import InvocationError, InvocationTimeout, Model, NotFoundError
from runtime._errors import GlobusComputeConfigError
from runtime._records import RecordStore
from runtime._wire import Invocation
from tests._s3_servers import S3Server, aws_env

pytest.importorskip("globus_compute_sdk")
pytest.importorskip("globus_compute_endpoint")

from globus_compute_sdk import Executor
from globus_compute_sdk.serialize import ComputeSerializer

from tests.faas._gc_cloud_helpers import (
    ENDPOINT,
    LoopbackComputeService,
    cloud_client,
    cloud_store_url,
    endpoint_engine,
    loopback_service,
    never,
)

PROMPT = "The quick brown"
GREEDY = {"max_new_tokens": 8, "temperature": 0}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(seaweedfs_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with aws_env(seaweedfs_server, tmp_path_factory.mktemp("aws")):  # the endpoint's workers inherit it
        yield seaweedfs_server


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with endpoint_engine(tiny_model_path, tmp_path_factory.mktemp("gc-engine")) as url:
        yield url


@pytest.fixture(scope="module")
def store_url(s3: S3Server, tiny_model_path: Path) -> str:
    return cloud_store_url(s3, tiny_model_path)


@pytest.fixture(scope="module")
def service(
    engine: str, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoopbackComputeService]:
    with loopback_service(engine, tmp_path_factory.mktemp("gc-run")) as svc:
        yield svc


@pytest.fixture(scope="module")
def executors() -> list[Executor]:
    return []


@pytest.fixture(scope="module")
def cloud(
    service: LoopbackComputeService, store_url: str, executors: list[Executor]
) -> Iterator[GlobusComputeCloudClient]:
    with cloud_client(service, store_url, executors) as client:
        yield client


def bound(fn: faas.Function[Any], client: GlobusComputeCloudClient) -> faas.Function[Any]:
    return fn.with_client(client)


# -- the functions users write ------------------------------------------------------------------
@faas.function(model="tiny-llama", timeout=120)
def complete_and_echo(model: faas.Model, prompt: str, blob: bytes) -> dict[str, Any]:
    return {
        "text": model.generate(prompt, GREEDY).text,
        "sha": hashlib.sha256(blob).hexdigest(),
        "echo": blob[::-1],
        "pid": os.getpid(),
        "engine_url": os.environ.get("FAAS_ENGINE_URL"),
    }


@faas.function()
def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


@faas.function()
def refuse(n: int) -> None:
    raise ValueError(f"bad input {n}")


@faas.function(timeout=0.5)
def too_slow() -> str:
    time.sleep(30)  # the workload: it outlives its deadline on the endpoint
    return "late"


@faas.function(retries=1)
def one() -> int:
    return 1


# -- tests --------------------------------------------------------------------------------------
def test_submit_runs_on_the_endpoint_and_large_values_travel_through_s3(
    cloud: GlobusComputeCloudClient, service: LoopbackComputeService, engine: str
) -> None:
    big = os.urandom(3 << 20)
    fn = bound(complete_and_echo, cloud)
    sent = len(service.submissions)
    future = fn.submit(PROMPT, big)
    assert isinstance(future, faas.Future)
    out = future.result(180)

    direct = Model(engine, "tiny-llama", timeout=60)
    try:
        expected = direct.generate(PROMPT, GREEDY).text
    finally:
        direct.close()
    assert out["text"] == expected and out["text"].strip()
    assert out["sha"] == hashlib.sha256(big).hexdigest()
    assert out["echo"] == big[::-1]  # a 3 MiB result, staged by the endpoint and read back here
    assert out["pid"] != os.getpid() and out["engine_url"] == engine

    bodies = service.submissions[sent:]
    assert len(bodies) == 1 and len(bodies[0]) < 16 << 10, "the task must carry references, not the values"
    # the SDK registered the endpoint-side entry point, by reference, not by value
    names = [r["function_name"] for r in service.registrations]
    assert "run_cloud_invocation" in names
    code = service.registrations[names.index("run_cloud_invocation")]["function_code"]
    assert len(code) < 1000
    (fn_payload,) = ComputeSerializer.unpack_buffers(code)
    assert ComputeSerializer().deserialize(fn_payload) is run_cloud_invocation

    cloud.flush_records(30)
    record = cloud.records.get(future.invocation_id)
    assert record.status == "succeeded" and record.model == "tiny-llama@1"
    assert record.args is not None and record.args.staged_bytes >= len(big)
    assert record.result is not None and record.result.staged_bytes >= len(big)
    assert record.worker_pid == out["pid"]


def test_many_invocations_share_one_executor(
    cloud: GlobusComputeCloudClient, executors: list[Executor], service: LoopbackComputeService
) -> None:
    before = len(executors)
    results = list(bound(square, cloud).map(range(16)))
    assert [r[0] for r in results] == [x * x for x in range(16)]
    pids = {r[1] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert len(executors) == max(before, 1)


def test_a_user_error_comes_back_as_its_own_type(cloud: GlobusComputeCloudClient) -> None:
    with pytest.raises(ValueError, match="bad input 7") as info:
        bound(refuse, cloud).remote(7)
    assert "refuse" in getattr(info.value, "remote_traceback", "")


def test_the_deadline_is_kept_on_the_endpoint(cloud: GlobusComputeCloudClient) -> None:
    started = time.monotonic()
    with pytest.raises(InvocationTimeout, match="deadline"):
        bound(too_slow, cloud).submit().result(60)
    assert time.monotonic() - started < 20


def test_a_refused_send_fails_clearly_and_the_next_submit_gets_a_new_executor(
    cloud: GlobusComputeCloudClient, service: LoopbackComputeService, executors: list[Executor]
) -> None:
    bound(one, cloud).remote()  # an executor exists
    made = len(executors)
    service.refuse.append(RuntimeError("503 Service Unavailable (loopback)"))
    with pytest.raises(InvocationError, match=r"could not run invocation .* 503 Service Unavailable"):
        bound(square, cloud).remote(3)
    assert bound(square, cloud).remote(4)[0] == 16
    assert len(executors) == made + 1 and executors[made - 1]._stopped


def test_retries_resend_after_a_failed_send(
    cloud: GlobusComputeCloudClient, service: LoopbackComputeService
) -> None:
    service.refuse.append(RuntimeError("502 Bad Gateway (loopback)"))
    retried = cloud.counters["retried"]
    assert bound(one, cloud).remote() == 1
    assert cloud.counters["retried"] == retried + 1


def test_attach_reads_recorded_results_and_says_what_it_cannot_do(
    cloud: GlobusComputeCloudClient, store_url: str
) -> None:
    future = bound(square, cloud).submit(9)
    assert cloud.attach(future.invocation_id) is future  # in flight here, or done: the same future
    assert future.result(120)[0] == 81
    cloud.flush_records(30)

    other = GlobusComputeCloudClient(ENDPOINT, store=store_url, executor_factory=never)
    try:
        assert other.attach(future.invocation_id).result(30)[0] == 81
        pending = Invocation(id=uuid.uuid4().hex, function_name="f", function_digest="0" * 64, args=b"")
        RecordStore(other.store).write_request(pending)
        with pytest.raises(faas.UnsupportedOperationError, match="SDK task id"):
            other.attach(pending.id)
        with pytest.raises(NotFoundError, match="No invocation"):
            other.attach("no-such-invocation")
        with pytest.raises(faas.UnsupportedOperationError, match="not reachable from here"):
            other.model_handle("tiny-llama")
    finally:
        other.shutdown()


# -- configuration errors: raised before any work -----------------------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (ENDPOINT_ENV, "FAAS_STORE", "GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_from_env_needs_an_endpoint(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FAAS_STORE", "s3://bucket/prefix")
    with pytest.raises(GlobusComputeConfigError, match=r"\$FAAS_GC_ENDPOINT is not set"):
        GlobusComputeCloudClient.from_env(executor_factory=never)


def test_from_env_needs_a_store(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENDPOINT_ENV, ENDPOINT)
    with pytest.raises(GlobusComputeConfigError, match=r"\$FAAS_STORE is not set"):
        GlobusComputeCloudClient.from_env(executor_factory=never)


def test_a_local_store_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(ENDPOINT_ENV, ENDPOINT)
    clean_env.setenv("FAAS_STORE", (tmp_path / "store").as_uri())
    with pytest.raises(GlobusComputeConfigError, match="cannot read this machine's files"):
        GlobusComputeCloudClient.from_env(executor_factory=never)
    assert not (tmp_path / "store").exists()


def test_an_endpoint_id_must_be_a_uuid() -> None:
    with pytest.raises(GlobusComputeConfigError, match="is not a UUID"):
        GlobusComputeCloudClient("my-cluster", store="s3://bucket/prefix", executor_factory=never)


def test_half_a_client_identity_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENDPOINT_ENV, ENDPOINT)
    clean_env.setenv("FAAS_STORE", "s3://bucket/prefix")
    clean_env.setenv("GLOBUS_COMPUTE_CLIENT_ID", "5c0e6a52-0000-4000-8000-000000000000")
    with pytest.raises(GlobusComputeConfigError, match=r"GLOBUS_COMPUTE_CLIENT_SECRET is not"):
        GlobusComputeCloudClient.from_env(executor_factory=never)


def test_from_env_builds_a_client_without_touching_the_network(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENDPOINT_ENV, ENDPOINT.upper())
    clean_env.setenv("FAAS_STORE", "s3://bucket/prefix?region=us-east-1")
    client = GlobusComputeCloudClient.from_env(executor_factory=never)
    try:
        assert client.endpoint_id == ENDPOINT and client.store.config()["kind"] == "s3"
        assert client.status()["counters"]["executors"] == 0
    finally:
        client.shutdown()


def test_run_cloud_invocation_counts_the_deadline_from_the_task_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []

    def fake_run(dispatch_json: str) -> str:
        seen.append(json.loads(dispatch_json))
        return "{}"

    monkeypatch.setattr("faas.clients._gc_cloud.run_invocation", fake_run)
    before = time.time()
    run_cloud_invocation("{}", json.dumps({"model_name": None, "timeout": 30}))
    run_cloud_invocation("{}", json.dumps({"model_name": None, "timeout": None}))
    assert "timeout" not in seen[0] and before + 30 <= seen[0]["deadline"] <= time.time() + 30
    assert seen[1]["deadline"] is None
