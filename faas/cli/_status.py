"""Pool status: pools write snapshots to the store; ``faas pool status`` reads and renders them."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime import default_store_url, store_from_url


def load_statuses(store_url: str | None = None, *, max_age: float = 30.0) -> list[dict[str, Any]]:
    """Status snapshots of pools that reported within ``max_age`` seconds."""
    store = store_from_url(store_url or default_store_url())
    out = []
    for key in store.list("pools/"):
        if not key.endswith("/status.json"):
            continue
        try:
            status = json.loads(store.get(key))
        except (ValueError, KeyError):
            continue
        if time.time() - float(status.get("time", 0)) <= max_age:
            out.append(status)
    return out


def _fmt(value: Any, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.1f}{unit}"


def render_status(status: dict[str, Any], console: Console | None = None) -> None:
    """Print one pool's status as tables."""
    console = console or Console()
    counters = status.get("counters", {})
    console.print(
        f"[bold]pool {status.get('pool')}[/bold]: {counters.get('submitted', 0)} submitted, "
        f"{counters.get('completed', 0)} completed, {counters.get('failed', 0)} failed, "
        f"{len(status.get('workers', []))} workers, {counters.get('workers_lost', 0)} workers lost"
    )
    models = Table(title="models")
    for col in (
        "model",
        "tier",
        "queue",
        "in flight",
        "replicas",
        "warm hits",
        "cold starts",
        "cold start p50",
        "queue wait p50",
        "exec p50",
        "engine batch",
        "failed",
        "rejected",
    ):
        models.add_column(col, justify="left" if col == "model" else "right")
    for ref, m in status.get("models", {}).items():
        met = m["metrics"]
        replicas = m.get("replicas", [])
        live = [r for r in replicas if r["state"] in ("starting", "ready")]
        batch = [
            r["engine"].get("mean_batch_size") for r in live if r.get("engine", {}).get("mean_batch_size")
        ]
        models.add_row(
            ref, str(m.get("tier") or "-"), str(m["queue_depth"]), str(m["inflight"]),
            ", ".join(f"{r['state']}" for r in live) or "0",
            str(met["warm_hits"]), str(met["cold_starts"]),
            _fmt(met["cold_start_seconds"]["p50"], 1, " s"),
            _fmt(met["queue_wait_seconds"]["p50"], 1000, " ms"),
            _fmt(met["execution_seconds"]["p50"], 1000, " ms"),
            _fmt(sum(batch) / len(batch)) if batch else "-",
            str(met["failed"]), str(met["rejected"]),
        )  # fmt: skip
    console.print(models)
    _render_starts(status, console)


def _render_starts(status: dict[str, Any], console: Console) -> None:
    """One row per replica start: fetch (weights into the node's cache), load (engine), ready (in all)."""
    rows = [
        (ref, r)
        for ref, m in status.get("models", {}).items()
        for r in m.get("replicas", [])
        if r.get("cold_start")
    ]
    if not rows:
        return
    starts = Table(title="replica starts (cold start breakdown)")
    for col in ("model", "replica", "state", "fetch", "load", "ready", "weights"):
        starts.add_column(col, justify="left" if col in ("model", "state", "weights") else "right")
    for ref, r in rows:
        cold = r["cold_start"]
        if cold.get("cache_hit") is None:
            weights = "local"
        elif cold["cache_hit"]:
            weights = "cache hit"
        else:
            weights = f"fetched {(cold.get('fetched_bytes') or 0) / 2**20:.0f} MiB"
        starts.add_row(
            ref, str(r["id"]), r["state"],
            _fmt(cold.get("fetch_s"), 1, " s"), _fmt(cold.get("load_s"), 1, " s"),
            _fmt(cold.get("ready_s"), 1, " s"), weights,
        )  # fmt: skip
    console.print(starts)
