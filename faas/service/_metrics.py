"""Prometheus metrics of the pool service (prometheus-client's text format)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from faas.service._core import ServiceCore

_MODEL_COUNTERS = (
    "submitted",
    "rejected",
    "completed",
    "failed",
    "retried",
    "timeouts",
    "cancelled",
    "warm_hits",
    "cold_starts",
    "engine_failures",
    "weights_cache_hits",
    "weights_fetched_bytes",
)
_TIERS = ("hot", "staged", "cold")
_PHASES = {"fetch": "fetch_seconds", "load": "load_seconds", "ready": "cold_start_seconds"}


class _Collector:
    """Reads the core and its pool at scrape time (nothing is kept twice)."""

    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core
        service = CounterMetricFamily(
            "faas_service_invocations", "Invocations by service event.", labels=["event"]
        )
        for name, value in sorted(core.counters.items()):
            service.add_metric([name], value)
        yield service
        running = GaugeMetricFamily("faas_tenant_running", "Invocations in the pool.", labels=["tenant"])
        queued = GaugeMetricFamily("faas_tenant_queued", "Invocations waiting per tenant.", labels=["tenant"])
        for tenant, counts in sorted(core.live_counts().items()):
            running.add_metric([tenant], counts["running"])
            queued.add_metric([tenant], counts["queued"])
        yield running
        yield queued
        tokens = CounterMetricFamily(
            "faas_tenant_tokens", "Tokens of finished invocations per tenant.", labels=["tenant", "kind"]
        )
        engine = CounterMetricFamily(
            "faas_tenant_engine_seconds", "Engine busy time charged to each tenant.", labels=["tenant"]
        )
        for tenant, (prompt, cached, completion, share) in sorted(core.ledger.totals().items()):
            for kind, count in (("prompt", prompt), ("cached", cached), ("completion", completion)):
                tokens.add_metric([tenant, kind], count)
            engine.add_metric([tenant], share)
        yield tokens
        yield engine
        status: dict[str, Any] = core.pool.status()
        families = {
            name: CounterMetricFamily(f"faas_model_{name}", f"Pool metric {name}.", labels=["model"])
            for name in _MODEL_COUNTERS
        }
        ready = GaugeMetricFamily("faas_model_replicas_ready", "Ready replicas per model.", labels=["model"])
        depth = GaugeMetricFamily("faas_model_queue_depth", "Invocations queued per model.", labels=["model"])
        tier = GaugeMetricFamily(
            "faas_model_weights_tier",
            "1 for the tier of the model's weights on the pool node.",
            labels=["model", "tier"],
        )
        starts = CounterMetricFamily(
            "faas_model_start_seconds",
            "Seconds of replica starts by phase: fetch (weights into the cache), load (engine), ready (all).",
            labels=["model", "phase"],
        )
        for ref, model in sorted(status["models"].items()):
            metrics = model.get("metrics", {})
            for name, family in families.items():
                family.add_metric([ref], float(metrics.get(name, 0) or 0))
            replicas = model.get("replicas", [])
            ready.add_metric([ref], sum(1 for r in replicas if r.get("state") == "ready"))
            depth.add_metric([ref], float(model.get("queue_depth", 0) or 0))
            for name in _TIERS:
                tier.add_metric([ref, name], 1.0 if model.get("tier") == name else 0.0)
            for phase, key in _PHASES.items():
                summary = metrics.get(key) or {}
                starts.add_metric(
                    [ref, phase], float((summary.get("mean") or 0) * (summary.get("count") or 0))
                )
        yield from families.values()
        yield ready
        yield depth
        yield tier
        yield starts
        workers = GaugeMetricFamily("faas_pool_workers", "Live worker processes.")
        workers.add_metric([], len(status.get("workers", [])))
        yield workers
        up = GaugeMetricFamily("faas_service_start_time_seconds", "When the service started (epoch seconds).")
        up.add_metric([], core.started_at)
        yield up


def render_metrics(core: ServiceCore) -> tuple[bytes, str]:
    """The metrics page and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(core))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
