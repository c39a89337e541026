"""``faas quickstart``: the whole path on one machine, with the tiny offline model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from faas._function import function
from faas.clients._embedded import Client
from runtime import Model


@function(model="tiny-llama", timeout=60, retries=1, name="quickstart.complete")
def complete(model: Model, prompt: str, n: int = 16) -> str:
    """Complete ``prompt`` greedily with up to ``n`` new tokens."""
    return model.generate(prompt, {"max_new_tokens": n, "temperature": 0}).text  # type: ignore[union-attr]


def child_pids() -> list[int]:
    """Pids of this process's live (non-zombie) children, from /proc.

    Python's multiprocessing resource tracker is left out: it is the
    interpreter's own helper, started once and ended with the interpreter.
    """
    import os

    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) != me or fields[0] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return pids


def _batch_mean(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Mean sequences per engine step between two ``/server_info`` stats snapshots."""
    try:
        steps = after["steps"] - before["steps"]
        rows = after["mean_batch_size"] * after["steps"] - before["mean_batch_size"] * before["steps"]
    except (KeyError, TypeError):
        return None
    return rows / steps if steps else None


def run_quickstart(
    *,
    prompt: str = "The quick brown",
    futures: int = 64,
    store: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the quickstart and return its measurements.

    Builds the tiny model if missing, starts the embedded pool, registers the
    example function, runs one call and ``futures`` concurrent futures, prints
    a table and the generated text, and shuts everything down.
    """
    from warmpool.cpu_engine import ensure_tiny_model

    console = console or Console()
    t0 = time.perf_counter()
    with console.status("Preparing the tiny offline model (built once, then cached)..."):
        path = ensure_tiny_model()
    model_seconds = time.perf_counter() - t0
    console.print(f"model: tiny-llama at {path} ({model_seconds:.1f} s)")

    client = Client(store=store)
    fn = complete.with_client(client)
    try:
        with console.status("Starting the engine (cold start) and the first call..."):
            t1 = time.perf_counter()
            text = fn.remote(prompt)
            first_call = time.perf_counter() - t1
        [replica] = client.pool.replicas()
        warm = []
        for _ in range(20):
            t = time.perf_counter()
            fn.remote(prompt)
            warm.append(time.perf_counter() - t)
        before = replica.host.server_info().get("stats", {})
        t2 = time.perf_counter()
        results = [f.result(timeout=120) for f in [fn.submit(prompt) for _ in range(futures)]]
        burst = time.perf_counter() - t2
        stats = replica.host.server_info().get("stats", {})
        correct = sum(r == text for r in results)
    finally:
        client.shutdown()
    leftovers = child_pids()
    numbers = {
        "engine_cold_start_s": replica.cold_start_s,
        "first_call_s": first_call,
        "warm_call_p50_ms": statistics.median(warm) * 1000,
        "invocations_per_s": futures / burst,
        "mean_engine_batch_size": _batch_mean(before, stats),
        "futures_correct": correct,
        "futures": futures,
        "text": text,
        "processes_left": leftovers,
    }
    table = Table(title="tpm-faas quickstart (embedded pool, CPU engine, tiny-llama)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("engine cold start", f"{numbers['engine_cold_start_s']:.2f} s")
    table.add_row("first call (incl. cold start)", f"{first_call:.2f} s")
    table.add_row("warm call p50", f"{numbers['warm_call_p50_ms']:.1f} ms")
    table.add_row(f"{futures} futures", f"{numbers['invocations_per_s']:.0f} invocations/s")
    mean_batch = numbers["mean_engine_batch_size"]
    batch_text = f"{mean_batch:.1f}" if mean_batch is not None else "n/a"
    table.add_row(f"mean engine batch size ({futures} futures)", batch_text)
    table.add_row("futures with the same text", f"{correct}/{futures}")
    console.print(table)
    console.print(f"{prompt!r} -> {text!r}")
    console.print(f"{prompt}[bold]{text}[/bold]", markup=True, highlight=False)
    if leftovers:
        console.print(f"[red]processes left behind: {leftovers}[/red]")
    else:
        console.print("Pool shut down; no process left behind.")
    return numbers
