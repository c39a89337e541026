"""A pool killed with SIGKILL does not leave its engine or its workers behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.warmpool._pool_helpers import wait_for
from warmpool.local._pool import pid_alive

SCRIPT = textwrap.dedent(
    """
    import sys, time, faas
    from tests.faas.test_embedded import complete
    if __name__ == "__main__":
        c = faas.Client(store=sys.argv[1])
        print(complete.with_client(c).remote("The quick brown"), flush=True)
        print("ENGINE", c.pool.replicas()[0].host.pid, flush=True)
        print("WORKERS", *c.pool.worker_pids(), flush=True)
        time.sleep(120)
    """
)


def test_engine_and_workers_exit_when_their_pool_is_killed(tiny_model_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), (tmp_path / "store").as_uri()],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "fox jumps over the lazy dog."
        engine = int(proc.stdout.readline().split()[1])
        workers = [int(p) for p in proc.stdout.readline().split()[1:]]
        assert len(workers) == 2 and all(pid_alive(p) for p in [engine, *workers])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not pid_alive(engine), 10, "the orphaned engine to exit")
        wait_for(lambda: not any(pid_alive(p) for p in workers), 10, "the orphaned workers to exit")
    finally:
        proc.kill()
        proc.wait(10)
