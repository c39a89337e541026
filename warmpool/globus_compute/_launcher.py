"""HTEX launch commands that make every block of a HighThroughputExecutor an engine host.

HTEX starts a block by handing its provider ``launch_cmd`` (the worker pool
command, with placeholders such as ``{addresses}`` and ``{{block_id}}``); the
provider's own launcher (``SingleNodeLauncher``, ``SrunLauncher``,
``MpiExecLauncher``, ...) then runs it on each of the block's nodes. Setting
``launch_cmd`` to ``<python> -m warmpool.globus_compute.block [options] --exec <HTEX's default
command>`` makes every node start its engine first and run the worker pool
beside it, whatever scheduler is underneath. It is one mechanism for both
users: the in-process pool (:class:`warmpool.globus_compute._engine.ModelEngine`) and
standalone endpoints started from a rendered YAML config (whose launcher
types can only be named from ``parsl.launchers``, so a custom launcher class
is not an option there). ``worker_init`` cannot do this: it runs once per job
script, before the launcher, and cannot own the worker pool's lifetime.
"""

from __future__ import annotations

import sys

HTEX_LAUNCH_CMD = (
    "process_worker_pool.py {debug} {max_workers_per_node} "
    "-a {addresses} "
    "-p {prefetch_capacity} "
    "-c {cores_per_worker} "
    "-m {mem_per_worker} "
    "--poll {poll_period} "
    "--port={worker_port} "
    "--cert_dir {cert_dir} "
    "--logdir={logdir} "
    "--logconf={logconf} "
    "--block_id={{block_id}} "
    "--hb_period={heartbeat_period} "
    "{address_probe_timeout_string} "
    "--hb_threshold={heartbeat_threshold} "
    "--drain_period={drain_period} "
    "--cpu-affinity {cpu_affinity} "
    "{enable_mpi_mode} "
    "--mpi-launcher={mpi_launcher} "
    "--available-accelerators {accelerators}"
)
"""parsl's ``HighThroughputExecutor`` default ``launch_cmd`` (a test keeps the copy equal to parsl's)."""

WORKER_POOL_MODULE = "parsl.executors.high_throughput.process_worker_pool"
ENDPOINT_PYTHON = ("globus-compute-endpoint", "python-exec")
"""How a Globus Compute endpoint runs Python modules on a node without relying on PATH's ``python``."""

JINJA_BLOCK_ID = "{% raw %}{{block_id}}{% endraw %}"
"""``{{block_id}}`` protected from the endpoint's Jinja rendering of its config template."""


def _literal(text: str) -> str:
    """Protect braces in a value from HTEX's two ``str.format`` passes over the launch command."""
    return text.replace("{", "{{{{").replace("}", "}}}}")


def block_launch_cmd(
    *,
    python: tuple[str, ...] | list[str] = (sys.executable, "-m"),
    run_dir: str | None = None,
    model_file: str | None = None,
    no_model: bool = False,
    engine_factory: str | None = None,
    failed_linger: float | None = None,
    parent_pid: int | None = None,
    jinja: bool = False,
) -> str:
    """An HTEX ``launch_cmd`` that runs the worker pool behind ``warmpool.globus_compute.block``.

    Args:
        python: How to run a module on the nodes: ``(python, "-m")`` or
            :data:`ENDPOINT_PYTHON` (``globus-compute-endpoint python-exec``).
        run_dir: Where block status files go; None: HTEX's worker log directory
            (``{logdir}``, under the endpoint's run directory). Paths must not
            contain whitespace: GlobusComputeEngine re-splits the command on it.
        model_file: The ModelSpec as JSON, readable on the nodes. With neither
            this nor ``no_model`` the block reads ``FAAS_MODEL``/``FAAS_STORE``
            (or ``FAAS_MODEL_FILE``) from its environment.
        no_model: Run the worker pool with no engine.
        engine_factory: ``module:function`` building the engine host on the node.
        failed_linger: Seconds a block whose engine failed answers with that error.
        parent_pid: Stop every block when this process (the pool, on the same host) is gone.
        jinja: Protect ``{{block_id}}`` for an endpoint config template (rendered by Jinja).

    Returns:
        The command template; HTEX fills the placeholders (``{nodes_per_block}``,
        ``{logdir}``, ``{addresses}``, ...) when it starts scaling, and ``{block_id}``
        per block.
    """
    argv = [*python, "warmpool.globus_compute.block"]
    argv += ["--run-dir", _literal(run_dir) if run_dir is not None else "{logdir}"]
    argv.append("--nodes-per-block={nodes_per_block}")
    if model_file is not None:
        argv += ["--model-file", _literal(model_file)]
    if no_model:
        argv.append("--no-model")
    if engine_factory is not None:
        argv += ["--engine-factory", _literal(engine_factory)]
    if failed_linger is not None:
        argv += ["--failed-linger", str(failed_linger)]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    pool = " ".join([*python, WORKER_POOL_MODULE])
    command = HTEX_LAUNCH_CMD.replace("process_worker_pool.py", pool, 1)
    if jinja:
        command = command.replace("{{block_id}}", JINJA_BLOCK_ID)
    return f"{' '.join(argv)} --exec {command}"


def interchange_launch_cmd(parent_pid: int, python: str = sys.executable) -> list[str]:
    """HTEX's interchange under the block wrapper's ``--watch-only``: it exits when ``parent_pid`` is gone."""
    return [
        python, "-m", "warmpool.globus_compute.block", "--watch-only", "--parent-pid", str(parent_pid),
        "--exec", python, "-m", "parsl.executors.high_throughput.interchange",
    ]  # fmt: skip
