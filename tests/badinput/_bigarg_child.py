"""Pass one large argument to a function in a fresh process and report the peak memory of both sides.

Run as ``python -m tests.badinput._bigarg_child KIND MIB WHERE`` (``KIND``:
``bytes`` or ``bytearray``; ``WHERE``: a store URL for an embedded client, or a
service's URL for a remote one); prints one JSON line: the argument's size, the
growth of this process's peak RSS (``VmHWM``) from before the argument was
made, the growth of the worker's peak RSS from before the call, whether the
function saw the value intact, and the seconds the call took. A fresh process
keeps the test runner's own peak out of the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import faas


def peak_rss(*, reset: bool = False) -> int:
    """This process's peak resident set size (``VmHWM``) in bytes; ``reset``: first bring it down to now.

    Resetting (``5`` to ``/proc/self/clear_refs``) keeps an earlier peak (another
    call on the same worker) from hiding this one's.
    """
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@faas.function(timeout=600)
def probe() -> dict[str, int]:
    """The worker's pid and peak RSS, reset to its RSS now (the baseline before the large call)."""
    return {"pid": os.getpid(), "peak": peak_rss(reset=True)}


@faas.function(timeout=600)
def measure(data: bytes | bytearray) -> dict[str, Any]:
    """What the function received (type, size, a sample of its bytes) and the worker's peak RSS."""
    ends = bytes(data[:1]) + bytes(data[-1:])
    seen = {"type": type(data).__name__, "size": len(data), "ends": ends.hex()}
    return {"pid": os.getpid(), "peak": peak_rss(), **seen}


def connect(where: str) -> faas.Client | faas.RemoteClient:
    """A service's client (``where`` is its URL; the token is in ``$FAAS_TOKEN``), else an embedded one."""
    if where.startswith("http"):
        return faas.RemoteClient(where, timeout=600)
    return faas.Client(store=where, workers=1)


def main(kind: str, mib: int, where: str) -> dict[str, object]:
    """Submit ``measure(value)`` for a ``kind`` value of ``mib`` MiB; the numbers as a dict."""
    size = mib << 20
    with connect(where) as client:
        base = probe.with_client(client).remote()
        before = peak_rss(reset=True)
        # One allocation each (a concatenation would hold two copies for a moment).
        value = b"\x07" * size if kind == "bytes" else bytearray(b"\x07") * size
        start = time.monotonic()
        seen = measure.with_client(client).remote(value)
        seconds = time.monotonic() - start
    return {
        "size": size,
        "client_growth": peak_rss() - before,
        "worker_growth": int(seen["peak"]) - base["peak"],
        "same_worker": seen["pid"] == base["pid"],
        "type": seen["type"],
        "received": seen["size"],
        "ends": seen["ends"],
        "seconds": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3])), flush=True)
