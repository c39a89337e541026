"""Polling triggers on SeaweedFS, with the runner process (and its pool) SIGKILLed midway."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import faas
from faas.triggers import TriggerState
from runtime._s3 import S3Store
from tests import _s3_servers
from tests._s3_servers import S3Server
from tests.faas import _trigger_helpers
from tests.faas._trigger_helpers import (
    EXEC_LOG_ENV,
    ROOT,
    executions,
    kill_group,
    shout,
    start_runner,
    wait_for,
)

seaweedfs_server = _s3_servers.seaweedfs_server  # the session fixture, under its name
s3_env = _trigger_helpers.s3_env  # a fixture, shared with the other trigger tests


@pytest.mark.parametrize("n", [120, pytest.param(500, marks=pytest.mark.slow)])
def test_objects_polled_on_seaweedfs_with_the_pool_killed_midway(
    seaweedfs_server: S3Server,
    s3_env: dict[str, str],
    tmp_path: Path,
    n: int,
) -> None:
    """The runner process and its pool are SIGKILLed midway; a new one finishes (500: the acceptance)."""
    endpoint, bucket = seaweedfs_server.endpoint_url, seaweedfs_server.new_bucket("polled")
    store = S3Store(seaweedfs_server.new_bucket("faas-store"), "faas", endpoint_url=endpoint, path_style=True)
    client = faas.Client(store=store, workers=1, records="off")  # registers only; its pool never starts
    binding = shout.with_client(client).on_object(
        bucket=bucket,
        prefix="in/",
        output_prefix="out/",
        poll_interval=0.5,
        lease_seconds=3.0,
        max_concurrency=16,
        name=f"polled{n}",
    )
    exec_log, child_log = tmp_path / "executions.log", tmp_path / "runner.log"
    env = {**s3_env, EXEC_LOG_ENV: str(exec_log), "PYTHONPATH": str(ROOT)}
    state = TriggerState(store, binding.name)
    first = start_runner(store.url(), binding.name, env, child_log)
    s3 = seaweedfs_server.client()
    keys = [f"in/{i // 50:02d}/obj {i:03d}.txt" for i in range(n)]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=f"data {k}".encode()), keys))
        wait_for(lambda: len(state.done_ids()) >= n * 0.3, 60, "30% done by the first runner", 0.1)
    finally:
        kill_group(first)
    done_at_kill = len(state.done_ids())
    assert done_at_kill < n, "the kill came too late to test anything"
    second = start_runner(store.url(), binding.name, env, child_log)
    try:
        wait_for(lambda: len(state.done_ids()) == n, 120, "every object done after the restart", 0.2)
        wait_for(
            lambda: any(s["counters"].get("recovered") for s in state.statuses()), 30, "the takeover report"
        )
    finally:
        kill_group(second, signal.SIGTERM)

    outputs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
               for o in page.get("Contents", [])]  # fmt: skip
    assert sorted(outputs) == sorted(binding.output_key(k) for k in keys)
    for key in keys[::25]:
        body = s3.get_object(Bucket=bucket, Key=binding.output_key(key))["Body"].read()
        assert body == f"DATA {key.upper()}".encode()
    markers = [json.loads(store.get(f"triggers/bindings/{binding.name}/done/{i}")) for i in state.done_ids()]
    assert len(markers) == n and not state.dead_ids()
    assert not [m for m in markers if m["replaced"]], "an output was written twice"
    assert {m["event"]["key"] for m in markers} == set(keys)
    ran = executions(exec_log)
    assert set(ran) == {f"{bucket}/{k}" for k in keys}
    # Only the invocations in flight at the kill may have run twice (their outputs were committed once).
    assert len(ran) - n <= binding.max_concurrency, f"{len(ran) - n} re-executions"
