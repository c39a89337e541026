"""Soak: the service's knee under rising load, then a long run at 70% of it.

One ``faas serve`` (CPU engine, tiny Llama, as in ``benchmarks/service_overhead.py``) and
this script as its client. Two phases:

- **knee**: an open-loop load (invocations submitted on a fixed schedule, whatever the
  answers, so a slow service meets more work and not less) at rising rates,
  ``--step-seconds`` each (default 60): 2, 4, 8, ... per second. A step holds when every
  invocation succeeded and its p99 latency (submit to result) is under ``--p99-ms``
  (default 2,000). The knee is the highest rate that held; the ramp stops at the first
  step that does not.
- **soak**: ``--soak-minutes`` (default 30) at 70% of the knee, recording every minute
  the resident memory (``VmRSS``) and open files (``/proc/PID/fd``) of the service, each
  worker and the engine (the service's process tree).

Goals: resident memory growth over the soak < 10% per process (last minute against the
first); open files flat (last minute - first <= 5 per process); no errors; every soak
minute's load served within 75 s (a service that slows as it runs falls behind) and the
last minute's p99 under the bound.

Run: ``.venv/bin/python -m benchmarks.load`` (about 40 minutes; ``--step-seconds 10
--soak-minutes 2`` for a smoke run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Goal,
    ServiceProcess,
    ensure_repo_importable,
    exit_cleanly_on_sigterm,
    latency_summary,
    print_table,
    process_tree,
    write_result,
)

ensure_repo_importable()

import faas  # noqa: E402

SAMPLING = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def complete8(model: faas.Model, prompt: str) -> str:
    """Eight greedy tokens of the tiny Llama."""
    return model.generate(prompt, SAMPLING).text  # type: ignore[union-attr]


def open_loop(fn: Any, rate: float, seconds: float) -> tuple[list[float], int, int]:
    """Submit at ``rate`` per second for ``seconds``; returns latencies, errors and submitted."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    done = threading.Event()
    pending: list[concurrent.futures.Future[Any]] = []

    def finished(t0: float, future: concurrent.futures.Future[Any]) -> None:
        nonlocal errors
        with lock:
            if future.exception() is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    start = time.perf_counter()
    n = 0
    while (due := start + n / rate) < start + seconds:
        done.wait(max(0.0, due - time.perf_counter()))  # the schedule, not a synchronisation
        t0 = time.perf_counter()
        future = fn.submit(f"Request {n} says")
        future.add_done_callback(lambda f, t0=t0: finished(t0, f))
        pending.append(future)
        n += 1
    concurrent.futures.wait(pending, timeout=600)
    unanswered = sum(1 for f in pending if not f.done())
    return latencies, errors + unanswered, n


def sample(pid: int) -> dict[str, Any] | None:
    """Name, resident KiB and open files of one process (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kind = "engine" if "cpu_engine" in cmdline else "worker" if "local.worker" in cmdline else "service"
    if "faas.cli" not in cmdline and kind == "service":
        kind = "other"
    return {"pid": pid, "kind": kind, "rss_kib": int(status["VmRSS"].split()[0]), "fds": fds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step-seconds", type=float, default=60.0, help="length of each rate step")
    parser.add_argument("--start-rate", type=float, default=2.0, help="first rate, invocations per second")
    parser.add_argument("--max-rate", type=float, default=1024.0, help="stop the ramp here")
    parser.add_argument("--p99-ms", type=float, default=2000.0, help="a step holds under this p99")
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=128)
    parser.add_argument("--name", default="load", help="result file under benchmarks/results/")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    print(f"[load] {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="faas-bench-load-"))
    service = ServiceProcess(tmp, args.workers, args.threads_per_worker)
    client: Any = None
    steps: list[dict[str, Any]] = []
    minutes: list[list[dict[str, Any]]] = []
    soak: list[dict[str, Any]] = []  # per soak minute: submitted, errors, wall time, latencies
    try:
        client = faas.RemoteClient(service.start())
        fn = faas.function(model="tiny-llama", name="bench.complete8", timeout=600)(complete8).with_client(
            client
        )
        fn.remote("warm up")  # the engine's cold start, outside every measurement
        knee = 0.0
        rate = args.start_rate
        while rate <= args.max_rate:
            latencies, errors, n = open_loop(fn, rate, args.step_seconds)
            summary = latency_summary(latencies)
            held = errors == 0 and summary["p99_ms"] <= args.p99_ms
            steps.append({"rate": rate, "submitted": n, "errors": errors, **summary, "held": held})
            print(f"[load] {rate:g}/s: {n} submitted, {errors} errors, p50 {summary['p50_ms']:.0f} ms, "
                  f"p99 {summary['p99_ms']:.0f} ms -> {'held' if held else 'broke'}")  # fmt: skip
            if not held:
                break
            knee = rate
            rate *= 2
        soak_rate = 0.7 * knee
        print(f"[load] knee {knee:g}/s; soaking at {soak_rate:.1f}/s for {args.soak_minutes:g} min")
        assert service.proc is not None
        soak_errors = 0
        for minute in range(max(1, round(args.soak_minutes))):
            minutes.append([s for p in process_tree(service.proc.pid) if (s := sample(p))])
            if soak_rate > 0:
                t0 = time.perf_counter()
                latencies, errors, n = open_loop(fn, soak_rate, 60.0)
                soak_errors += errors
                wall = time.perf_counter() - t0  # over 60 s: the service fell behind the offered load
                summary = latency_summary(latencies)
                soak.append({"minute": minute, "submitted": n, "errors": errors, "wall_s": wall, **summary})
                print(f"[load] soak minute {minute}: {n} submitted in {wall:.0f} s, {errors} errors, "
                      f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms")  # fmt: skip
        minutes.append([s for p in process_tree(service.proc.pid) if (s := sample(p))])
    finally:
        if client is not None:
            client.shutdown()
        service.stop()

    first = {s["pid"]: s for s in minutes[0]} if minutes else {}
    last = {s["pid"]: s for s in minutes[-1]} if minutes else {}
    rows, growth, fd_drift = [], [], []
    for pid, a in sorted(first.items()):
        b = last.get(pid)
        if b is None or a["kind"] == "other":
            continue
        g = (b["rss_kib"] - a["rss_kib"]) / max(a["rss_kib"], 1)
        growth.append(g)
        fd_drift.append(b["fds"] - a["fds"])
        rows.append([a["kind"], pid, a["rss_kib"] / 1024, b["rss_kib"] / 1024, 100 * g, a["fds"], b["fds"]])
    print_table(
        "soak: first and last minute", ["process", "pid", "RSS MiB", "then", "growth %", "fds", "then"], rows
    )
    nan = float("nan")
    goals = [
        Goal("largest resident memory growth over the soak", 100 * max(growth, default=nan), "<=", 10, "%"),
        Goal("largest open-file drift over the soak", max(fd_drift, default=nan), "<=", 5),
        Goal("errors during the soak", soak_errors if minutes else nan, "<=", 0),
        # A service that slows as it runs (a store that grows, a queue that leaks) shows here.
        Goal("slowest soak minute, wall time", max((m["wall_s"] for m in soak), default=nan), "<=", 75, " s"),
        Goal("p99 of the last soak minute", soak[-1]["p99_ms"] if soak else nan, "<=", args.p99_ms, " ms"),
    ]
    print("\nGoals:")
    for goal in goals:
        print(goal.line())
    path = write_result(
        args.name,
        {
            "config": vars(args),
            "knee_per_s": knee,
            "steps": steps,
            "soak": soak,
            "minutes": minutes,
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
