"""One GlobusComputeEngine per model pool, and the view of its blocks as engine replicas.

:class:`ModelEngine` owns one ``GlobusComputeEngine`` (Parsl's
HighThroughputExecutor underneath) whose ``launch_cmd`` runs the worker pool
behind :mod:`warmpool.globus_compute.block` (:func:`warmpool.globus_compute._launcher.block_launch_cmd`,
the same mechanism a rendered endpoint config uses), so each block starts the
model's engine on its node. Blocks and the interchange watch this process:
when it dies, even by SIGKILL, they stop, and the engines with them. Pool settings map onto the engine:
``min_replicas`` -> ``init_blocks``/``min_blocks``, ``max_replicas`` ->
``max_blocks``, ``idle_timeout`` -> ``max_idletime``; the scaler runs every
``strategy_period`` seconds so a cold start does not wait on it.

Invocations travel as Globus Compute task messages (a messagepack ``Task``
holding :func:`warmpool.globus_compute.task.run_invocation` by reference and its
arguments), exactly as an endpoint feeds its engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from registry import ModelSpec
from runtime import EngineError
from warmpool._procs import pid_alive
from warmpool._replica import Replica, ReplicaState
from warmpool.globus_compute.block import block_dirs, read_status

ProviderFactory = Callable[[ModelSpec | None], Any]
"""Builds the Parsl execution provider of one model's engine (LocalProvider, SlurmProvider, ...).

The pool then sets its block counts from the model's settings and wraps its launcher."""

_STATES = {
    "starting": ReplicaState.STARTING,
    "ready": ReplicaState.READY,
    "failed": ReplicaState.FAILED,
    "stopped": ReplicaState.STOPPED,
}
_HOST = socket.gethostname()


def local_provider(spec: ModelSpec | None) -> Any:
    """The default provider: blocks are processes on this machine."""
    from parsl.providers import LocalProvider

    return LocalProvider()  # type: ignore[no-untyped-call]


