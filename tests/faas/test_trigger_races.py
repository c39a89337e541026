"""Trigger races on SeaweedFS (issue 16, item 2).

One object's notification delivered to two runners at the same instant; a
runner process SIGKILLed between claim and finish, and two successors racing
to take it over; a runner SIGSTOPped past its lease that comes back after the
takeover; two ``faas serve`` processes on one store listing the same bucket.
Each object version must give one output and one committed execution, whoever
races for it. Executions are counted through a side channel (the execution log
of :func:`tests.faas._trigger_helpers.gated_shout`: a ``start`` and an ``end``
line per execution), commits through the done markers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import faas
from faas.triggers import ObjectEvent, TriggerRunner, TriggerState
from faas.triggers._state import read_heartbeat
from registry import TriggerBinding
from runtime import ObjectExists
from runtime._s3 import S3Store
from tests import _s3_servers
from tests._s3_servers import S3Server
from tests.faas import _trigger_helpers
from tests.faas._service_proc import TOKENS, ServiceProc
from tests.faas._trigger_helpers import (
    EXEC_LOG_ENV,
    GATE_ENV,
    ROOT,
    TAG_ENV,
    await_ready,
    gated_shout,
    kill_group,
    phases,
    spawn_runner,
    wait_for,
)

seaweedfs_server = _s3_servers.seaweedfs_server  # the session fixture, under its name
s3_env = _trigger_helpers.s3_env  # a fixture, shared with the other trigger tests


class RecordingStore(S3Store):
    """An S3Store that records each commit-once claim write: when it started and ended, and if it won."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claims: dict[str, tuple[float, float, bool]] = {}

    def put(self, key: str, data: bytes, *, if_absent: bool = False, sha256: str | None = None) -> None:
        if not (if_absent and "/seen/" in key):
            return super().put(key, data, if_absent=if_absent, sha256=sha256)
        start = time.monotonic()
        try:
            super().put(key, data, if_absent=True, sha256=sha256)
        except ObjectExists:
            self.claims[key] = (start, time.monotonic(), False)
            raise
        self.claims[key] = (start, time.monotonic(), True)
        return None


class RacingSource:
    """A notification source that delivers the event it is handed once both runners poll for it.

    Both runners' sources share one barrier: each delivery returns from ``poll``
    in both runner threads at the same instant, so both claim it at once.
    """

    name = "racing"

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier
        self.next: ObjectEvent | None = None
        self.acked: list[ObjectEvent] = []

    def poll(self, wait: float) -> list[ObjectEvent]:
        ev, self.next = self.next, None
        if ev is None:
            return []
        self.barrier.wait(timeout=30)
        return [ev]

    def ack(self, events: Sequence[ObjectEvent]) -> None:
        self.acked += events

    def close(self) -> None:
        pass


