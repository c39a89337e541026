"""Engine replicas and the per-model pool that admits, routes and scales.

:class:`ModelPool` holds pure decisions (which replica gets the next
invocation, when to start or stop one) over state the caller locks; the clock
is passed in so scaling is testable without sleeping.
"""

from __future__ import annotations

import enum
import itertools
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import ModelSpec
from runtime import BackPressureError, EngineError
from warmpool._fair import Fairness, FairQueue
from warmpool._metrics import ModelMetrics
from warmpool.engines._host import CpuEngineHost, EngineHost
from warmpool.weights import Tier, WeightsCache, redact, weights_tier

if TYPE_CHECKING:
    from warmpool.local._pool import Work


class ReplicaState(enum.Enum):
    """Lifecycle of an engine replica."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


EngineFactory = Callable[[ModelSpec, Path], EngineHost]
_replica_ids = itertools.count(1)


def default_engine_factory(spec: ModelSpec, log_dir: Path) -> EngineHost:
    """Build the engine host a model spec asks for."""
    args = dict(spec.engine_args)
    if spec.engine == "cpu":
        path = spec.model_path
        if path is None:
            from warmpool.cpu_engine._tiny_model import ensure_tiny_model  # torch is imported only here

            path = str(ensure_tiny_model())
        return CpuEngineHost(
            path,
            served_model_name=spec.ref,
            max_batch_size=int(args.get("max_batch_size", 64)),
            threads=args.get("threads"),
            device=str(args.get("device", "cpu")),
            log_dir=log_dir,
            request_log=args.get("request_log"),
            answer_journal=args.get("answer_journal"),
            max_loras=args.get("max_loras"),
            max_lora_rank=args.get("max_lora_rank"),
        )
    if spec.engine == "sglang":
        from warmpool.engines._sglang import SGLangEngineHost

        return SGLangEngineHost.from_spec(spec, log_dir=log_dir)
    raise EngineError(f"Engine kind {spec.engine!r} of model {spec.ref!r} is not available in this pool.")


def with_answer_journal(spec: ModelSpec, answer_dir: Path | None) -> ModelSpec:
    """``spec`` with its CPU engine's answer journal in ``answer_dir`` (a directory per version)."""
    if answer_dir is None or spec.engine != "cpu" or "answer_journal" in spec.engine_args:
        return spec
    where = Path(answer_dir) / re.sub(r"[^A-Za-z0-9._-]", "_", spec.ref)
    return spec.model_copy(update={"engine_args": {**spec.engine_args, "answer_journal": str(where)}})


