"""A Parsl launcher that makes every block of a HighThroughputExecutor an engine host.

HTEX hands its provider the worker pool command; the provider passes it through
its launcher, which decides how that command runs on the block's nodes
(``SingleNodeLauncher`` locally, ``SrunLauncher`` under Slurm, ``MpiExecLauncher``
under PBS, ...). :class:`EngineBlockLauncher` wraps the command in
``python -m warmpool._block`` *before* the inner launcher fans it out, so on
every node the wrapper starts the node-local engine first and then the worker
pool beside it, whatever scheduler is underneath. (``worker_init`` cannot do
this: it runs once per job script, before the launcher, and cannot own the
worker pool's lifetime.)
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from parsl.launchers import SingleNodeLauncher
from parsl.launchers.base import Launcher


class EngineBlockLauncher(Launcher):  # type: ignore[misc]
    """Wrap the worker pool command so the block starts its engine first.

    Args:
        run_dir: Where block status files go (``<run_dir>/blocks/...``).
        model_file: The model spec as JSON, readable on the nodes; None runs
            the worker pool with no engine.
        engine_factory: ``module:function`` building the engine host from
            ``(ModelSpec, log_dir)`` on the node.
        failed_linger: Seconds a block whose engine failed keeps answering
            tasks with that error before it exits.
        inner: The scheduler's launcher (default ``SingleNodeLauncher``).
        python: The interpreter on the nodes (default: this one).
    """

    def __init__(
        self,
        run_dir: str,
        model_file: str | None = None,
        engine_factory: str = "warmpool._replica:default_engine_factory",
        failed_linger: float = 30.0,
        inner: Launcher | None = None,
        python: str = sys.executable,
        debug: bool = False,
    ) -> None:
        super().__init__(debug=debug)
        # Same names as the parameters: parsl's RepresentationMixin reprs from them.
        self.run_dir = run_dir
        self.model_file = model_file
        self.engine_factory = engine_factory
        self.failed_linger = failed_linger
        self.inner = inner if inner is not None else SingleNodeLauncher(debug=debug)
        self.python = python

    def wrap(self, command: str) -> str:
        """The worker pool command behind the engine-host wrapper."""
        argv = [self.python, "-m", "warmpool._block", "--run-dir", str(Path(self.run_dir))]
        if self.model_file is not None:
            argv += ["--model-file", self.model_file]
        argv += ["--engine-factory", self.engine_factory, "--failed-linger", str(self.failed_linger), "--"]
        return f"{shlex.join(argv)} {command}"

    def __call__(self, command: str, tasks_per_node: int, nodes_per_block: int, script_dir: str = "") -> str:
        """Wrap ``command``, then let the inner launcher run it on the block's nodes."""
        return str(self.inner(self.wrap(command), tasks_per_node, nodes_per_block, script_dir))
