"""The operator's dashboard: what each panel shows, gathered from the core (no web code here).

One function per panel, each returning a JSON-able dict; :mod:`faas.service._dashboard_routes`
serves them as JSON and renders them with the Jinja templates in ``templates/``. Everything is
read from what the core already keeps: the pool's status (models, replicas, queues, fairness),
the tenants' live counts, the index (the newest invocations only, and per-tenant usage sums of
the last hour) and the trigger host's runners.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from faas._provenance import read_provenance
from faas.service._tenant import Tenant
from faas.triggers._state import TriggerState
from runtime import NotFoundError, ObjectNotFound, scoped_store

if TYPE_CHECKING:
    from faas.service._core import ServiceCore

SHARE_WINDOW = 3600.0
"""Seconds of usage the fair-share panel looks back over."""
RECENT = 25
"""Invocations the recent-invocations panel lists."""
LOG_TAIL = 600
"""Characters of a failed replica's error (its log tail) the models panel shows."""


def models_panel(core: ServiceCore) -> dict[str, Any]:
    """Models and versions: tier, queue, in-flight, settings and each replica's state."""
    status = core.pool.status()
    out = []
    for ref, model in sorted(status["models"].items()):
        replicas = [
            {
                "id": r.get("id"),
                "state": r.get("state"),
                "url": r.get("url"),
                "inflight": r.get("inflight", 0),
                "cold_start_s": r.get("cold_start_s"),
                "cold_start": r.get("cold_start") or {},
                "error_tail": (str(r["error"])[-LOG_TAIL:] if r.get("error") else None),
            }
            for r in model.get("replicas", [])
            if r.get("state") != "stopped"
        ]
        out.append(
            {
                "model": ref,
                "tier": model.get("tier"),
                "queue_depth": model.get("queue_depth", 0),
                "inflight": model.get("inflight", 0),
                "settings": model.get("settings", {}),
                "replicas": replicas,
                "ready": sum(1 for r in replicas if r["state"] == "ready"),
            }
        )
    return {"time": time.time(), "models": out}


def queues_panel(core: ServiceCore) -> dict[str, Any]:
    """Queue depth and in-flight work per model and per tenant (the service's queue and the pool's)."""
    status = core.pool.status()
    models = []
    per_tenant: dict[str, dict[str, int]] = {}
    for ref, model in sorted(status["models"].items()):
        models.append(
            {"model": ref, "queued": model.get("queue_depth", 0), "inflight": model.get("inflight", 0)}
        )
        for tenant, seen in (model.get("fairness") or {}).get("tenants", {}).items():
            row = per_tenant.setdefault(tenant, {"pool_waiting": 0, "pool_inflight": 0})
            row["pool_waiting"] += int(seen.get("waiting", 0))
            row["pool_inflight"] += int(seen.get("inflight", 0))
    tenants = []
    live = core.live_counts()
    for name in sorted(set(live) | set(per_tenant)):
        counts = live.get(name, {})
        pool = per_tenant.get(name, {})
        tenants.append(
            {
                "tenant": name,
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
                "pool_waiting": pool.get("pool_waiting", 0),
                "pool_inflight": pool.get("pool_inflight", 0),
            }
        )
    return {"time": time.time(), "models": models, "tenants": tenants}


def tenants_panel(core: ServiceCore, now: float | None = None) -> dict[str, Any]:
    """Per tenant over the last hour: usage, and the share of engine time received against entitled.

    A tenant is active when it finished work in the window or has work queued or running now; its
    entitled share is its ``weight`` over the sum of the active tenants' weights. The share
    received is its part of the engine time charged in the window (of its tokens when no engine
    time was charged).
    """
    now = time.time() if now is None else now
    used = core.index.usage_since(now - SHARE_WINDOW)
    live = core.live_counts()
    weights = {t.name: t.limits.weight for t in core.auth.tenants()}
    active = {
        name
        for name in weights
        if used.get(name) or live.get(name, {}).get("queued") or live.get(name, {}).get("running")
    }
    total_weight = sum(weights[n] for n in active)
    engine = sum(e for _, _, e in used.values())
    tokens = sum(k for _, k, _ in used.values())
    rows = []
    for name, weight in sorted(weights.items()):
        count, toks, share_s = used.get(name, (0, 0, 0.0))
        if engine > 0:
            received: float | None = share_s / engine
        elif tokens > 0:
            received = toks / tokens
        else:
            received = None
        rows.append(
            {
                "tenant": name,
                "weight": weight,
                "active": name in active,
                "invocations": count,
                "tokens": toks,
                "engine_seconds": round(share_s, 3),
                "entitled": (weight / total_weight) if name in active and total_weight else 0.0,
                "received": received,
                "queued": live.get(name, {}).get("queued", 0),
                "running": live.get(name, {}).get("running", 0),
            }
        )
    return {"time": now, "window_s": SHARE_WINDOW, "basis": "engine" if engine else "tokens", "tenants": rows}