def outputs(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


N_RACED = 30


def test_one_notification_delivered_to_two_runners_at_the_same_instant(
    seaweedfs_server: S3Server, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 objects, each notified to two runners released by a barrier: one claim, execution, output each."""
    exec_log = tmp_path / "executions.log"
    monkeypatch.setenv(EXEC_LOG_ENV, str(exec_log))
    endpoint, bucket = seaweedfs_server.endpoint_url, seaweedfs_server.new_bucket("raced")
    store_bucket = seaweedfs_server.new_bucket("faas-store")
    stores = [RecordingStore(store_bucket, "faas", endpoint_url=endpoint, path_style=True) for _ in range(2)]
    clients = [faas.Client(store=s, workers=1, records="off") for s in stores]
    binding = gated_shout.with_client(clients[0]).on_object(
        bucket=bucket, prefix="in/", output_prefix="out/", max_concurrency=8, name="raced"
    )
    barrier = threading.Barrier(2)
    sources = [RacingSource(barrier), RacingSource(barrier)]
    runners = [
        TriggerRunner(
            c,
            bindings=["raced"],
            functions=[gated_shout],
            sources={"raced": [src]},
            runner_id=f"racer-{i}",
            wait_seconds=0.0,
        )
        for i, (c, src) in enumerate(zip(clients, sources, strict=True))
    ]
    s3 = seaweedfs_server.client()
    keys = [f"in/obj {i:03d}.txt" for i in range(N_RACED)]
    events = []
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=f"data {key}".encode())
        head = s3.head_object(Bucket=bucket, Key=key)
        etag = str(head["ETag"]).strip('"')
        events.append(ObjectEvent(bucket, key, etag, head["ContentLength"], time.time(), receipt=f"m{i}"))

    def deliver(i: int) -> None:
        for ev in events:  # both runners get the same event in the same round, released together
            sources[i].next = ev
            runners[i].run_once()

    state = TriggerState(stores[0], "raced")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(deliver, range(2)))
        deadline = time.monotonic() + 60
        while not (len(state.done_ids()) == N_RACED and all(r.idle() for r in runners)):
            assert time.monotonic() < deadline, [r.metrics_all() for r in runners]
            for runner in runners:
                runner.run_once()
    finally:
        for runner in runners:
            runner.stop(timeout=10)
        for client in clients:
            client.shutdown()

    # Both runners tried to claim every object; exactly one won each, and most tries overlapped in time.
    ids = [binding.dedup_id(bucket, ev.key, ev.etag) for ev in events]
    overlaps = 0
    for id in ids:
        claim_key = state.claim_key(id, 1)
        (s0, e0, won0), (s1, e1, won1) = stores[0].claims[claim_key], stores[1].claims[claim_key]
        assert won0 != won1, f"{id}: claim won by {won0=} {won1=}"
        overlaps += max(s0, s1) < min(e0, e1)
    wins = [sum(stores[i].claims[state.claim_key(id, 1)][2] for id in ids) for i in range(2)]
    counters = [r.metrics("raced")["counters"] for r in runners]
    print(f"\nraces: {N_RACED}, claim requests in flight together: {overlaps}, wins per runner: {wins}")
    print(f"counters: {counters}")
    assert overlaps >= N_RACED // 3, f"only {overlaps} of {N_RACED} claims raced: the test missed its window"

    assert sum(c.get("claimed_notification", 0) for c in counters) == N_RACED
    assert sum(c.get("duplicates", 0) for c in counters) == N_RACED  # each loser saw the claim taken
    assert sum(c.get("done", 0) for c in counters) == N_RACED
    assert all(len(src.acked) == N_RACED for src in sources)  # both acknowledge: the event is recorded
    assert state.done_ids() == set(ids) and not state.dead_ids()
    assert state.attempts() == dict.fromkeys(ids, 1)
    markers = [state.read_done(id) for id in ids]
    assert all(m is not None and m["state"] == "done" and not m["replaced"] for m in markers)
    assert sorted(outputs(s3, bucket, "out/")) == sorted(binding.output_key(k) for k in keys)
    for key in keys[::7]:
        body = s3.get_object(Bucket=bucket, Key=binding.output_key(key))["Body"].read()
        assert body == f"DATA {key.upper()}".encode()
    logged = Counter((phase, where) for phase, _tag, where in phases(exec_log))
    print(f"executions: starts {sum(logged[('start', f'{bucket}/{k}')] for k in keys)}, "
          f"ends {sum(logged[('end', f'{bucket}/{k}')] for k in keys)}")  # fmt: skip
    for key in keys:
        assert logged[("start", f"{bucket}/{key}")] == 1, (
            f"{key} started {logged[('start', f'{bucket}/{key}')]} times"
        )
        assert logged[("end", f"{bucket}/{key}")] == 1, f"{key} finished more than once"


N_HELD = 4


@dataclass
class Held:
    """A binding of :func:`gated_shout` on SeaweedFS, with its objects uploaded (nothing runs yet)."""

    binding: TriggerBinding
    store: S3Store
    state: TriggerState
    s3: Any
    bucket: str
    keys: list[str]
    ids: dict[str, str]
    env: dict[str, str]
    exec_log: Path
    child_log: Path

    def started(self, tag: str) -> set[str]:
        """The objects whose execution started in runner ``tag``'s processes."""
        return {w for phase, t, w in phases(self.exec_log) if phase == "start" and t == tag}

    def outputs(self) -> list[str]:
        return outputs(self.s3, self.bucket, "out/")

    def start(self, tag: str, *, gate: Path | None = None) -> subprocess.Popen[bytes]:
        """Spawn a runner process with id ``tag`` (its invocations wait for ``gate``)."""
        env = {**self.env, TAG_ENV: tag, **({GATE_ENV: str(gate)} if gate else {})}
        return spawn_runner(self.store.url(), self.binding.name, env, self.child_log, "gated_shout", tag)

    def check_held(self, runner: str) -> None:
        """Every object claimed by ``runner`` and started in none but it; nothing finished or committed."""
        claims = [self.state.read_claim(self.ids[k], 1) for k in self.keys]
        assert all(c is not None and c.runner == runner and c.state == "claimed" for c in claims), claims
        assert not self.state.done_ids() and not self.outputs(), "the runner stopped after a commit"
        assert not [p for p in phases(self.exec_log) if p[0] == "end"], "an execution finished already"
        assert self.started(runner) and {t for _p, t, _w in phases(self.exec_log)} == {runner}

    def check_once(self, winners: tuple[str, ...]) -> list[dict[str, Any]]:
        """One output and one done marker per object, committed at attempt 2 by one of ``winners``."""
        assert sorted(self.outputs()) == sorted(self.binding.output_key(k) for k in self.keys)
        for key in self.keys:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.binding.output_key(key))["Body"].read()
            assert body == f"DATA {key.upper()}".encode()
        markers = [json.loads(self.store.get(self.state.done_key(self.ids[k]))) for k in self.keys]
        assert all(m["state"] == "done" and not m["replaced"] for m in markers), "an output was written twice"
        assert all(m["attempt"] == 2 and m["runner"] in winners for m in markers), markers
        assert self.state.attempts() == {self.ids[k]: 2 for k in self.keys}, "taken over more than once"
        assert not self.state.dead_ids()
        return markers


@pytest.fixture
def held(seaweedfs_server: S3Server, s3_env: dict[str, str], tmp_path: Path) -> Held:
    endpoint, bucket = seaweedfs_server.endpoint_url, seaweedfs_server.new_bucket("held")
    store = S3Store(seaweedfs_server.new_bucket("faas-store"), "faas", endpoint_url=endpoint, path_style=True)
    client = faas.Client(store=store, workers=1, records="off")  # registers only; its pool never starts
    binding = gated_shout.with_client(client).on_object(
        bucket=bucket, prefix="in/", output_prefix="out/", poll_interval=0.3, lease_seconds=2.0,
        max_concurrency=8, name="held",
    )  # fmt: skip
    exec_log = tmp_path / "executions.log"
    s3 = seaweedfs_server.client()
    keys = [f"in/held {i}.txt" for i in range(N_HELD)]
    ids = {}
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=f"data {key}".encode())
        ids[key] = binding.dedup_id(
            bucket, key, str(s3.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')
        )
    env = {**s3_env, EXEC_LOG_ENV: str(exec_log), "PYTHONPATH": str(ROOT)}
    state = TriggerState(store, "held")
    return Held(binding, store, state, s3, bucket, keys, ids, env, exec_log, tmp_path / "runner.log")


def ends(held: Held, tag: str | None = None) -> Counter[str]:
    return Counter(w for phase, t, w in phases(held.exec_log) if phase == "end" and tag in (None, t))


def test_a_runner_killed_between_claim_and_finish_is_taken_over_once(
    held: Held, seaweedfs_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner process is SIGKILLed while its invocations wait at a gate; two successors race to take over.

    The successors run in this process, released by a barrier once the dead
    runner's heartbeat is older than the lease: both try to claim every
    takeover (attempt 2) in their first pass, and one wins each.
    """
    gate = tmp_path / "gate-that-never-opens"
    first = await_ready(held.start("first", gate=gate), held.child_log)
    try:
        wait_for(
            lambda: len(held.state.attempts()) == N_HELD and bool(held.started("first")),
            60,
            "claims, a start",
        )
    finally:
        kill_group(first)
    held.check_held("first")  # the kill landed between claim and finish
    starts_first = held.started("first")

    lease = held.binding.lease_seconds
    wait_for(
        lambda: time.time() - float((read_heartbeat(held.store, "first") or {}).get("beat_at", 0)) > lease,
        30, "the dead runner's lease to run out",
    )  # fmt: skip
    monkeypatch.setenv(EXEC_LOG_ENV, str(held.exec_log))  # the successors' pool workers inherit these
    monkeypatch.setenv(TAG_ENV, "second")
    stores = [
        RecordingStore(held.store.bucket, "faas", endpoint_url=seaweedfs_server.endpoint_url, path_style=True)
        for _ in range(2)
    ]
    clients = [faas.Client(store=s, workers=1, records="off") for s in stores]
    names = ("second-a", "second-b")
    runners = [
        TriggerRunner(c, bindings=["held"], functions=[gated_shout], runner_id=n, wait_seconds=0.0)
        for c, n in zip(clients, names, strict=True)
    ]
    barrier = threading.Barrier(2)

    def first_pass(runner: TriggerRunner) -> None:
        barrier.wait(timeout=30)
        runner.run_once()  # lists the prefix and the records, finds the dead holder, claims attempt 2

    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(first_pass, runners))
        deadline = time.monotonic() + 60
        while not (len(held.state.done_ids()) == N_HELD and all(r.idle() for r in runners)):
            assert time.monotonic() < deadline, [r.metrics_all() for r in runners]
            for runner in runners:
                runner.run_once()
        counters = {r.id: r.metrics("held")["counters"] for r in runners}
    finally:
        for runner in runners:
            runner.stop(timeout=10)
        for client in clients:
            client.shutdown()

    markers = held.check_once(names)
    takeovers = [held.state.claim_key(held.ids[k], 2) for k in held.keys]
    tries = [[s.claims.get(key) for s in stores] for key in takeovers]
    assert all(a is not None and b is not None and a[2] != b[2] for a, b in tries), (
        f"each takeover contested by both successors, won by one: {tries}"
    )
    overlaps = sum(max(a[0], b[0]) < min(a[1], b[1]) for a, b in tries if a and b)
    expected = Counter({f"{held.bucket}/{k}" for k in held.keys})
    starts_after = Counter(w for phase, t, w in phases(held.exec_log) if phase == "start" and t == "second")
    print(
        f"\nstarts by the killed runner: {len(starts_first)}, starts after: {sum(starts_after.values())}, "
        f"ends: {sum(ends(held).values())}, commits: {dict(Counter(m['runner'] for m in markers))}, "
        f"takeover claims in flight together: {overlaps} of {N_HELD}, successors' counters: {counters}"
    )
    assert ends(held) == expected, "each object finished once"
    assert starts_after == expected, "each object ran once after the kill"
    assert sum(c.get("done", 0) for c in counters.values()) == N_HELD
    assert sum(c.get("recovered", 0) for c in counters.values()) == N_HELD, "only won takeovers count"


def test_a_paused_runner_that_comes_back_after_the_takeover_commits_nothing(
    held: Held, tmp_path: Path
) -> None:
    """A runner is SIGSTOPped mid-attempt, taken over after its lease, then resumed: its late results lose."""
    gate = tmp_path / "gate"
    first = await_ready(held.start("first", gate=gate), held.child_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: len(held.state.attempts()) == N_HELD and bool(held.started("first")),
            60,
            "claims, a start",
        )
        os.killpg(first.pid, signal.SIGSTOP)  # the runner and its pool: no heartbeat, no progress
        held.check_held("first")  # paused between claim and finish
        second = await_ready(held.start("second"), held.child_log)
        wait_for(lambda: len(held.state.done_ids()) == N_HELD, 60, "every object done by the successor", 0.1)
        written = {k: held.s3.head_object(Bucket=held.bucket, Key=k)["ETag"] for k in held.outputs()}
        gate.touch()
        os.killpg(first.pid, signal.SIGCONT)  # its held invocations finish now, after the takeover

        def first_report() -> dict[str, int]:
            return next((s["counters"] for s in held.state.statuses() if s["runner"] == "first"), {})

        wait_for(
            lambda: sum(first_report().get(k, 0) for k in ("done", "done_elsewhere", "retry")) == N_HELD,
            60, "the resumed runner to finish its attempts",
        )  # fmt: skip
    finally:
        for proc in (first, second):
            if proc is not None:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGCONT)  # a stopped process would not see SIGTERM
                kill_group(proc, signal.SIGTERM)

    markers = held.check_once(("second",))
    report = first_report()
    expected = Counter({f"{held.bucket}/{k}" for k in held.keys})
    print(
        f"\nstarts: first {len(held.started('first'))}, second {len(held.started('second'))}; "
        f"ends: first {sum(ends(held, 'first').values())}, second {sum(ends(held, 'second').values())}; "
        f"commits: {dict(Counter(m['runner'] for m in markers))}; the resumed runner's counters: {report}"
    )
    assert report.get("done_elsewhere") == N_HELD and not report.get("done"), report
    assert ends(held, "second") == expected and ends(held, "first") == expected  # both ran; one committed
    after = {k: held.s3.head_object(Bucket=held.bucket, Key=k)["ETag"] for k in held.outputs()}
    assert after == written, "the resumed runner rewrote an output"


N_SERVED = 40


def test_two_services_sharing_a_store_run_each_object_once(
    seaweedfs_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Two ``faas serve`` processes on one store list the same bucket: 40 objects, each run once."""
    endpoint, bucket = seaweedfs_server.endpoint_url, seaweedfs_server.new_bucket("shared")
    store_bucket = seaweedfs_server.new_bucket("faas-store")
    exec_log = tmp_path / "executions.log"
    services = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        services.append(
            ServiceProc(
                tmp_path / name,
                store_url=seaweedfs_server.store_url(store_bucket, "faas"),
                extra_env={**s3_env, EXEC_LOG_ENV: str(exec_log), TAG_ENV: name},
            )
        )
    tenant_store = S3Store(store_bucket, "faas/tenants/alice", endpoint_url=endpoint, path_style=True)
    state = TriggerState(tenant_store, "served")
    s3 = seaweedfs_server.client()
    keys = [f"in/obj {i:03d}.txt" for i in range(N_SERVED)]
    remote: faas.RemoteClient | None = None
    try:
        services[0].start(timeout=120)
        remote = faas.RemoteClient(services[0].url, token=TOKENS["alice"])
        binding = gated_shout.with_client(remote).on_object(
            bucket=bucket, prefix="in/", output_prefix="out/", poll_interval=0.2, max_concurrency=8,
            name="served",
        )  # fmt: skip
        services[1].start(timeout=120)  # finds alice's binding in the shared store when it starts
        wait_for(lambda: len(state.statuses()) == 2, 60, "both services running the binding", 0.1)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=f"data {k}".encode()), keys))
        wait_for(lambda: len(state.done_ids()) == N_SERVED, 120, "every object done", 0.1)
        runner_ids = {m["runner"] for m in (state.read_done(i) for i in state.done_ids()) if m}

        def tried(c: dict[str, int]) -> int:
            return c.get("claimed_listing", 0) + c.get("duplicates", 0)

        def reported() -> bool:  # the reports lag: every claim tried, every object committed
            counters = [s["counters"] for s in state.statuses()]
            done = sum(c.get("done", 0) for c in counters)
            return [tried(c) for c in counters] == [N_SERVED, N_SERVED] and done == N_SERVED

        wait_for(reported, 30, "both services' reports of a claim tried for every object")
        counters = [s["counters"] for s in state.statuses()]
    finally:
        if remote is not None:
            remote.shutdown()
        for service in services:
            service.stop()

    assert sorted(outputs(s3, bucket, "out/")) == sorted(binding.output_key(k) for k in keys)
    markers = [state.read_done(i) for i in state.done_ids()]
    assert len(markers) == N_SERVED and not state.dead_ids()
    assert all(m is not None and m["state"] == "done" and not m["replaced"] for m in markers)
    assert all(n == 1 for n in state.attempts().values()) and len(state.attempts()) == N_SERVED
    log = phases(exec_log)
    ends = Counter(where for phase, _t, where in log if phase == "end")
    starts = Counter(where for phase, _t, where in log if phase == "start")
    by_service = Counter(t for phase, t, _w in log if phase == "end")
    print(f"\nstarts {sum(starts.values())}, ends {sum(ends.values())}, commits {len(markers)}, "
          f"executions per service {dict(by_service)}, committing runners {len(runner_ids)}, "
          f"counters {counters}")  # fmt: skip
    expected = Counter({f"{bucket}/{k}" for k in keys})
    assert starts == expected and ends == expected, "an object ran more than once (or never)"
    # Each service tried to claim every object (won, or lost to the other): every object was raced for.
    assert [tried(c) for c in counters] == [N_SERVED, N_SERVED], counters
    claimed = sum(c.get("claimed_listing", 0) for c in counters)
    assert claimed == N_SERVED, f"{claimed} claims won for {N_SERVED} objects"
