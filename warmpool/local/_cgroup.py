"""One CPU share per tenant: a cgroup (v1 ``cpu`` controller) holding its workers and what they fork.

Niceness orders a tenant's processes below the engines, but a tenant that forks
forty processes still gets forty times the CPU of a tenant with one. A cgroup
per tenant gives each tenant's processes together one share (``cpu.shares`` =
1024, like a single process of the pool), whatever their number.

Best effort: it needs the cgroup v1 ``cpu`` hierarchy mounted writable and the
right to make groups in it (root, in most containers). The v2 hierarchy is not
used yet (its rule that a group with processes cannot delegate controllers
would mean moving the service itself). Where groups cannot be made, the pool
logs it once and runs without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("faas.pool")

_V1_MOUNTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"))


def _own_v1_path() -> str | None:
    """Our group in the v1 ``cpu`` hierarchy (from ``/proc/self/cgroup``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                return path
    return None


class TenantCgroups:
    """The pool's CPU groups: ``<our cpu group>/faas-<pool>/<tenant>``.

    Args:
        pool_id: Names the pool's group (one per pool, removed at :meth:`close`).
        nice: The tenant workers' niceness: each group weighs what one process at
            that niceness weighs (``cpu.shares`` 1024 at 0, about 110 at 10), so a
            tenant's processes together yield to the engines as one niced process would.
    """

    def __init__(self, pool_id: str, nice: int = 0) -> None:
        self.base: Path | None = None
        self.shares = max(2, round(1024 / 1.25 ** max(0, min(19, nice))))
        own = _own_v1_path()
        mount = next((m for m in _V1_MOUNTS if (m / "cgroup.procs").exists()), None)
        if own is None or mount is None:
            log.info("No cgroup v1 cpu hierarchy here: tenants' workers share the CPU by niceness only")
            return
        base = mount / own.lstrip("/") / f"faas-{pool_id}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            log.info("Cannot make cpu cgroups (%s): tenants' workers share the CPU by niceness only", exc)
            return
        self.base = base

    @property
    def enabled(self) -> bool:
        """Whether groups can be made here."""
        return self.base is not None

    def place(self, tenant: str, pid: int) -> bool:
        """Put process ``pid`` (a new worker, before it runs anything) in ``tenant``'s group."""
        if self.base is None:
            return False
        group = self.base / _safe(tenant)
        try:
            if not group.exists():
                group.mkdir()
                (group / "cpu.shares").write_text(f"{self.shares}\n")
            (group / "cgroup.procs").write_text(f"{pid}\n")
            return True
        except OSError as exc:
            log.warning("Cannot put worker %d of tenant %s in its cpu cgroup: %s", pid, tenant, exc)
            return False

    def pids(self, tenant: str) -> list[int]:
        """The processes in ``tenant``'s group."""
        if self.base is None:
            return []
        with contextlib.suppress(OSError):
            text = (self.base / _safe(tenant) / "cgroup.procs").read_text()
            return [int(p) for p in text.split()]
        return []

    def remove(self, tenant: str) -> None:
        """Remove ``tenant``'s group once empty (a group with processes stays)."""
        if self.base is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.base / _safe(tenant))

    def close(self, wait: float = 2.0) -> None:
        """Remove the pool's groups, waiting up to ``wait`` s for killed processes to leave them."""
        if self.base is None:
            return
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(OSError):
                for group in self.base.iterdir():
                    if group.is_dir():
                        with contextlib.suppress(OSError):
                            os.rmdir(group)
            with contextlib.suppress(OSError):
                os.rmdir(self.base)
            if not self.base.exists() or time.monotonic() > deadline:
                return
            time.sleep(0.05)  # polling for exiting processes to leave, not synchronisation


def _safe(tenant: str) -> str:
    """A group name for a tenant name (tenant names are ``[a-z0-9_-]``; anything else is replaced)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in tenant)
    return f"t-{cleaned}"[:200]
