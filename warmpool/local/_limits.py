"""Resource limits of a worker process, and the typed error a function gets past one.

A pool that isolates tenants (see :mod:`warmpool.local._tenants`) gives each
tenant's workers :class:`WorkerLimits`. The worker applies them to itself
(``setrlimit``) after it has imported everything and before it says Ready, so
no user code runs without them:

- ``memory_bytes``: ``RLIMIT_AS``, the worker's address space. An allocation past
  it raises ``MemoryError`` in the function.
- ``open_files``: ``RLIMIT_NOFILE``. ``open()`` past it raises ``EMFILE``.
- ``processes``: ``RLIMIT_NPROC``. The kernel counts it per Unix user (threads
  included) and does not enforce it for root, so it is real only with identity
  mapping (the tenant's workers run as its own user). A ``fork()`` past it
  raises ``EAGAIN``.
- ``nice``: the worker's CPU priority below the engines' (``os.nice``), set
  first thing in the worker (``--nice``), so its imports run at it too.
- ``cpu_seconds``: CPU seconds of one invocation's thread, checked by a watchdog
  thread in the worker every :data:`CPU_CHECK_INTERVAL` s. A thread cannot be
  stopped, so the worker answers the invocation with the error and exits; the
  pool replaces it. Threads a function starts itself are not counted.

:func:`classify` turns those failures into :class:`runtime.ResourceLimitError`
(naming the limit) in the invocation's Result; the pool then replaces the
worker and never retries the invocation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from dataclasses import dataclass

from runtime import ErrorInfo, ResourceLimitError, Result, error_info

CPU_CHECK_INTERVAL = 0.1
"""Seconds between the CPU watchdog's checks of running invocations."""


@dataclass(frozen=True)
class WorkerLimits:
    """Limits of one worker process (None: not limited).

    Attributes:
        memory_bytes: Address space of the worker (``RLIMIT_AS``); leave a few
            hundred MB above what its imports take (about 0.3 GB virtual).
        cpu_seconds: CPU seconds one invocation's thread may use.
        open_files: Open file descriptors (``RLIMIT_NOFILE``).
        processes: Processes and threads of the worker's Unix user
            (``RLIMIT_NPROC``; not enforced for root). Count the worker's own
            threads: about ``threads_per_worker + 8`` per worker of that user.
        nice: Added to the worker's CPU niceness (``os.nice``): user code then
            yields the CPU to the shared engines and the service, which every
            tenant's latency depends on.
    """

    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    open_files: int | None = None
    processes: int | None = None
    nice: int | None = None

    def apply(self) -> None:
        """Lower this process's limits (any user may lower its own)."""
        for which, value in (
            (resource.RLIMIT_AS, self.memory_bytes),
            (resource.RLIMIT_NOFILE, self.open_files),
            (resource.RLIMIT_NPROC, self.processes),
        ):
            if value is not None:
                resource.setrlimit(which, (int(value), int(value)))

    @property
    def is_set(self) -> bool:
        """Whether any limit is set."""
        values = (self.memory_bytes, self.cpu_seconds, self.open_files, self.processes, self.nice)
        return any(v is not None for v in values)


def limit_error(limit: str, limits: WorkerLimits, detail: str) -> ResourceLimitError:
    """The error for going past ``limit`` (``memory``, ``cpu``, ``open_files``, ``processes``)."""
    value = {
        "memory": limits.memory_bytes,
        "cpu": limits.cpu_seconds,
        "open_files": limits.open_files,
        "processes": limits.processes,
    }[limit]
    unit = {"memory": " bytes", "cpu": " CPU seconds"}.get(limit, "")
    return ResourceLimitError(
        f"The function went past its worker's {limit} limit ({value}{unit}): {detail}. "
        "The invocation was ended.",
        limit,
    )


def _which(info: ErrorInfo, limits: WorkerLimits) -> str | None:
    """Which limit a failed invocation's error shows it hit, if any."""
    name = info.type_name.rsplit(".", 1)[-1]
    if name == "MemoryError" and limits.memory_bytes is not None:
        return "memory"
    if limits.open_files is not None and info.message.startswith(f"[Errno {errno.EMFILE}]"):
        return "open_files"
    if limits.processes is not None and (
        (info.message.startswith(f"[Errno {errno.EAGAIN}]") and _at_process_limit(limits.processes))
        or (name == "RuntimeError" and "can't start new thread" in info.message)
    ):
        return "processes"
    return None


def classify(result: Result, limits: WorkerLimits) -> Result:
    """The Result with a resource failure of the function made a typed ResourceLimitError."""
    info = result.error
    if info is None or info.kind not in ("user", "system"):
        return result
    limit = _which(info, limits)
    if limit is None:
        return result
    exc = limit_error(limit, limits, f"{info.type_name}: {info.message}")
    return result.model_copy(update={"error": error_info(exc, "user", with_traceback=False)})


def _at_process_limit(limit: int) -> bool:
    """Whether this user runs (about) ``limit`` tasks: an EAGAIN then came from the process limit."""
    uid = os.getuid()
    tasks = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{entry.name}/task"))
    return tasks >= limit - 2


def kill_strays() -> int:
    """Kill the processes of this worker's process group other than itself, and reap them.

    A worker is started in its own session, so what a function forked (and
    did not move to another session) is in its group. Returns how many it killed.
    """
    me = os.getpid()
    if os.getpgrp() != me:
        return 0  # not a group of its own: its group holds others' processes
    killed: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == me:  # pgrp
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
    for pid in killed:  # a killed child's slot counts against the process limit until reaped
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    reap_children()
    return len(killed)


def reap_children() -> None:
    """Reap every exited child of this process (never blocks)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
