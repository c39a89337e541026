"""glibc malloc settings for the long-running service process.

Under steady load the service's resident memory crept up ~0.4 MiB a minute
while Python's own heap (tracemalloc, obmalloc arenas) and SQLite's stayed flat:
the growth was in glibc's heap and per-thread arenas, in ~1.9 MiB steps. glibc
raises its mmap threshold every time a large block is freed (up to 32 MiB), so
later large blocks (dict tables, HTTP bodies, JSON) are carved from the arenas,
where a freed block's pages stay resident while any neighbour lives; and each
of the service's threads may get an arena of its own. Fixed thresholds keep
large blocks in mmap (returned on free) and let the heap shrink; two arenas
bound the per-thread spread. Measured in docs/benchmarks.md (load).

An operator's own ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` (or ``GLIBC_TUNABLES``) win: nothing is set then.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("faas.service")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 128 * 1024))
_OPERATOR_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Apply the settings above to this process; True if glibc took them.

    Call it before the process starts threads (an arena made earlier stays).
    A no-op off Linux, on another C library (musl has no ``mallopt``), or when
    the operator set glibc's variables.
    """
    if sys.platform != "linux" or any(v in os.environ for v in _OPERATOR_VARS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in _SETTINGS)  # mallopt returns 1 on success
    if not ok:
        log.debug("glibc refused a malloc setting; running with its defaults")
    return ok
