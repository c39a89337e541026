"""The block wrapper (``python -m warmpool.globus_compute.block``): launch command, groups, nodes, parent.

The wrapper runs as a real process with the real CPU engine on the tiny
model; the "worker pool" it wraps is a small script that reports what a worker
would see, so these tests need no interchange.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from registry import ModelSpec
from tests.warmpool._pool_helpers import wait_for
from warmpool.engines._host import CpuEngineHost, SubprocessEngineHost
from warmpool.engines._placement import NodePlacement
from warmpool.globus_compute._launcher import HTEX_LAUNCH_CMD, JINJA_BLOCK_ID, block_launch_cmd
from warmpool.globus_compute.block import accelerator_groups, block_dirs, multinode_spec, read_status
from warmpool.globus_compute.task import engine_url_for
from warmpool.local._pool import pid_alive

ROOT = Path(__file__).resolve().parents[2]

# The "worker pool": asks each group's engine, as an HTEX worker with that group would, then exits.
REPORT = textwrap.dedent(
    """
    import json, os, sys, httpx
    from warmpool.globus_compute.task import engine_url_for
    out = {"url": os.environ.get("FAAS_ENGINE_URL"), "urls": os.environ.get("FAAS_ENGINE_URLS"),
           "error": os.environ.get("FAAS_ENGINE_ERROR"), "by_group": {}}
    for group in sys.argv[2:]:
        if group.startswith("--"):
            break
        url, _ = engine_url_for({**os.environ, "CUDA_VISIBLE_DEVICES": group})
        body = {"text": "The quick brown", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        answer = httpx.post(url + "/generate", json=body, timeout=60).json() if url else None
        out["by_group"][group] = {"url": url, "tokens": answer and answer["meta_info"]["completion_tokens"]}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _tiny(tiny_model_path: Path, tmp_path: Path) -> Path:
    spec = ModelSpec(name="tiny-llama", version="block", model_path=str(tiny_model_path), startup_timeout=120)
    path = tmp_path / "model.json"
    path.write_text(spec.model_dump_json())
    return path


def rank_factory(spec: ModelSpec, log_dir: Path) -> SubprocessEngineHost:
    """A stand-in for a non-head SGLang rank: serves nothing (module level: the wrapper imports it)."""
    (log_dir / "spec.json").write_text(spec.model_dump_json())
    command = [sys.executable, "-c", "import time; time.sleep(300)"]
    return SubprocessEngineHost(lambda _port_file: command, log_dir=log_dir, name="rank")


# -- pure functions ---------------------------------------------------------------------------------


def test_htex_launch_cmd_copy_matches_parsl() -> None:
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    assert HTEX_LAUNCH_CMD == DEFAULT_LAUNCH_CMD


def test_block_launch_cmd_formats_like_htex() -> None:
    cmd = block_launch_cmd(run_dir="/r/{x}", model_file="/m.json", parent_pid=7, failed_linger=3.0)
    values = {k: f"<{k}>" for k in ("debug", "max_workers_per_node", "addresses", "prefetch_capacity",
              "cores_per_worker", "mem_per_worker", "poll_period", "worker_port", "cert_dir", "logdir",
              "logconf", "heartbeat_period", "address_probe_timeout_string", "heartbeat_threshold",
              "drain_period", "cpu_affinity", "enable_mpi_mode", "mpi_launcher", "accelerators",
              "nodes_per_block")}  # fmt: skip
    once = cmd.format(**values)  # initialize_scaling
    final = once.format(block_id="3")  # _get_launch_command
    assert final.startswith(
        f"{sys.executable} -m warmpool.globus_compute.block --run-dir /r/{{x}} --nodes-per-block=<nodes"
    )
    assert "--model-file /m.json" in final and "--parent-pid 7" in final and "--failed-linger 3.0" in final
    assert f"--exec {sys.executable} -m parsl.executors.high_throughput.process_worker_pool" in final
    assert "--block_id=3 " in final and final.endswith("--available-accelerators <accelerators>")
    jinja = block_launch_cmd(python=("globus-compute-endpoint", "python-exec"), jinja=True)
    assert JINJA_BLOCK_ID in jinja and "--run-dir {logdir}" in jinja and "--model" not in jinja


def test_accelerator_groups_are_distinct_and_ordered() -> None:
    pool = ["pool", "-a", "x", "--available-accelerators", "0,1", "0,1", "2,3", "2,3"]
    assert accelerator_groups(pool) == ["0,1", "2,3"]
    assert accelerator_groups([*pool, "--other", "9"]) == ["0,1", "2,3"]
    assert accelerator_groups(["pool", "--available-accelerators"]) == []
    assert accelerator_groups(["pool"]) == []


def test_worker_picks_its_groups_engine() -> None:
    urls = json.dumps({"0,1,2,3": "http://a", "4,5,6,7": "http://b"})
    env = {"FAAS_ENGINE_URL": "http://a", "FAAS_ENGINE_URLS": urls}
    assert engine_url_for({**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ("http://b", "4,5,6,7")
    assert engine_url_for({**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == ("http://a", "0,1,2,3")
    assert engine_url_for({**env, "CUDA_VISIBLE_DEVICES": "9"}) == ("http://a", None)  # unknown group
    assert engine_url_for(env) == ("http://a", None)
    assert engine_url_for({"FAAS_ENGINE_URL": "http://a", "CUDA_VISIBLE_DEVICES": "0"}) == ("http://a", None)
    assert engine_url_for({}) == (None, None)


def test_multinode_spec_carries_the_placement() -> None:
    spec = ModelSpec(name="big", engine="sglang", model_path="/w", engine_args={"tp": 8, "pp": 4})
    placement = NodePlacement(4, 2, "nid001", 50000, "slurm")
    args = multinode_spec(spec, placement).engine_args
    assert args == {"tp": 8, "pp": 4, "nnodes": 4, "node_rank": 2, "dist_init_addr": "nid001:50000"}
    assert multinode_spec(spec, NodePlacement(1, 0, "h")) is spec
    from warmpool.engines._sglang import sglang_argv

    argv = sglang_argv(multinode_spec(spec, placement), port=30000, host="0.0.0.0")
    assert argv[argv.index("--node-rank") + 1] == "2" and argv[argv.index("--nnodes") + 1] == "4"
    assert argv[argv.index("--dist-init-addr") + 1] == "nid001:50000"


# -- the wrapper as a process --------------------------------------------------------------------------


def _run_block(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warmpool.globus_compute.block", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wrapper_starts_one_engine_per_accelerator_group(tiny_model_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    out = tmp_path / "out.json"
    # Two "groups" (labels; the CPU engine ignores CUDA_VISIBLE_DEVICES), each shared by two workers.
    pool = [
        sys.executable,
        str(script),
        str(out),
        "gA",
        "gB",
        "--available-accelerators",
        "gA",
        "gA",
        "gB",
        "gB",
    ]
    model = _tiny(tiny_model_path, tmp_path)
    done = _run_block(
        ["--run-dir", str(tmp_path / "run"), "--model-file", str(model), "--exec", *pool], _env()
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["error"] is None
    urls = json.loads(report["urls"])
    assert sorted(urls) == ["gA", "gB"] and urls["gA"] != urls["gB"]
    assert report["url"] == urls["gA"]
    assert {g: r["url"] for g, r in report["by_group"].items()} == urls
    assert all(r["tokens"] == 2 for r in report["by_group"].values())
    [block] = block_dirs(tmp_path / "run")
    status = read_status(block)
    assert status is not None and status["state"] == "stopped" and status["urls"] == urls
    pids = [e["pid"] for e in status["engines"]]
    assert [e["group"] for e in status["engines"]] == ["gA", "gB"] and len(set(pids)) == 2
    assert not [p for p in pids if pid_alive(p)], "the wrapper stops every engine when the pool exits"


def test_model_from_the_environment_and_failure(tiny_model_path: Path, tmp_path: Path) -> None:
    from registry import Registry
    from runtime import store_from_url

    script = tmp_path / "report.py"
    script.write_text(REPORT)
    url = (tmp_path / "store").as_uri()
    spec = ModelSpec(name="tiny-llama", version="env", model_path=str(tiny_model_path))
    Registry(store_from_url(url)).register_model(spec)
    env = {**_env(), "FAAS_MODEL": spec.ref, "FAAS_STORE": url, "FAAS_NODES_PER_BLOCK": "1"}
    out = tmp_path / "out.json"
    done = _run_block(
        ["--run-dir", str(tmp_path / "run"), "--exec", sys.executable, str(script), str(out), "x"], env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["error"] is None and report["urls"] is None
    assert report["by_group"]["x"] == {"url": report["url"], "tokens": 2}  # no groups: FAAS_ENGINE_URL

    out.unlink()
    env["FAAS_MODEL"] = "tiny-llama@missing"
    done = _run_block(
        [
            "--run-dir",
            str(tmp_path / "run2"),
            "--failed-linger",
            "60",
            "--exec",
            sys.executable,
            str(script),
            str(out),
        ],
        env,
    )
    assert done.returncode == 0, done.stderr
    error = json.loads(out.read_text())["error"]
    assert "failed to start" in error and "tiny-llama@missing" in error
    [block] = block_dirs(tmp_path / "run2")
    assert (read_status(block) or {})["state"] == "failed"


def test_non_head_node_runs_its_rank_and_serves_through_the_head(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    head = CpuEngineHost(tiny_model_path, served_model_name="tiny-llama@mn", log_dir=tmp_path / "head")
    head.start()
    try:
        head.wait_ready(120)
        assert head.url is not None
        port = head.url.rsplit(":", 1)[1]
        script = tmp_path / "report.py"
        script.write_text(REPORT)
        out = tmp_path / "out.json"
        env = {**_env(), "FAAS_NODE_RANK": "1", "FAAS_NNODES": "2", "FAAS_HEAD_ADDR": "127.0.0.1"}
        spec = ModelSpec(name="tiny-llama", version="mn", model_path=str(tiny_model_path), startup_timeout=60)
        model = tmp_path / "model.json"
        model.write_text(spec.model_dump_json())
        args = ["--run-dir", str(tmp_path / "run"), "--model-file", str(model), "--nodes-per-block", "2",
                "--engine-port", port, "--engine-factory", "tests.warmpool.test_gce_block:rank_factory",
                "--exec", sys.executable, str(script), str(out), "all"]  # fmt: skip
        done = _run_block(args, env)
        assert done.returncode == 0, done.stderr
        report = json.loads(out.read_text())
        assert report["url"] == f"http://127.0.0.1:{port}" and report["by_group"]["all"]["tokens"] == 2
        [block] = block_dirs(tmp_path / "run")
        status = read_status(block) or {}
        assert status["placement"] == {"nnodes": 2, "node_rank": 1, "head": "127.0.0.1", "source": "launcher"}
        rank_spec = json.loads((block / "spec.json").read_text())
        assert rank_spec["engine_args"] == {"nnodes": 2, "node_rank": 1, "dist_init_addr": "127.0.0.1:50000"}
        assert not pid_alive(status["engines"][0]["pid"]), "the rank process stops with its block"
    finally:
        head.stop()


def test_block_stops_when_its_parent_pid_is_gone(tiny_model_path: Path, tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    pool = [sys.executable, "-c", "import time; time.sleep(300)"]
    args = ["--run-dir", str(tmp_path / "run"), "--model-file", str(_tiny(tiny_model_path, tmp_path)),
            "--parent-pid", str(parent.pid), "--exec", *pool]  # fmt: skip
    block = subprocess.Popen([sys.executable, "-m", "warmpool.globus_compute.block", *args], env=_env())
    try:

        def ready() -> dict[str, Any] | None:
            dirs = block_dirs(tmp_path / "run")
            status = read_status(dirs[0]) if dirs else None
            return status if status and status.get("worker_pool_pid") and status["state"] == "ready" else None

        status = wait_for(ready, 120, "the block to be ready")
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert block.wait(30) == 0
        for pid in (status["pid"], status["worker_pool_pid"]):
            wait_for(lambda p=pid: not pid_alive(p), 15, f"process {pid} to exit")
        final = read_status(block_dirs(tmp_path / "run")[0]) or {}
        assert final["state"] == "stopped" and "is gone" in final["error"]
    finally:
        for proc in (parent, block):
            proc.kill()
            proc.wait(10)


def test_watch_only_passes_stdin_and_stops_with_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    child = "import sys, time; print(sys.stdin.readline().strip(), flush=True); time.sleep(300)"
    watch = subprocess.Popen(
        [sys.executable, "-m", "warmpool.globus_compute.block", "--watch-only", "--parent-pid",
         str(parent.pid), "--exec", sys.executable, "-c", child],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert watch.stdin is not None and watch.stdout is not None
        watch.stdin.write("hello\n")
        watch.stdin.flush()
        assert watch.stdout.readline().strip() == "hello"
        parent.kill()
        parent.wait(10)
        assert watch.wait(30) == 0
    finally:
        for proc in (parent, watch):
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("bad", [["--run-dir", "x"], ["--exec"]])
def test_usage_errors(bad: list[str]) -> None:
    done = _run_block(bad, _env(), timeout=30)
    assert done.returncode != 0 and "warmpool.globus_compute.block" in done.stderr
