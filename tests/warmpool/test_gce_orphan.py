"""A SIGKILLed process holding a GlobusComputePool leaves no interchange, block or engine behind.

The blocks get ``--parent-pid`` (the pool's pid) and the interchange runs under
``warmpool.globus_compute.block --watch-only``; both stop when that pid is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.warmpool._pool_helpers import wait_for
from warmpool._procs import descendants, pid_alive

pytest.importorskip("globus_compute_endpoint")

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from registry import ModelSpec, Registry
    from runtime import store_from_url
    from tests.warmpool._pool_helpers import generate, register, submit
    from warmpool.globus_compute._pool import GlobusComputePool
    if __name__ == "__main__":
        registry = Registry(store_from_url(sys.argv[1]))
        spec = ModelSpec(name="tiny-llama", version="orphan", model_path=sys.argv[2])
        fn = register(registry, generate, model=True)
        pool = GlobusComputePool(registry.store, run_dir=sys.argv[3], address="127.0.0.1", workers_per_node=1)
        pool.start()
        result = submit(pool, fn, "The quick brown", 2, model=spec).result(120)
        interchange = pool._engines[spec.ref].engine.executor.interchange_proc.pid
        report = {"ok": result.ok, "blocks": pool.block_pids(), "interchange": interchange}
        print(json.dumps(report), flush=True)
        time.sleep(300)
    """
)


def test_blocks_engines_and_interchange_exit_when_the_pool_is_killed(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    argv = [
        sys.executable,
        str(script),
        (tmp_path / "store").as_uri(),
        str(tiny_model_path),
        str(tmp_path / "run"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report["ok"]
        pids = [*report["blocks"], report["interchange"], *descendants(report["interchange"])]
        assert len(pids) >= 5, pids  # wrapper, worker pool, engine, interchange watch, interchange
        assert all(pid_alive(p) for p in pids)
        # Everything the pool started, however deep (HTEX's worker pool starts a multiprocessing
        # manager, for one), must go too.
        everything = {*pids, *descendants(proc.pid)}
        for pid in list(everything):
            everything.update(descendants(pid))
        pids = sorted(everything)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for pid in pids:
            wait_for(lambda p=pid: not pid_alive(p), 30, f"orphaned process {pid} to exit")
    finally:
        proc.kill()
        proc.wait(10)
