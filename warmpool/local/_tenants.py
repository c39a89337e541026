"""Per-tenant worker processes: a tenant's functions run only in workers of that tenant.

The engines stay shared (that is the point of a warm pool); what runs a
tenant's code does not. With :class:`TenantWorkers` given to the pool
(``Pool(tenant_workers=...)``), an invocation of tenant ``T`` is dispatched
only to ``T``'s own :class:`~warmpool.local._workers.WorkerSet`, started on
demand and retired after ``idle_timeout`` seconds without work. Invocations
without a tenant (an embedded client's) use the pool's shared set, as do all
invocations when tenants are not isolated.

Each tenant's workers may run as a Unix user of its own (``users``), with a
clean environment built per tenant (``env`` / ``env_for``: the service's own
credentials never reach them), and with resource limits
(:class:`~warmpool.local._limits.WorkerLimits`). Killing or crashing one
tenant's worker loses only that tenant's invocations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime import ErrorInfo, IdentityMappingError, Result, WorkerStartError
from warmpool.local._cgroup import TenantCgroups
from warmpool.local._limits import WorkerLimits
from warmpool.local._worker import Partial
from warmpool.local._workers import WorkerLaunch, WorkerProc, WorkerSet, resolve_user

__all__ = ["TenantWorkers", "WorkerLimits", "WorkerSets"]


class TenantWorkers(BaseModel):
    """How a pool isolates tenants: their own workers, users, environments and limits.

    Attributes:
        workers: Worker processes per active tenant.
        threads: Invocations one tenant worker runs at once (None: the pool's ``threads_per_worker``).
        idle_timeout: Seconds without work after which a tenant's workers are stopped.
        memory_bytes: Address-space limit of each tenant worker (see :class:`WorkerLimits`).
        cpu_seconds: CPU seconds one invocation may use.
        open_files: Open files of each tenant worker.
        processes: Processes and threads of a tenant's Unix user (real only with ``users``).
        nice: CPU niceness added to tenant workers, so their code yields to the engines.
        users: Tenant name -> the Unix user its workers run as (the pool must run as root).
        env: Tenant name -> environment variables its workers get (its own credentials).
        user_of: Called with a tenant name when its workers start: its Unix user, or
            None (overrides ``users``; the service reads its token file this way).
        env_for: Called with a tenant name when its workers start: extra environment
            variables for them (the ``tenant_env`` hook; added after ``env``).
        cpu_share: Give each tenant's workers and what they fork one CPU share
            together (a cgroup, where the pool may make one; see
            :mod:`warmpool.local._cgroup`), so forking more does not buy more CPU.
        python: The interpreter tenant workers run (None: this process's); a mapped Unix
            user must be able to run it and to read the project's packages.
        clean_env: Tenant workers start from a clean environment (no ``AWS_*``,
            ``FAAS_TOKENS`` or other credentials of the pool). None (the default):
            clean when the tenant has a Unix user or environment of its own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    workers: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)
    idle_timeout: float = Field(60.0, gt=0)
    memory_bytes: int | None = Field(None, gt=0)
    cpu_seconds: float | None = Field(None, gt=0)
    open_files: int | None = Field(None, gt=0)
    processes: int | None = Field(None, gt=0)
    nice: int | None = Field(None, ge=0, le=19)
    users: dict[str, str] = Field(default_factory=dict)
    env: dict[str, dict[str, str]] = Field(default_factory=dict)
    user_of: Callable[[str], str | None] | None = None
    env_for: Callable[[str], dict[str, str]] | None = None
    clean_env: bool | None = None
    python: str | None = None
    cpu_share: bool = True

    @property
    def limits(self) -> WorkerLimits:
        """The resource limits of every tenant worker."""
        return WorkerLimits(self.memory_bytes, self.cpu_seconds, self.open_files, self.processes, self.nice)

    def user(self, tenant: str) -> str | None:
        """The Unix user ``tenant``'s workers run as, if any."""
        return self.user_of(tenant) if self.user_of is not None else self.users.get(tenant)

    def check(self, tenants: list[str] | None = None) -> None:
        """Check that every mapped user can be used (``tenants``: those besides ``users``' keys).

        Raises:
            IdentityMappingError: A user does not exist, is root, or this process is not root.
        """
        for tenant in {*self.users, *(tenants or [])}:
            name = self.user(tenant)
            if name is not None:
                resolve_user(name)

    def launch(self, tenant: str) -> WorkerLaunch:
        """How ``tenant``'s workers are started."""
        user = self.user(tenant)
        env = {**self.env.get(tenant, {}), **(self.env_for(tenant) if self.env_for is not None else {})}
        clean = self.clean_env if self.clean_env is not None else bool(user or env)
        limits = self.limits
        return WorkerLaunch(
            tenant=tenant, user=user, env=env, clean_env=clean,
            limits=limits if limits.is_set else None, new_session=True, python=self.python,
        )  # fmt: skip


class WorkerSets:
    """The pool's worker sets: one shared set, and one per active tenant when tenants are isolated.

    Args:
        store_config: ``ObjectStore.config()`` the workers open.
        size: Workers of the shared set.
        threads: Invocations one worker runs at once.
        lock: The pool's lock.
        on_result, on_exit, on_partial: As for :class:`WorkerSet`.
        tenants: How tenants are isolated (None: every invocation uses the shared set).
        clock: The pool's monotonic clock (idle timeouts).
    """

    def __init__(
        self,
        store_config: dict[str, Any],
        size: int,
        threads: int,
        lock: threading.RLock,
        on_result: Callable[[WorkerProc, Result], None],
        on_exit: Callable[[WorkerProc, list[Any]], None],
        on_partial: Callable[[WorkerProc, Partial], None] | None,
        tenants: TenantWorkers | None,
        clock: Callable[[], float],
    ) -> None:
        self._args = (store_config, threads, lock, on_result, on_exit, on_partial)
        self._lock = lock
        self._clock = clock
        self.tenants = tenants
        self.shared = WorkerSet(store_config, size, threads, lock, on_result, on_exit, on_partial)
        self._sets: dict[str, WorkerSet] = {}
        self._last_used: dict[str, float] = {}
        self._retired_spawned = 0
        self.closed = False
        self.cgroups: TenantCgroups | None = None
        if tenants is not None and tenants.cpu_share:
            self.cgroups = TenantCgroups(f"{os.getpid()}-{id(self) & 0xFFFF:04x}", tenants.nice or 0)
        self._gone: set[str] = set()  # retired tenants whose groups are still to be emptied

    def key(self, tenant: str | None) -> str | None:
        """Which set runs ``tenant``'s invocations (None: the shared one)."""
        return tenant if self.tenants is not None else None

    def set_for(self, tenant: str | None, *, create: bool = True) -> WorkerSet | None:
        """The set of ``tenant``, started on demand (caller holds the lock)."""
        key = self.key(tenant)
        if key is None:
            return self.shared
        ws = self._sets.get(key)
        if ws is None and create and not self.closed:
            assert self.tenants is not None
            store_config, threads, lock, on_result, on_exit, on_partial = self._args
            launch = self.tenants.launch(key)
            if self.cgroups is not None and self.cgroups.enabled:
                launch = dataclasses.replace(launch, place=functools.partial(self.cgroups.place, key))
            self._gone.discard(key)
            ws = WorkerSet(
                store_config, self.tenants.workers, self.tenants.threads or threads, lock,
                on_result, on_exit, on_partial, launch=launch,
            )  # fmt: skip
            self._sets[key] = ws
            ws.start()
        if ws is not None:
            self._last_used[key] = self._clock()
        return ws

    # -- what the pool calls ---------------------------------------------------
    def start(self) -> None:
        """Start the shared set (unless tenants are isolated: then it starts when needed)."""
        if self.tenants is None:
            self.shared.start()

    def pick(self, tenant: str | None) -> WorkerProc | None:
        """The worker for the next invocation of ``tenant`` (caller holds the lock)."""
        ws = self.set_for(tenant)
        return ws.pick() if ws is not None else None

    def start_error(self, tenant: str | None) -> WorkerStartError | IdentityMappingError | None:
        """Why ``tenant``'s invocations cannot run, if its workers cannot start (caller holds the lock)."""
        ws = self.set_for(tenant, create=False)
        return ws.start_error() if ws is not None else None

    def owner(self, worker: WorkerProc) -> WorkerSet:
        """The set a worker belongs to."""
        if worker.tenant is None:
            return self.shared
        ws = self._sets.get(worker.tenant)
        return ws if ws is not None and worker in ws.workers else self.shared

    def abandon(self, worker: WorkerProc, invocation_id: str, attempt: int) -> None:
        """See :meth:`WorkerSet.abandon`."""
        with self._lock:
            ws = self.owner(worker)
        ws.abandon(worker, invocation_id, attempt)

    def after_limit(self, worker: WorkerProc, error: ErrorInfo) -> None:
        """Replace a worker whose function ran out of memory: its heap is suspect.

        After the other limits the worker is whole (its function's children are
        killed, its files closed), and a new worker would cost a process start.
        """
        if "worker's memory limit" in error.message:
            with self._lock:
                self.owner(worker).replace(worker)

    @property
    def workers(self) -> list[WorkerProc]:
        """Every live worker, shared and tenants'."""
        return [w for ws in (self.shared, *self._sets.values()) for w in ws.workers]

    @property
    def spawned(self) -> int:
        """Worker processes started so far."""
        sets = (self.shared, *self._sets.values())
        return self._retired_spawned + sum(ws.spawned for ws in sets)

    def tick(self) -> None:
        """Stop the workers of tenants idle for ``idle_timeout`` (their next invocation starts new ones)."""
        if self.tenants is None:
            return
        with self._lock:
            now = self._clock()
            for key, ws in list(self._sets.items()):
                if not ws.idle():
                    self._last_used[key] = now
                elif now - self._last_used.get(key, now) >= self.tenants.idle_timeout:
                    del self._sets[key]
                    self._last_used.pop(key, None)
                    self._retired_spawned += ws.spawned
                    ws.retire_all()
                    self._gone.add(key)
            gone = list(self._gone)
        for key in gone:
            self._empty_group(key)

    def _empty_group(self, tenant: str) -> None:
        """Kill what is left in a retired tenant's cpu group (strays, even in sessions of their own)."""
        if self.cgroups is None:
            return
        with self._lock:
            if tenant in self._sets:
                return  # it came back: its new workers are in the group
            pids = self.cgroups.pids(tenant)
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                self.cgroups.remove(tenant)
                self._gone.discard(tenant)

    def shutdown(self, timeout: float) -> None:
        """Stop every set's workers and reap them."""
        with self._lock:
            self.closed = True
            sets = [self.shared, *self._sets.values()]
        for ws in sets:
            ws.shutdown(timeout)
        if self.cgroups is not None:
            for tenant in {*self._gone, *(ws.launch.tenant for ws in sets if ws.launch.tenant)}:
                for pid in self.cgroups.pids(tenant):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            self.cgroups.close()
