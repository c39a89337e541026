"""Pool metrics: counters and bounded summaries per model."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class Summary:
    """Count, sum and the most recent samples of a quantity (for p50/p95)."""

    def __init__(self, keep: int = 2048) -> None:
        self.count = 0
        self.total = 0.0
        self._recent: deque[float] = deque(maxlen=keep)

    def add(self, value: float) -> None:
        """Record one sample."""
        self.count += 1
        self.total += value
        self._recent.append(value)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the recent samples, or None without samples."""
        if not self._recent:
            return None
        if len(self._recent) == 1:
            return self._recent[0]
        cuts = statistics.quantiles(self._recent, n=100, method="inclusive")
        return cuts[max(0, min(98, round(q * 100) - 1))]

    def describe(self) -> dict[str, Any]:
        """Count, mean, p50 and p95 as a dict."""
        return {
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
            "p50": self.quantile(0.5),
            "p95": self.quantile(0.95),
        }


@dataclass
class ModelMetrics:
    """What the pool measured for one model version.

    Attributes:
        submitted: Invocations admitted.
        rejected: Invocations refused with back-pressure.
        completed: Invocations that succeeded.
        failed: Invocations that failed (any reason).
        retried: Retries after a lost worker or engine.
        timeouts: Invocations past their timeout.
        cancelled: Invocations cancelled by the caller.
        warm_hits: Invocations that found a ready replica on arrival.
        cold_starts: Replicas started.
        engine_failures: Replicas that died or failed their health check.
        cold_start_seconds: Launch-to-ready seconds per replica.
        fetch_seconds: Seconds per replica start spent staging weights into the node's cache.
        load_seconds: Seconds per replica start from launching the engine to its being ready.
        weights_cache_hits: Replica starts whose weights were in the node's cache already.
        weights_fetched_bytes: Bytes of weights downloaded for replica starts.
        queue_wait_seconds: Arrival-to-dispatch seconds per invocation.
        execution_seconds: Seconds inside the worker per invocation.
    """

    submitted: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    timeouts: int = 0
    cancelled: int = 0
    warm_hits: int = 0
    cold_starts: int = 0
    engine_failures: int = 0
    weights_cache_hits: int = 0
    weights_fetched_bytes: int = 0
    cold_start_seconds: Summary = field(default_factory=Summary)
    fetch_seconds: Summary = field(default_factory=Summary)
    load_seconds: Summary = field(default_factory=Summary)
    queue_wait_seconds: Summary = field(default_factory=Summary)
    execution_seconds: Summary = field(default_factory=Summary)

    def describe(self) -> dict[str, Any]:
        """All metrics as a JSON-able dict."""
        out: dict[str, Any] = {}
        for name, value in vars(self).items():
            out[name] = value.describe() if isinstance(value, Summary) else value
        return out