@dataclass(eq=False)
class Replica:
    """One engine replica of a model version.

    Attributes:
        spec: The model version it serves.
        host: The engine host process.
        state: Current lifecycle state.
        created_at: When it was asked for (pool clock).
        ready_at: When it became ready.
        stopped_at: When it stopped or failed.
        last_active: Last dispatch or completion (pool clock), for idle scale-in.
        cold_start_s: Seconds from launch to ready (pool clock).
        fetch_s: Seconds staging the weights into the node's cache (0 without ``weights_uri``;
            about 0 on a cache hit).
        load_s: Seconds from launching the engine process to its first ready answer.
        ready_s: Seconds from launch to ready, measured like the other two (fetch + load + the rest).
        weights: What staging did (digest, cache hit, bytes fetched), when the model has ``weights_uri``.
        inflight: Invocations dispatched to it and not yet finished.
        error: Why it failed, if it did.
        engine_stats: The engine's last reported ``/server_info`` stats.
    """

    spec: ModelSpec
    host: EngineHost
    created_at: float
    id: int = field(default_factory=lambda: next(_replica_ids))
    state: ReplicaState = ReplicaState.STARTING
    ready_at: float | None = None
    stopped_at: float | None = None
    last_active: float = 0.0
    cold_start_s: float | None = None
    fetch_s: float | None = None
    load_s: float | None = None
    ready_s: float | None = None
    weights: dict[str, Any] | None = None
    inflight: int = 0
    error: str | None = None
    health_failures: int = 0
    last_healthy: float | None = None
    engine_version: str | None = None  # from /server_info once ready
    engine_model_path: str | None = None
    engine_stats: dict[str, Any] = field(default_factory=dict)
    ready_event: threading.Event = field(default_factory=threading.Event)
    launched_mono: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str | None:
        """The engine's base URL."""
        return self.host.url

    def engine_info(self) -> dict[str, Any]:
        """The engine for provenance: kind, version, arguments, URL and weights."""
        return {
            "kind": self.spec.engine,
            "version": self.engine_version,
            "args": dict(self.spec.engine_args),
            "url": self.url,
            "model_path": self.engine_model_path or self.spec.model_path,
            "weights_digest": (self.weights or {}).get("digest"),
            "cold_start": self.cold_start(),
        }

    def cold_start(self) -> dict[str, Any]:
        """The replica's start: fetch, load and ready seconds, and whether the weights were cached."""
        weights = self.weights or {}
        return {
            "fetch_s": self.fetch_s,
            "load_s": self.load_s,
            "ready_s": self.ready_s,
            "cache_hit": weights.get("cache_hit"),
            "fetched_bytes": weights.get("fetched_bytes"),
        }

    @property
    def live(self) -> bool:
        """Starting or ready."""
        return self.state in (ReplicaState.STARTING, ReplicaState.READY)

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for status displays."""
        return {
            "id": self.id,
            "model": self.spec.ref,
            "state": self.state.value,
            "url": self.url,
            "pid": self.host.pid,
            "inflight": self.inflight,
            "cold_start_s": self.cold_start_s,
            "cold_start": self.cold_start(),
            "error": self.error,
            "engine": {
                k: self.engine_stats.get(k)
                for k in ("mean_batch_size", "max_batch_size_seen", "requests_running", "steps")
            },
        }


class ModelPool:
    """Queue, replicas and scaling of one model version; the caller holds the lock.

    Args:
        spec: The model version and its pool settings.
        clock: Monotonic clock.
        fairness: How waiting invocations share the replicas' slots (see :mod:`warmpool._fair`).
        weights_cache: The node's weights cache (for the tier shown in status), if the pool has one.
    """

    def __init__(
        self,
        spec: ModelSpec,
        clock: Callable[[], float],
        fairness: Fairness = "vtc",
        weights_cache: WeightsCache | None = None,
    ) -> None:
        self.spec = spec
        self.weights_cache = weights_cache
        self.prestaging = False  # weights being staged ahead of any replica
        self._clock = clock
        self.queue: FairQueue[Work] = FairQueue(fairness)
        self.replicas: list[Replica] = []
        self.metrics = ModelMetrics()
        self.launching = 0  # replicas decided on but not yet in ``replicas``

    def admit(self, work: Work) -> bool:
        """Queue ``work``; return whether a ready replica existed on arrival.

        Raises:
            BackPressureError: The queue already holds ``max_queue`` invocations.
        """
        if len(self.queue) >= self.spec.max_queue:
            self.metrics.rejected += 1
            raise BackPressureError(
                f"The queue of model {self.spec.ref} is full ({self.spec.max_queue} invocations waiting); "
                "nothing was submitted. Retry later or raise max_queue/max_replicas."
            )
        self.metrics.submitted += 1
        warm = any(r.state is ReplicaState.READY for r in self.replicas)
        if warm:
            self.metrics.warm_hits += 1
        self.queue.push(work)
        return warm

    def next_dispatch(self) -> tuple[Work, Replica] | None:
        """Pop the fair queue's next invocation and the ready replica with the fewest in flight."""
        ready = [
            r for r in self.replicas if r.state is ReplicaState.READY and r.inflight < self.spec.max_inflight
        ]
        if not ready:
            return None
        work = self.queue.pop()
        if work is None:
            return None
        replica = min(ready, key=lambda r: r.inflight)
        now = self._clock()
        replica.inflight += 1
        replica.last_active = now
        return work, replica

    def release(self, replica: Replica) -> None:
        """An invocation on ``replica`` finished or left it."""
        replica.inflight = max(0, replica.inflight - 1)
        replica.last_active = self._clock()

    def plan(self) -> tuple[int, list[Replica]]:
        """Decide scaling now: how many replicas to start, which idle ones to stop.

        - Never fewer live replicas than ``min_replicas``.
        - Scale from zero when work is queued.
        - Scale out by one when work is queued, every ready replica is at
          ``max_inflight`` and none is already starting, up to ``max_replicas``.
        - Stop a ready replica idle for ``idle_timeout`` while more than
          ``min_replicas`` are live and nothing is queued.
        """
        spec = self.spec
        live = [r for r in self.replicas if r.live]
        n_live = len(live) + self.launching
        starting = self.launching > 0 or any(r.state is ReplicaState.STARTING for r in live)
        ready = [r for r in live if r.state is ReplicaState.READY]
        queued = self.queue.waiting()
        want = max(spec.min_replicas - n_live, 0)
        if (queued and not n_live) or (
            queued
            and not starting
            and ready
            and all(r.inflight >= spec.max_inflight for r in ready)
            and n_live < spec.max_replicas
        ):
            want = max(want, 1)
        want = max(0, min(want, spec.max_replicas - n_live))
        stop: list[Replica] = []
        if spec.idle_timeout is not None and not queued:
            now = self._clock()
            spare = len(live) - spec.min_replicas
            for r in sorted(ready, key=lambda r: r.last_active):
                if spare <= 0:
                    break
                if r.inflight == 0 and now - r.last_active >= spec.idle_timeout:
                    stop.append(r)
                    spare -= 1
        return want, stop

    def has_capacity_soon(self) -> bool:
        """Whether a live replica exists (ready or starting) or is being launched."""
        return self.launching > 0 or any(r.live for r in self.replicas)

    def tier(self) -> Tier:
        """``hot`` (a ready replica), ``staged`` (weights on this node's disk) or ``cold`` (store only)."""
        hot = any(r.state is ReplicaState.READY for r in self.replicas)
        try:
            return weights_tier(self.spec, self.weights_cache, hot=hot)
        except OSError:  # an unreadable cache reads as cold
            return "cold"

    def describe(self) -> dict[str, Any]:
        """Queue depth, in-flight, tier, replicas and metrics."""
        return {
            "model": self.spec.ref,
            "tier": self.tier(),
            "weights_uri": redact(self.spec.weights_uri) if self.spec.weights_uri else None,
            "prestaging": self.prestaging,
            "queue_depth": sum(1 for w in self.queue if not w.finished),
            "inflight": sum(r.inflight for r in self.replicas if r.live),
            "replicas": [r.describe() for r in self.replicas],
            "metrics": self.metrics.describe(),
            "fairness": self.queue.describe(),
            "settings": {
                k: getattr(self.spec, k)
                for k in ("min_replicas", "max_replicas", "max_inflight", "max_queue", "idle_timeout")
            },
        }


def new_log_dir() -> Path:
    """A fresh directory for one replica's logs."""
    return Path(tempfile.mkdtemp(prefix="faas-replica-"))
