"""The ``local`` substrate: engine replicas and worker processes as children of this process.

Workers are started as ``python -m warmpool.local.worker`` (never with
multiprocessing's spawn, so they never import the caller's ``__main__``).
"""

from warmpool.local._limits import WorkerLimits
from warmpool.local._pool import Pool, Work
from warmpool.local._tenants import TenantWorkers

__all__ = ["Pool", "TenantWorkers", "Work", "WorkerLimits"]
