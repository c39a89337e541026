"""Trigger lag benchmark: object creation to output written, notifications versus polling.

A producer writes a steady stream of objects (default 10 objects/s for 60 s)
under ``in/``; a bound function on the CPU engine (``tiny-llama``: read the
object, generate 8 tokens, return JSON) runs once for each. The lag of an
object is the time from its PutObject returning to its done marker being
committed, which happens after its output is written; both are wall-clock
times on this machine. Modes:

- ``notifications``: moto S3 -> SQS bucket notifications (reconciler every 30 s);
- ``polling-seaweedfs``: SeaweedFS, which has no notifications, listed every ``--poll-interval`` s;
- ``polling-moto``: the same polling against moto, to compare with the first mode on one server.

Every mode starts its own server, faas client (2 workers) and engine, warms
the engine with 5 objects, then measures. Prints p50/p95/p99/max lag per mode
and writes ``benchmarks/results/triggers.json``.

Run: ``.venv/bin/python benchmarks/triggers.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ensure_repo_importable,
    exit_cleanly_on_sigterm,
    latency_summary,
    print_table,
    write_result,
)

ensure_repo_importable()

import boto3  # noqa: E402

import faas  # noqa: E402
from faas.triggers import TriggerRunner, TriggerState, setup_notifications  # noqa: E402
from runtime._s3 import S3Store  # noqa: E402
from tests._s3_servers import (  # noqa: E402
    S3Server,
    ServerProcess,
    _answers_http,
    _clean_env,
    aws_env,
    find_binary,
    free_port,
    start_seaweedfs,
)

MODES = ("notifications", "polling-seaweedfs", "polling-moto")
# Where the lag goes: created -> claimed and submitted -> function started -> object read
# -> generated -> output and done marker committed.
PHASES = ("to_submit", "to_function", "read", "generate", "to_commit")


@faas.function(model="tiny-llama", timeout=60, retries=1)
def caption(model: faas.Model, ref: faas.ObjectRef) -> dict[str, Any]:
    """Complete the object's text with 8 greedy tokens."""
    started = time.time()
    text = ref.read_text()
    read = time.time()
    out = model.generate(text, sampling_params={"max_new_tokens": 8, "temperature": 0})
    return {"key": ref.key, "prompt": text, "completion": out.text, "t": [started, read, time.time()]}


def start_moto(scratch: Path) -> S3Server:
    binary = find_binary("moto_server")
    prefix = [binary] if binary else [sys.executable, "-m", "moto.server"]
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [*prefix, "-H", "127.0.0.1", "-p", str(port)]
    ready = lambda: _answers_http(endpoint + "/moto-api/")  # noqa: E731
    server = S3Server(
        "moto", endpoint, ServerProcess("moto_server", argv, _clean_env(), scratch / "moto.log", ready)
    )
    server.start()
    return server


@contextlib.contextmanager
def server_for(mode: str, scratch: Path) -> Iterator[S3Server]:
    server = start_seaweedfs(scratch / "weed") if mode == "polling-seaweedfs" else start_moto(scratch)
    try:
        yield server
    finally:
        server.stop(kill=True)


def wait_until(done: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def run_mode(mode: str, rate: float, seconds: float, poll_interval: float, scratch: Path) -> dict[str, Any]:
    with server_for(mode, scratch) as server, aws_env(server, scratch):
        store = S3Store(
            server.new_bucket("faas-store"), "faas", endpoint_url=server.endpoint_url, path_style=True
        )
        client = faas.Client(store=store, workers=2, records="off")
        bucket = server.new_bucket("bench")
        options: dict[str, Any] = {"poll_interval": poll_interval, "max_concurrency": 32}
        if mode == "notifications":
            sqs = boto3.client("sqs", endpoint_url=server.endpoint_url, region_name=server.region)
            queue = sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:8]}")["QueueUrl"]
            options = {**options, "queue_url": queue, "poll_interval": 30.0}
        fn = caption.with_client(client)
        binding = fn.on_object(
            bucket=bucket, prefix="in/", output_prefix="out/", name=f"bench-{mode}", **options
        )
        if mode == "notifications":
            setup_notifications(binding)
        s3 = server.client()
        runner = TriggerRunner(client, bindings=[binding.name], functions=[caption]).start()
        try:
            done = lambda: runner.metrics(binding.name)["counters"].get("done", 0)  # noqa: E731
            for i in range(5):  # warm-up: the engine's cold start is not part of the lag
                s3.put_object(Bucket=bucket, Key=f"in/warmup-{i}.txt", Body=b"The quick brown")
            wait_until(lambda: done() >= 5, 180, "the warm-up")
            created: dict[str, float] = {}
            total = int(rate * seconds)
            t0 = time.time()
            for i in range(total):
                time.sleep(max(0.0, t0 + i / rate - time.time()))  # a steady producer
                key = f"in/obj-{i:05d}.txt"
                s3.put_object(Bucket=bucket, Key=key, Body=f"Sample {i} from the beamline".encode())
                created[key] = time.time()
            produced_in = time.time() - t0
            wait_until(lambda: done() >= total + 5, 300, "every output")
            metrics = runner.metrics(binding.name)
        finally:
            runner.stop()
            client.shutdown()
        state = TriggerState(store, binding.name)
        lags, timeline = [], []
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        for id in state.done_ids():
            marker = state.read_done(id)
            if not marker or marker["event"]["key"] not in created:
                continue
            key = marker["event"]["key"]
            out = json.loads(s3.get_object(Bucket=bucket, Key=marker["output_key"])["Body"].read())
            fn_start, fn_read, fn_end = out["t"]
            committed = float(marker["committed_at"])
            lags.append(committed - created[key])
            timeline.append([round(created[key] - t0, 3), round(lags[-1], 3)])
            marks = [created[key], float(marker["started_at"]), fn_start, fn_read, fn_end, committed]
            for name, a, b in zip(PHASES, marks, marks[1:], strict=False):
                phases[name].append(b - a)
        sample = json.loads(s3.get_object(Bucket=bucket, Key="out/obj-00000.txt.out")["Body"].read())
        return {
            "mode": mode,
            "objects": total,
            "rate_per_s": rate,
            "produced_in_s": produced_in,
            "poll_interval_s": options["poll_interval"],
            "lag": latency_summary(lags),
            "phases": {name: latency_summary(values) for name, values in phases.items()},
            "runner_counters": metrics["counters"],
            "max_inflight_seen": metrics["max_inflight_seen"],
            "sample_output": sample,
            "timeline": sorted(timeline),  # [seconds since the stream started, lag] per object
        }


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=10.0, help="objects per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the stream lasts")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between listings (polling)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="faas-bench-triggers-") as tmp:
        for mode in args.modes:
            scratch = Path(tmp) / mode
            scratch.mkdir()
            result = run_mode(mode, args.rate, args.seconds, args.poll_interval, scratch)
            results.append(result)
            lag = result["lag"]
            rows.append([mode, result["objects"], lag["p50_ms"], lag["p95_ms"], lag["p99_ms"], lag["max_ms"]])
            print(f"{mode}: {json.dumps(lag)}", flush=True)
    print_table(
        f"Trigger lag, object created -> output written ({args.rate:g} objects/s for {args.seconds:g} s)",
        ["mode", "objects", "p50 ms", "p95 ms", "p99 ms", "max ms"],
        rows,
    )
    path = write_result("triggers", {"args": vars(args), "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