def invocations_panel(core: ServiceCore, limit: int = RECENT) -> dict[str, Any]:
    """The newest invocations of every tenant with their queue and execution seconds and tokens."""
    out = []
    for row, usage in core.index.recent(limit):
        status = row.state
        if status in ("queued", "running"):
            status = "running" if core.pool.state(row.id) == "running" else "queued"
        out.append(
            {
                "id": row.id,
                "tenant": row.tenant,
                "function": row.function_name,
                "model": row.model,
                "status": status,
                "error": usage.error_kind if usage is not None else None,
                "submitted_at": row.submitted_at,
                "finished_at": row.finished_at,
                "queue_s": usage.queue_seconds if usage is not None else None,
                "execution_s": usage.execution_seconds if usage is not None else None,
                "tokens": usage.tokens if usage is not None else None,
                "logs": f"/dashboard/invocations/{row.id}/logs",
                "provenance": f"/dashboard/invocations/{row.id}/provenance",
            }
        )
    return {"time": time.time(), "invocations": out}


def triggers_panel(core: ServiceCore) -> dict[str, Any]:
    """Every tenant's running trigger bindings: backlog, in flight, lag and dead letters."""
    rows: list[dict[str, Any]] = []
    host = core.triggers
    if host is None:
        return {"time": time.time(), "enabled": False, "bindings": rows}
    for tenant in core.auth.tenants():
        runner = host.runner(tenant.name)
        if runner is None:
            continue
        store = scoped_store(core.store, tenant.prefix)
        for name, metrics in runner.metrics_all().items():
            rows.append(
                {
                    "tenant": tenant.name,
                    "binding": name,
                    "paused": metrics.get("paused", False),
                    "backlog": metrics.get("backlog", 0),
                    "inflight": metrics.get("inflight", 0),
                    "oldest_age_s": metrics.get("oldest_unprocessed_age", 0.0),
                    "lag_p95_s": metrics.get("lag_p95"),
                    "dead_letters": len(TriggerState(store, name).dead_ids()),
                }
            )
    return {"time": time.time(), "enabled": True, "bindings": rows}


PANELS: dict[str, Callable[[ServiceCore], dict[str, Any]]] = {
    "models": models_panel,
    "queues": queues_panel,
    "tenants": tenants_panel,
    "invocations": invocations_panel,
    "triggers": triggers_panel,
}
"""The panels, in the page's order."""


def provenance_of(core: ServiceCore, invocation_id: str) -> dict[str, Any]:
    """Any tenant's invocation's provenance (the dashboard is for operators).

    Raises:
        NotFoundError: No such invocation, or no provenance recorded for it (yet).
    """
    row = core.index.get(invocation_id) if len(invocation_id) <= 200 else None
    if row is None:
        raise NotFoundError(f"No invocation {invocation_id!r} is known to this service.", 404)
    if row.result:  # committed, its store record not written yet
        found = json.loads(row.result).get("provenance")
        if found:
            return dict(found)
    try:
        record = read_provenance(scoped_store(core.store, f"tenants/{row.tenant}"), invocation_id)
    except ObjectNotFound as exc:
        raise NotFoundError(str(exc), 404) from None
    return record.model_dump(mode="json")


def logs_of(core: ServiceCore, invocation_id: str) -> str:
    """Any tenant's invocation's captured output ('' while it runs).

    Raises:
        NotFoundError: No such invocation.
    """
    row = core.index.get(invocation_id) if len(invocation_id) <= 200 else None
    if row is None:
        raise NotFoundError(f"No invocation {invocation_id!r} is known to this service.", 404)
    owner = next((t for t in core.auth.tenants() if t.name == row.tenant), Tenant(row.tenant))
    return core.logs(owner, invocation_id)