class BlockEngineHost:
    """The engine of one block, seen from the pool (it satisfies ``EngineHost``).

    The block's wrapper owns the engine process; this view reads the block's
    status file and asks the engine over HTTP. Stopping a block's engine is the
    scaler's job (scale-in), so :meth:`start` refuses and :meth:`stop` only
    signals an engine on this host that outlived its block.

    Args:
        block_dir: The block's directory (``<run_dir>/blocks/<block>-<host>-<pid>``).
    """

    def __init__(self, block_dir: Path) -> None:
        self.block_dir = block_dir
        self.status: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"BlockEngineHost({self.block_dir.name!r}, url={self.url!r})"

    def refresh(self) -> dict[str, Any]:
        """Re-read the status file (keeping the last good one while it is replaced)."""
        status = read_status(self.block_dir)
        if status is not None:
            if (
                status.get("state") in ("starting", "ready")
                and status.get("host") == _HOST
                and not pid_alive(int(status.get("wrapper_pid") or 0))
            ):
                # SIGKILLed wrapper: it never wrote "stopped"; its engine's parent watch stops the engine.
                status = {**status, "state": "stopped", "error": "the block's wrapper process was killed"}
            self.status = status
        return self.status

    @property
    def url(self) -> str | None:
        """The engine's base URL once ready."""
        url = self.status.get("url")
        return str(url) if url else None

    @property
    def pid(self) -> int | None:
        """The engine's pid on its node."""
        pid = self.status.get("pid")
        return int(pid) if pid else None

    @property
    def state(self) -> str:
        """``starting``, ``ready``, ``failed`` or ``stopped``."""
        return str(self.status.get("state") or "starting")

    def start(self) -> None:
        """Refuse: a block starts its own engine."""
        raise EngineError("A block's engine is started by the block's wrapper, not by the pool.")

    def wait_ready(self, timeout: float) -> float:
        """Poll the status file until ``ready`` (seconds waited) or raise EngineError."""
        t0 = time.monotonic()
        while True:
            state = self.refresh().get("state")
            if state == "ready":
                return time.monotonic() - t0
            if state in ("failed", "stopped"):
                raise EngineError(str(self.status.get("error") or f"The block's engine is {state}."))
            if time.monotonic() - t0 > timeout:
                raise EngineError(
                    f"The engine of block {self.block_dir.name} was not ready after {timeout} s."
                )
            time.sleep(0.1)  # polling a file, not synchronisation

    def alive(self) -> bool:
        """Whether the block reports its engine ready (and, on this host, its process exists)."""
        if self.refresh().get("state") != "ready":
            return False
        pid = self.pid
        return pid is None or self.status.get("host") != _HOST or pid_alive(pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the engine's process group if it is on this host and outlived its block."""
        pid = self.pid
        if pid is None or self.status.get("host") != _HOST or not pid_alive(pid):
            return
        wrapper = int(self.status.get("wrapper_pid") or 0)
        if wrapper and pid_alive(wrapper):
            return  # the block is alive and owns it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the engine's log in the block directory (or the recorded tail)."""
        logs = sorted(self.block_dir.glob("*.log"))
        if not logs:
            return "\n".join(str(self.status.get("log_tail") or "").splitlines()[-lines:])
        data = logs[0].read_bytes()[-65536:]
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def server_info(self) -> dict[str, Any]:
        """The engine's ``/server_info``; empty when it is not reachable."""
        if self.url is None:
            return {}
        try:
            return dict(httpx.get(self.url + "/server_info", timeout=10.0).json())
        except (httpx.HTTPError, ValueError):
            return {}


class ModelEngine:
    """The GlobusComputeEngine serving one model version (or the functions without a model).

    Args:
        spec: The model version; None for functions that call no model.
        run_dir: This engine's run directory (block status files, submit scripts, logs).
        workers_per_node: HTEX workers per block (each runs one invocation at a time).
        provider_factory: Builds the Parsl provider (default: LocalProvider).
        engine_factory: ``module:function`` building the engine host on the node.
        address: Address the workers reach the interchange on (None: HTEX's default).
        strategy_period: Seconds between scaler runs.
        failed_block_linger: Seconds a block whose engine failed answers with that error.
        heartbeat_period: Seconds between worker pool heartbeats.
        heartbeat_threshold: Seconds without a heartbeat before a block's tasks are lost.
        engine_options: Extra GlobusComputeEngine/HighThroughputExecutor keyword arguments.
    """

    def __init__(
        self,
        spec: ModelSpec | None,
        run_dir: Path,
        *,
        workers_per_node: int,
        provider_factory: ProviderFactory = local_provider,
        engine_factory: str = "warmpool:default_engine_factory",
        address: str | None = None,
        strategy_period: float = 0.5,
        failed_block_linger: float = 30.0,
        heartbeat_period: int = 5,
        heartbeat_threshold: int = 20,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from globus_compute_sdk.serialize import ComputeSerializer, DillCode

        from warmpool.globus_compute._launcher import block_launch_cmd, interchange_launch_cmd
        from warmpool.globus_compute.task import run_invocation

        self.spec = spec
        self.run_dir = run_dir
        self.workers_per_node = workers_per_node
        run_dir.mkdir(parents=True, exist_ok=True)
        model_file: str | None = None
        if spec is not None:
            path = run_dir / "model.json"
            path.write_text(spec.model_dump_json())
            model_file = str(path)
        provider = provider_factory(spec)
        blocks = (spec.min_replicas, spec.max_replicas) if spec is not None else (0, 1)
        provider.init_blocks = provider.min_blocks = blocks[0]
        provider.max_blocks = blocks[1]
        launch_cmd = block_launch_cmd(
            run_dir=str(run_dir),
            model_file=model_file,
            no_model=model_file is None,
            engine_factory=engine_factory,
            failed_linger=failed_block_linger,
            parent_pid=os.getpid(),
        )
        idle = spec.idle_timeout if spec is not None else 120.0
        label = f"faas-{spec.ref if spec else 'no-model'}".replace("@", "-").replace("/", "-")
        self.engine = GlobusComputeEngine(
            label=label,
            address=address,
            provider=provider,
            max_workers_per_node=workers_per_node,
            cores_per_worker=1e-3,  # thin clients of the engine: many per core
            heartbeat_period=heartbeat_period,
            heartbeat_threshold=heartbeat_threshold,
            block_error_handler=False,  # block failures are the pool's to report and retry
            encrypted=False,
            launch_cmd=launch_cmd,
            job_status_kwargs={
                "strategy_period": strategy_period,
                "max_idletime": float(idle) if idle is not None else float("inf"),
            },
            **(engine_options or {}),
        )
        # The interchange as `python -m` (as `globus-compute-endpoint python-exec` would exec it),
        # under a watch that stops it when this process is gone.
        self.engine.executor.interchange_launch_cmd = interchange_launch_cmd(os.getpid())
        self.serde = ComputeSerializer(strategy_code=DillCode())  # type: ignore[no-untyped-call]  # functions by reference
        self._code = self.serde.serialize(run_invocation)
        self._replicas: dict[str, Replica] = {}
        self._refreshed = 0.0
        self.started = False

    def start(self) -> None:
        """Start the engine (its interchange and scaler); blocks follow from the settings."""
        self.engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
        self.started = True

    def submit(self, fn: Callable[..., Any] | None, *args: Any) -> Any:
        """Send one task (``run_invocation`` by default) and return its GCFuture."""
        return submit_task(self.engine, self.serde, self._code if fn is None else fn, *args)

    def unpack(self, packed: bytes) -> Any:
        """The task's return value.

        Raises:
            BlockTaskError: The task did not run to an answer (its worker or block was lost).
        """
        from globus_compute_common import messagepack

        message: Any = messagepack.unpack(packed)
        if message.is_error:
            raise BlockTaskError(str(message.data).strip())
        return self.serde.deserialize(message.data)

    def describe(self, queued: int, inflight: int, fairness: Any, metrics: Any) -> dict[str, Any]:
        """The model's entry in the pool's status: its blocks, its load and its settings."""
        spec = self.spec
        assert spec is not None  # the engine of functions without a model is not described
        settings = ("min_replicas", "max_replicas", "max_inflight", "max_queue", "idle_timeout")
        return {
            "model": spec.ref,
            "substrate": "globus-compute",
            "run_dir": str(self.run_dir),
            "queue_depth": queued,
            "inflight": inflight,
            "fairness": fairness,
            "replicas": [r.describe() for r in self.replicas()],
            "metrics": metrics.describe(),
            "settings": {k: getattr(spec, k) for k in settings} | {"workers_per_node": self.workers_per_node},
        }

    def serves(self, url: str) -> bool:
        """Whether a block with an engine at ``url`` may still hand tasks to its workers.

        True while it is ready, and while a block whose engine died is still stopping its
        worker pool (the wrapper records ``stopped`` once that is done).
        """
        for r in self.replicas():
            status = r.host.status if isinstance(r.host, BlockEngineHost) else {}
            urls = {r.url, *(status.get("urls") or {}).values()}
            urls |= {e.get("url") for e in status.get("engines") or [] if isinstance(e, dict)}
            if url in urls and (r.state is ReplicaState.READY or r.stopped_at is None):
                return True
        return False

    def replicas(self) -> list[Replica]:
        """The blocks' engines as replicas, refreshed from their status files."""
        if self.spec is None:
            return []
        now = time.monotonic()
        if now - self._refreshed < 0.05:  # every submit asks; the files change far less often
            return list(self._replicas.values())
        self._refreshed = now
        for block_dir in block_dirs(self.run_dir):
            replica = self._replicas.get(block_dir.name)
            if replica is None:
                host = BlockEngineHost(block_dir)
                replica = self._replicas[block_dir.name] = Replica(
                    spec=self.spec, host=host, created_at=time.time()
                )
            _sync(replica)
        return list(self._replicas.values())

    def block_pids(self) -> list[int]:
        """Wrapper, worker pool and engine pids of every block on this host."""
        pids: list[int] = []
        for block_dir in block_dirs(self.run_dir):
            status = read_status(block_dir) or {}
            if status.get("host") == _HOST:
                pids += [int(status[k]) for k in ("wrapper_pid", "worker_pool_pid", "pid") if status.get(k)]
                more = [int(e["pid"]) for e in status.get("engines") or [] if e.get("pid")]
                pids += [p for p in more if p not in pids]
        return pids

    def shutdown(self, timeout: float = 10.0) -> None:
        """Scale every block in, stop the interchange, and reap what is left on this host."""
        if self.started:
            try:
                self.engine.shutdown()
            except Exception as exc:  # a half-started engine: still reap its blocks below
                print(f"warmpool: shutting down {self.engine.label} failed: {exc!r}", file=sys.stderr)
        deadline = time.monotonic() + timeout
        pids = self.block_pids()
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for SIGTERMed blocks to stop their engines
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if pid == _engine_group(pid):  # an engine leads its own group: take its children too
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)


def submit_task(engine: Any, serde: Any, fn: Any, *args: Any) -> Any:
    """Send ``fn(*args)`` to a GlobusComputeEngine as an endpoint's interchange would; return its GCFuture.

    Args:
        engine: A started ``GlobusComputeEngine``.
        serde: The ``ComputeSerializer`` (functions by reference: ``DillCode``).
        fn: The function, or its already serialised code.
        args: Positional arguments.
    """
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_endpoint.engines.base import GCFuture

    code = fn if isinstance(fn, str) else serde.serialize(fn)
    buffer = serde.pack_buffers([code, serde.serialize(args), serde.serialize({})])
    task_id = uuid.uuid4()
    future = GCFuture(task_id)
    engine.submit(future, messagepack.pack(Task(task_id=task_id, task_buffer=buffer)), {})
    return future


class BlockTaskError(EngineError):
    """A Globus Compute task came back without an answer (its worker or block was lost)."""


def _engine_group(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _sync(replica: Replica) -> None:
    host = replica.host
    assert isinstance(host, BlockEngineHost)
    status = host.refresh()
    state = _STATES.get(str(status.get("state")), ReplicaState.STARTING)
    replica.state = state
    replica.created_at = float(status.get("started") or replica.created_at)
    replica.ready_at = status.get("ready")
    replica.stopped_at = status.get("stopped")
    replica.cold_start_s = status.get("cold_start_s")
    replica.error = status.get("error")
    engine = status.get("engine") or {}
    replica.engine_version = engine.get("version")
    replica.engine_model_path = engine.get("model_path")
    if state is not ReplicaState.STARTING:
        replica.ready_event.set()


def probe() -> Callable[[], str]:
    """The task that answers its block's engine URL (submitting it makes the scaler start a block)."""
    from warmpool.globus_compute.task import engine_url

    return engine_url


def import_path(factory: str | Callable[..., Any]) -> str:
    """``module:function`` of an engine factory, which blocks import by name."""
    if isinstance(factory, str):
        return factory
    module, name = getattr(factory, "__module__", ""), getattr(factory, "__qualname__", "")
    if not module or not name or "<" in name:
        raise ValueError(
            f"The engine factory {factory!r} must be a module-level function (blocks import it by name)."
        )
    return f"{module}:{name}"
