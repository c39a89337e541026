"""Replica lifecycle for the pool: launch, boot, stop, fail, and health probes.

Functions over a :class:`warmpool.local._pool.Pool`, split out so each module keeps one
responsibility; they take the pool's lock where they touch its state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from typing import TYPE_CHECKING

import httpx

from runtime import EngineError, EngineLost
from warmpool._replica import ModelPool, Replica, ReplicaState, new_log_dir, with_answer_journal
from warmpool.weights import StagedEngineHost, needs_staging

if TYPE_CHECKING:
    from warmpool.engines._host import EngineHost
    from warmpool.local._pool import Pool

log = logging.getLogger("faas.pool")


def apply_plan(pool: Pool, mp: ModelPool) -> None:
    with pool._lock:
        if pool._closed:
            return
        want, stop = mp.plan()
        mp.launching += want  # counted as live at once, so a concurrent plan cannot launch them again
        for r in stop:
            r.state = ReplicaState.DRAINING
    for _ in range(want):
        launch(pool, mp)
    for r in stop:
        pool._background(functools.partial(stop_replica, pool, r), f"faas-stop-{r.id}")


def launch(pool: Pool, mp: ModelPool) -> Replica | None:
    """Build and boot one replica; the caller has already added it to ``mp.launching``."""
    try:
        log_dir = pool._log_dir or new_log_dir()
        spec = with_answer_journal(mp.spec, pool._answer_dir)
        if needs_staging(spec):  # the weights come from the store into the node's cache first
            host: EngineHost = StagedEngineHost(spec, pool._engine_factory, log_dir, pool.weights_cache)
        else:
            host = pool._engine_factory(spec, log_dir)
    except Exception as exc:
        with pool._lock:
            mp.launching -= 1
        fail_queue(pool, mp, EngineError(f"No engine can be built for {mp.spec.ref}: {exc}"))
        return None
    with pool._lock:
        mp.launching -= 1
        replica = Replica(spec=mp.spec, host=host, created_at=pool._clock())
        replica.last_active = replica.created_at
        mp.replicas.append(replica)
    pool._background(lambda: boot(pool, mp, replica), f"faas-boot-{replica.id}")
    return replica


def boot(pool: Pool, mp: ModelPool, replica: Replica) -> None:
    """Fetch (if the weights are staged), load and wait for one replica; record each phase's seconds.

    ``startup_timeout`` bounds the load, not the fetch: a first fetch of 2 TB takes what it takes.
    """
    host = replica.host
    try:
        launched = time.monotonic()
        host.start()
        if isinstance(host, StagedEngineHost):
            replica.fetch_s = host.fetch_s
            replica.weights = host.staged.describe() if host.staged is not None else None
            launched = host.launched_at or launched
        else:
            replica.fetch_s = 0.0
        host.wait_ready(mp.spec.startup_timeout)
        now = time.monotonic()
        replica.load_s, replica.ready_s = now - launched, now - replica.launched_mono
    except Exception as exc:
        log.error("Engine replica %s of %s failed to start: %s", replica.id, mp.spec.ref, exc)
        replica.host.stop()
        with pool._lock:
            replica.state = ReplicaState.FAILED
            replica.error = str(exc)
            replica.stopped_at = pool._clock()
            mp.metrics.engine_failures += 1
            others = any(r.live for r in mp.replicas)
        replica.ready_event.set()
        if not others:  # nothing else will serve the queue: fail it rather than hang
            fail_queue(pool, mp, EngineError(f"The engine of {mp.spec.ref} failed to start: {exc}"))
        return
    info = replica.host.server_info()  # engine version and weights path, for provenance
    with pool._lock:
        now = pool._clock()
        replica.ready_at = now
        replica.last_healthy = time.monotonic()
        replica.engine_version = str(info.get("version")) if info.get("version") else None
        replica.engine_model_path = info.get("model_path")
        replica.last_active = now
        replica.cold_start_s = now - replica.created_at
        mp.metrics.cold_starts += 1
        mp.metrics.cold_start_seconds.add(replica.cold_start_s)
        mp.metrics.fetch_seconds.add(replica.fetch_s or 0.0)
        mp.metrics.load_seconds.add(replica.load_s or 0.0)
        if replica.weights is not None:
            mp.metrics.weights_cache_hits += int(bool(replica.weights.get("cache_hit")))
            mp.metrics.weights_fetched_bytes += int(replica.weights.get("fetched_bytes") or 0)
        closed = pool._closed
        if not closed:
            replica.state = ReplicaState.READY
    if closed:
        replica.host.stop()
        replica.state = ReplicaState.STOPPED
    replica.ready_event.set()
    pool._pump(mp)


def start_model(pool: Pool, mp: ModelPool) -> None:
    """At pool start: pre-stage the model's weights if it asks (in the background), and scale it."""
    if mp.spec.prestage and needs_staging(mp.spec):
        pool._background(functools.partial(prestage, pool, mp), f"faas-prestage-{mp.spec.ref}")
    apply_plan(pool, mp)


