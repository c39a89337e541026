"""Trigger bindings made through ``FAAS_URL`` run inside ``faas serve`` (a real service subprocess).

The fast test binds through a RemoteClient on a file store; the acceptance
test processes objects on SeaweedFS with the service SIGKILLed and restarted
midway, and counts executions through a side channel.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import faas
from faas.triggers import TriggerState
from runtime._s3 import S3Store
from runtime._store import LocalStore
from tests._s3_servers import S3Server
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS, ServiceProc
from tests.faas._trigger_helpers import EXEC_LOG_ENV, PACE_ENV, executions, paced_shout, shout, wait_for


def write(root: Path, key: str, text: str) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # writers rename into place, as the guide asks


@pytest.fixture
def remote() -> Iterator[list[faas.RemoteClient]]:
    clients: list[faas.RemoteClient] = []
    yield clients
    for client in clients:
        client.shutdown()


def connect(
    service: ServiceProc, clients: list[faas.RemoteClient], tenant: str = "alice"
) -> faas.RemoteClient:
    client = faas.RemoteClient(service.url, token=TOKENS[tenant])
    clients.append(client)
    return client


@pytest.mark.parametrize("substrate", ["local", "globus-compute"])
def test_a_binding_made_through_a_remote_client_runs_in_the_service(
    tmp_path: Path, remote: list[faas.RemoteClient], substrate: str
) -> None:
    log = tmp_path / "executions.log"
    env = {EXEC_LOG_ENV: str(log)}
    with running_service(tmp_path / "service", extra_env=env, substrate=substrate) as service:
        alice = connect(service, remote)
        binding = shout.with_client(alice).on_object(
            bucket="data", prefix="in/", output_prefix="out/", poll_interval=0.1, name="shouting"
        )
        assert [b.name for b in alice.list_triggers()] == ["shouting"]
        assert connect(service, remote, "bob").list_triggers() == []  # another tenant's bindings are unseen

        data = service.store / "tenants" / "alice" / "data"  # relative directories live in alice's part
        for i in range(3):
            write(data, f"in/{i}.txt", f"hello {i}")
        state = TriggerState(LocalStore(service.store / "tenants" / "alice"), binding.name)
        wait_for(lambda: len(state.done_ids()) == 3, 60, "three objects done by the service", 0.05)
        for i in range(3):
            assert (data / f"out/{i}.txt.out").read_text() == f"HELLO {i}"
        assert sorted(executions(log)) == [f"{data.resolve()}/in/{i}.txt" for i in range(3)]

        # The invocations went through the service's submit path: they are alice's invocations.
        [marker] = [state.read_done(i) for i in list(state.done_ids())[:1]]
        assert marker is not None and marker["runner"].startswith("serve-")
        view = alice.invocation(marker["invocation_id"])
        assert view.status == "succeeded" and view.function_digest == binding.function_digest

        with pytest.raises(faas.BindingError, match="relative path"):  # refused by the service itself
            shout.with_client(alice).on_object(bucket=str(tmp_path / "x"), prefix="in/", output_prefix="out/")


N_OBJECTS = 80
CONCURRENCY = 8


@pytest.fixture
def s3_env(seaweedfs_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in {**seaweedfs_server.env(), "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return {**seaweedfs_server.env(), "AWS_DEFAULT_REGION": "us-east-1"}


def test_remote_binding_on_seaweedfs_survives_a_service_sigkill(
    seaweedfs_server: S3Server, s3_env: dict[str, str], tmp_path: Path, remote: list[faas.RemoteClient]
) -> None:
    """80 objects, the service SIGKILLed midway and restarted: 80 outputs, each written once."""
    endpoint, bucket = seaweedfs_server.endpoint_url, seaweedfs_server.new_bucket("served")
    store_bucket = seaweedfs_server.new_bucket("faas-store")
    log, root = tmp_path / "executions.log", tmp_path / "service"
    root.mkdir()
    service = ServiceProc(
        root,
        store_url=seaweedfs_server.store_url(store_bucket, "faas"),
        extra_env={**s3_env, EXEC_LOG_ENV: str(log), PACE_ENV: "0.2"},
    ).start(timeout=120)
    try:
        binding = paced_shout.with_client(connect(service, remote)).on_object(
            bucket=bucket, prefix="in/", output_prefix="out/", poll_interval=0.3, max_concurrency=CONCURRENCY
        )  # the default 60 s lease: the restarted service resumes its own claims without waiting it out
        tenant_store = S3Store(store_bucket, "faas/tenants/alice", endpoint_url=endpoint, path_style=True)
        state = TriggerState(tenant_store, binding.name)
        s3 = seaweedfs_server.client()
        keys = [f"in/{i // 20:02d}/obj {i:03d}.txt" for i in range(N_OBJECTS)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=f"data {k}".encode()), keys))
        wait_for(lambda: len(state.done_ids()) >= N_OBJECTS // 4, 120, "a quarter done before the kill", 0.05)
    finally:
        service.kill()
    done_at_kill = len(state.done_ids())
    assert done_at_kill < N_OBJECTS, "the kill came too late to test anything"
    service.start(timeout=120)
    try:
        wait_for(lambda: len(state.done_ids()) == N_OBJECTS, 180, "every object done after the restart", 0.2)
        wait_for(
            lambda: any(s["counters"].get("resumed") for s in state.statuses()), 30, "the resumption report"
        )
        alice = connect(service, remote)
        markers = [json.loads(tenant_store.get(state.done_key(i))) for i in state.done_ids()]
        views = [alice.invocation(m["invocation_id"]) for m in markers[:: N_OBJECTS // 8]]
    finally:
        service.stop()

    outputs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
               for o in page.get("Contents", [])]  # fmt: skip
    assert sorted(outputs) == sorted(binding.output_key(k) for k in keys)
    for key in keys[::10]:
        body = s3.get_object(Bucket=bucket, Key=binding.output_key(key))["Body"].read()
        assert body == f"DATA {key.upper()}".encode()
    assert len(markers) == N_OBJECTS and not state.dead_ids()
    assert {m["event"]["key"] for m in markers} == set(keys)
    assert not [m for m in markers if m["replaced"]], "an output was written twice"
    assert all(m["attempt"] == 1 for m in markers), "a claim was taken over instead of resumed"
    assert all(v.status == "succeeded" for v in views)
    ran = executions(log)
    assert set(ran) == {f"{bucket}/{k}" for k in keys}
    # Only invocations cut off by the kill ran twice: those the index replayed, at most the in-flight bound.
    replayed = sum(int(n) for n in re.findall(r"Requeued (\d+) invocations", service.log.read_text()))
    assert 0 < replayed <= CONCURRENCY, service.log.read_text()[-3000:]
    assert len(ran) - N_OBJECTS <= replayed, f"{len(ran) - N_OBJECTS} re-executions, {replayed} replayed"
