"""Triggers on moto: S3 -> SQS notifications (duplicated and lost), EventBridge, overwrites."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

import faas
from faas.triggers import (
    PollingSource,
    S3Bucket,
    SqsSource,
    TriggerRunner,
    TriggerState,
    setup_eventbridge,
    setup_notifications,
)
from runtime._s3 import S3Store
from tests import _s3_servers
from tests._s3_servers import S3Server
from tests.faas._trigger_helpers import EXEC_LOG_ENV, DropAndDuplicate, drive, executions, shout, wait_for

moto_server = _s3_servers.moto_server  # the session fixture, under its name


@pytest.fixture(scope="module")
def exec_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exec") / "executions.log"


@pytest.fixture(scope="module")
def client(moto_server: S3Server, exec_log: Path) -> Iterator[faas.Client]:
    saved = dict(os.environ)
    os.environ.update(moto_server.env())  # the pool's workers inherit these
    os.environ.update({"AWS_DEFAULT_REGION": "us-east-1", EXEC_LOG_ENV: str(exec_log)})
    store_bucket = moto_server.new_bucket("faas-store")
    store = S3Store(store_bucket, "faas", endpoint_url=moto_server.endpoint_url, path_style=True)
    c = faas.Client(store=store, workers=2, records="off")
    yield c
    c.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def sqs(moto_server: S3Server, client: faas.Client) -> Any:
    return boto3.client("sqs", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")


def new_queue(sqs: Any) -> str:
    return str(sqs.create_queue(QueueName=f"faas-{uuid.uuid4().hex[:12]}")["QueueUrl"])


def outputs(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("n", [100, pytest.param(500, marks=pytest.mark.slow)])
def test_objects_with_duplicated_and_lost_notifications(
    moto_server: S3Server,
    client: faas.Client,
    sqs: Any,
    exec_log: Path,
    n: int,
) -> None:
    """Every notification delivered twice, 10% not at all: each object runs once (500: the acceptance)."""
    s3, bucket, queue = moto_server.client(), moto_server.new_bucket("flood"), new_queue(sqs)
    binding = shout.with_client(client).on_object(
        bucket=bucket,
        prefix="in/",
        output_prefix="out/",
        queue_url=queue,
        poll_interval=3.0,
        max_concurrency=32,
        name=f"flood{n}",
    )
    setup_notifications(binding)
    inner = SqsSource(queue, endpoint_url=moto_server.endpoint_url)
    keys = [f"in/run {i // 100}/frame+{i:03d}.dat" for i in range(n)]  # spaces and '+' arrive URL-encoded
    dropped = set(keys[::10])
    flaky = DropAndDuplicate(inner, drop=lambda key: key in dropped)
    poller = PollingSource(S3Bucket(bucket, endpoint_url=moto_server.endpoint_url), "in/", 3.0)
    runner = TriggerRunner(
        client, bindings=[binding.name], functions=[shout], sources={binding.name: [flaky, poller]}
    )
    runner.run_once()  # the first listing finds an empty prefix
    runner.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=f"payload of {k}".encode()), keys))
    done = lambda: runner.metrics(binding.name)["counters"].get("done", 0)  # noqa: E731
    wait_for(lambda: done() == n and runner.idle() and flaky.pending() == 0, 120, f"{n} outputs")
    runner.stop()
    state = TriggerState(client.store, binding.name)
    assert len(state.done_ids()) == n and not state.dead_ids()

    outs = outputs(s3, bucket, "out/")
    assert len(outs) == n
    assert all(outs[binding.output_key(k)] == f"PAYLOAD OF {k.upper()}".encode() for k in keys)
    ran = [line for line in executions(exec_log) if line.startswith(bucket + "/")]
    assert len(ran) == n and len(set(ran)) == n, "every object's function ran exactly once"
    counters = runner.metrics(binding.name)["counters"]
    assert flaky.dropped == dropped and inner.skipped >= 1  # 10% lost; the s3:TestEvent skipped
    for key in dropped:  # the reconciler found the objects whose notifications were lost
        etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        claim = state.read_claim(binding.dedup_id(bucket, key, etag), 1)
        assert claim is not None and claim.origin == "listing"
    delivered = n - len(dropped)
    assert counters["duplicates"] >= delivered, counters
    assert len(flaky.delivered) == 2 * delivered  # every delivered notification arrived twice
    assert runner.metrics(binding.name)["max_inflight_seen"] <= 32


def test_setup_merges_with_the_existing_notification_configuration(
    moto_server: S3Server,
    client: faas.Client,
    sqs: Any,
) -> None:
    s3, bucket = moto_server.client(), moto_server.new_bucket("merge")
    other, queue = new_queue(sqs), new_queue(sqs)
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    existing = {"Id": "someone-else", "QueueArn": other_arn, "Events": ["s3:ObjectRemoved:*"]}
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [existing]}
    )
    binding = shout.with_client(client).on_object(
        bucket=bucket, prefix="raw/", suffix=".h5", output_prefix="cooked/", queue_url=queue, name="merge_me"
    )
    for _ in range(2):  # idempotent: the second call replaces its own entry only
        config = setup_notifications(binding)
    ids = sorted(q["Id"] for q in config["QueueConfigurations"])
    assert ids == ["faas-merge_me", "someone-else"]
    mine = next(q for q in config["QueueConfigurations"] if q["Id"] == "faas-merge_me")
    rules = {r["Name"].lower(): r["Value"] for r in mine["Filter"]["Key"]["FilterRules"]}
    assert rules == {"prefix": "raw/", "suffix": ".h5"}
    policy = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["Policy"])["Attributes"]["Policy"]
    assert "s3.amazonaws.com" in policy


def test_eventbridge_delivery_and_overwrites(
    moto_server: S3Server,
    client: faas.Client,
    sqs: Any,
    exec_log: Path,
) -> None:
    s3, bucket, queue = moto_server.client(), moto_server.new_bucket("bridge"), new_queue(sqs)
    binding = shout.with_client(client).on_object(
        bucket=bucket,
        prefix="in/",
        output_prefix="out/",
        queue_url=queue,
        poll_interval=600.0,
        name="bridged",
    )
    result = setup_eventbridge(binding)
    events = boto3.client("events", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    [target] = events.list_targets_by_rule(Rule="faas-bridged")["Targets"]
    assert target["Arn"].endswith(queue.rsplit("/", 1)[-1]) and result["rule_arn"].endswith("faas-bridged")
    runner = TriggerRunner(client, bindings=["bridged"], functions=[shout], wait_seconds=0.2)
    runner.run_once()  # the only listing for 10 minutes: what follows arrives through EventBridge
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.txt", Body=f"v1 {i}".encode())
    state = TriggerState(client.store, "bridged")
    drive(runner, lambda: len(state.done_ids()) == 5 and runner.idle(), 60, "5 outputs via EventBridge")
    assert runner.metrics("bridged")["counters"].get("claimed_notification") == 5
    s3.put_object(Bucket=bucket, Key="in/2.txt", Body=b"v2 overwritten")
    drive(runner, lambda: len(state.done_ids()) == 6 and runner.idle(), 60, "the overwrite processed")
    runner.stop()
    assert s3.get_object(Bucket=bucket, Key="out/2.txt.out")["Body"].read() == b"V2 OVERWRITTEN"
    ran = [line for line in executions(exec_log) if line.startswith(bucket + "/")]
    assert sorted(ran) == sorted([f"{bucket}/in/{i}.txt" for i in range(5)] + [f"{bucket}/in/2.txt"])
