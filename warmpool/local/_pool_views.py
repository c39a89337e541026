"""What a local pool tells about itself: replicas, workers, status, weights tiers (a mixin of ``Pool``)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from registry import ModelSpec
from runtime import Invocation
from warmpool._book import Book
from warmpool._replica import ModelPool, Replica, ReplicaState
from warmpool.weights import Tier, WeightsCache, weights_tier

if TYPE_CHECKING:
    from warmpool.local._tenants import WorkerSets


class PoolViews:
    """Read-only views of a :class:`~warmpool.local.Pool`; the pool provides what is declared here."""

    id: str
    counters: dict[str, int]
    _lock: threading.RLock
    _models: dict[str, ModelPool]
    _book: Book[Any]
    _workers: WorkerSets
    _weights_cache: WeightsCache | None

    @property
    def weights_cache(self) -> WeightsCache:
        """The node's weights cache (made on first use)."""
        with self._lock:
            if self._weights_cache is None:
                self._weights_cache = WeightsCache()
            return self._weights_cache

    def weights_tier(self, spec: ModelSpec) -> Tier:
        """``hot`` (a ready replica here), ``staged`` (weights on this node's disk) or ``cold``."""
        with self._lock:
            mp = self._models.get(spec.ref)
            hot = mp is not None and any(r.state is ReplicaState.READY for r in mp.replicas)
        return weights_tier(spec, self.weights_cache if spec.weights_uri else None, hot=hot)

    def replicas(self, model: str | None = None) -> list[Replica]:
        """Replicas (of one model ref, or all), including stopped and failed ones."""
        with self._lock:
            return [r for ref, mp in self._models.items() if model in (None, ref) for r in mp.replicas]

    def unfinished_invocations(self, model: str) -> list[Invocation]:
        """The queued and running invocations of model version ``model`` (an adapter alias drains on them)."""
        return [w.invocation for w in self._book.unfinished() if w.model and w.model.ref == model]

    def worker_pids(self, tenant: str | None = None) -> list[int]:
        """Process ids of the live workers (of ``tenant``'s own set, when named; not in ``status()``)."""
        with self._lock:
            return [w.pid for w in self._workers.workers if w.pid and tenant in (None, w.tenant)]

    def status(self) -> dict[str, Any]:
        """Models (queue, replicas, metrics), workers and counters as a JSON-able dict."""
        with self._lock:
            return {
                "pool": self.id,
                "time": time.time(),
                "counters": {**self.counters, "workers_started": self._workers.spawned},
                "models": {ref: mp.describe() for ref, mp in self._models.items()},
                "workers": [
                    {
                        "pid": w.pid,
                        "inflight": len(w.inflight),
                        "abandoned": w.abandoned,
                        "retiring": w.retiring,
                    }
                    for w in self._workers.workers
                ],
            }