def prestage(pool: Pool, mp: ModelPool) -> None:
    """Stage a model's weights into the node's cache without starting an engine (``prestage=True``)."""
    assert mp.spec.weights_uri is not None
    mp.prestaging = True
    try:
        pool.weights_cache.stage(mp.spec.weights_uri).release()
        log.info("Pre-staged the weights of %s", mp.spec.ref)
    except Exception as exc:  # a replica start stages again, and reports its own failure
        log.warning("Pre-staging the weights of %s failed: %s", mp.spec.ref, exc)
    finally:
        mp.prestaging = False


def stop_replica(pool: Pool, replica: Replica) -> None:
    replica.host.stop()
    with pool._lock:
        replica.state = ReplicaState.STOPPED
        replica.stopped_at = pool._clock()


def responds(replica: Replica, timeout: float = 2.0) -> bool:
    """Whether the replica's process is alive and its ``/health`` answers 200 within ``timeout``."""
    if not replica.host.alive() or replica.url is None:
        return False
    try:
        return httpx.get(f"{replica.url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def fail_replica(pool: Pool, mp: ModelPool, replica: Replica, reason: str) -> None:
    """Mark a replica failed, retry its invocations elsewhere, and replace it."""
    with pool._lock:
        if replica.state in (ReplicaState.FAILED, ReplicaState.STOPPED):
            return
        replica.state = ReplicaState.FAILED
        replica.stopped_at = pool._clock()
        replica.error = f"{reason}. Log tail:\n{replica.host.log_tail(20)}"
        mp.metrics.engine_failures += 1
        victims = [
            (w, w.invocation.attempt) for w in pool._works.values() if w.replica is replica and not w.finished
        ]
    log.error("Engine replica %s of %s failed: %s", replica.id, mp.spec.ref, reason)
    pool._background(replica.host.stop, f"faas-reap-{replica.id}")
    for work, attempt in victims:
        if work.worker is not None:
            pool._workers.abandon(work.worker, work.invocation.id, attempt)
        lost = EngineLost(f"The engine of {mp.spec.ref} was lost: {reason}.")
        pool._lost(work, lost, "engine_lost", attempt=attempt)
    apply_plan(pool, mp)


def fail_queue(pool: Pool, mp: ModelPool, exc: Exception) -> None:
    with pool._lock:
        waiting = [w for w in mp.queue if not w.finished]
        mp.queue.clear()
    for work in waiting:
        pool._finish(work, None, exc, "engine_lost")


UNHEALTHY_AFTER_S = 30.0
"""A replica whose probes have failed 3 times in a row and for this long is failed.

Both conditions, so a busy engine on an overloaded host is not killed for one slow answer."""


def probe_loop(pool: Pool) -> None:
    """Probe ready replicas over HTTP, record their engine stats, and write status snapshots."""
    with httpx.Client(timeout=5.0) as client:
        while not pool._closed:
            with pool._lock:
                targets = [
                    (mp, r)
                    for mp in pool._models.values()
                    for r in mp.replicas
                    if r.state is ReplicaState.READY
                ]
            for mp, r in targets:
                try:
                    info = client.get(f"{r.url}/server_info")
                    info.raise_for_status()
                    r.engine_stats = dict(info.json().get("stats") or {})
                    r.health_failures = 0
                    r.last_healthy = time.monotonic()
                except (httpx.HTTPError, ValueError):
                    r.health_failures += 1
                    silent = time.monotonic() - (r.last_healthy or time.monotonic())
                    if r.health_failures >= 3 and silent >= UNHEALTHY_AFTER_S:
                        fail_replica(pool, mp, r, f"engine failed its health probes for {silent:.0f} s")
            if pool._status_interval is not None:
                with contextlib.suppress(Exception):
                    pool.store.put(
                        f"pools/{pool.id}/status.json", json.dumps(pool.status(), default=str).encode()
                    )
            pool._stopping.wait(pool._health_interval)
