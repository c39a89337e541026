"""A Globus Compute block's engine host: ``python -m warmpool.globus_compute.block [options] --exec CMD``.

HTEX's ``launch_cmd`` runs this wrapper once per node in place of the worker
pool command (see :mod:`warmpool.globus_compute._launcher`). It starts the node-local
engine(s) for the block's model, waits until they are ready, then runs the
worker pool as a child with the engines' addresses in its environment, so
every thin worker on the node talks to a resident engine:

- ``FAAS_ENGINE_URL``: the first (usually the only) engine;
- ``FAAS_ENGINE_URLS``: ``{"<accelerator group>": url, ...}`` as JSON when the
  worker pool has accelerator groups; one engine is started per distinct group
  (``--available-accelerators 0,1,2,3 0,1,2,3 4,5,6,7 ...`` on the worker pool
  command: two tp-4 engines, each with ``CUDA_VISIBLE_DEVICES`` set to its
  group). A worker finds its engine by its own ``CUDA_VISIBLE_DEVICES``, which
  HTEX sets from the same groups (:func:`warmpool.globus_compute.task.engine_url_for`);
- ``FAAS_ENGINE_INFO``: kind, version, block id and cold start of the engine;
- ``FAAS_ENGINE_ERROR``: set instead when the engine failed to start.

The model comes from ``--model-file``, ``--model REF`` (with ``--store``), or
the environment a rendered endpoint config's ``worker_init`` exports:
``FAAS_MODEL_FILE``, or ``FAAS_MODEL`` with ``FAAS_STORE`` (default: the
default store URL). ``--no-model`` runs the worker pool with no engine.

Multi-node blocks (``--nodes-per-block`` or ``FAAS_NODES_PER_BLOCK`` > 1): every
node starts its own rank of one SGLang server with ``--nnodes``,
``--node-rank`` and ``--dist-init-addr`` from
:func:`warmpool.engines._placement.placement_from_env`, on the HTTP port
``--engine-port`` / ``FAAS_ENGINE_PORT`` (default 30000, the same on every
node). Only rank 0 serves HTTP (bound to every address). A non-head node
keeps its rank process running, waits until the head answers
``/health_generate``, and then runs its worker pool against the head
(``FAAS_ENGINE_URL=http://<head>:<port>``), so the workers of every node of
the block are thin clients of the one engine. If a rank dies, its block ends.

State goes to ``<run_dir>/blocks/<block>-<host>-<pid>/status.json``
(``starting``, ``ready``, ``failed`` or ``stopped``, with URLs, pids, times and
the engine's log tail), which the pool reads to report replicas.

- Scale-in (SIGTERM to the block's process group): stop the worker pool and
  the engines, record ``stopped``.
- The worker pool exits, or an engine dies: stop the rest, record it, exit;
  the executor's scaler starts a new block when work is waiting.
- A worker pool process dies while not running a task: restart the worker
  pool, keeping the engine (an idle worker's death wedges HTEX's task queue;
  see :mod:`warmpool.globus_compute._workers`).
- ``--parent-pid P`` (the in-process pool on this host): when P is gone the
  block stops as on scale-in, so a SIGKILLed pool leaves no engine behind.
- The engine fails to start: record ``failed`` with its log tail and still run
  the worker pool, with ``FAAS_ENGINE_ERROR`` set, so tasks fail at once with
  that error instead of waiting; after ``--failed-linger`` seconds the wrapper
  exits so that a later invocation gets a fresh block (a fresh try).

``--watch-only --parent-pid P --exec CMD`` only runs CMD (stdin passed through)
until it exits or P is gone; the pool wraps its interchange in it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from warmpool._procs import descendants, pid_alive
from warmpool.globus_compute._workers import BUSY_DIR_ENV, WorkerWatch

_RESTART_GRACE_S = 2.0  # a pool that ends its own workers (a shutdown) exits within this
_MAX_RESTARTS_PER_MINUTE = 3

ENGINE_URL_ENV = "FAAS_ENGINE_URL"
ENGINE_URLS_ENV = "FAAS_ENGINE_URLS"
ENGINE_INFO_ENV = "FAAS_ENGINE_INFO"
ENGINE_ERROR_ENV = "FAAS_ENGINE_ERROR"
MODEL_ENV = "FAAS_MODEL"
MODEL_FILE_ENV = "FAAS_MODEL_FILE"
STORE_ENV = "FAAS_STORE"
NODES_ENV = "FAAS_NODES_PER_BLOCK"
ENGINE_PORT_ENV = "FAAS_ENGINE_PORT"
DEFAULT_ENGINE_FACTORY = "warmpool:default_engine_factory"
DEFAULT_MULTINODE_PORT = 30000
EXEC = "--exec"
"""Separator before the wrapped command (``--`` is also accepted, but ``globus-compute-endpoint
python-exec`` drops every ``--``)."""

_BLOCK_ID = re.compile(r"--block_id=(\S+)")


class BlockError(ValueError):
    """The wrapper's options or the block's environment are inconsistent."""


class _Terminated(BaseException):
    """SIGTERM arrived while the engines were still starting."""


def block_dirs(run_dir: Path) -> list[Path]:
    """Every block directory the wrappers of one executor created, oldest first."""
    root = run_dir / "blocks"
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if (p / "status.json").exists()), key=lambda p: p.stat().st_mtime
    )


def read_status(block_dir: Path) -> dict[str, Any] | None:
    """A block's ``status.json``; None while it is being replaced or unreadable."""
    try:
        data = json.loads((block_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_status(block_dir: Path, status: dict[str, Any]) -> None:
    tmp = block_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status, default=str))
    os.replace(tmp, block_dir / "status.json")  # readers never see a half-written file


def _load_factory(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    if not module or not name:
        raise BlockError(f"The engine factory {path!r} is not of the form 'module:function'.")
    factory = getattr(importlib.import_module(module), name)
    if not callable(factory):
        raise BlockError(f"The engine factory {path!r} is not callable.")
    return factory  # type: ignore[no-any-return]


def worker_pool_argv(command: list[str]) -> list[str]:
    """The worker pool command, run with this interpreter.

    ``globus-compute-endpoint python-exec M`` execs ``python -m M``; doing that
    directly spares the block a PATH lookup of the endpoint's console script.
    """
    if command[:2] == ["globus-compute-endpoint", "python-exec"]:
        return [sys.executable, "-m", *command[2:]]
    if command[:1] == ["process_worker_pool.py"]:
        return [sys.executable, "-m", "parsl.executors.high_throughput.process_worker_pool", *command[1:]]
    return command


def accelerator_groups(command: list[str]) -> list[str]:
    """The distinct accelerator groups of an HTEX worker pool command, in order.

    HTEX passes ``available_accelerators`` as ``--available-accelerators G1 G2 ...``;
    a group repeated N times means N workers share one engine.
    """
    groups: list[str] = []
    for i, arg in enumerate(command):
        if arg == "--available-accelerators":
            for value in command[i + 1 :]:
                if value.startswith("-"):
                    break
                if value not in groups:
                    groups.append(value)
        elif arg.startswith("--available-accelerators="):
            groups += [g for g in arg.split("=", 1)[1].split() if g not in groups]
    return groups


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (or, for None, leave alone) environment variables for an engine started inside."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    seps = [i for i, a in enumerate(argv) if a in (EXEC, "--")]
    if not seps:
        raise SystemExit(
            "usage: python -m warmpool.globus_compute.block [options] --exec <worker pool command>"
        )
    split = seps[0]
    parser = argparse.ArgumentParser(prog="python -m warmpool.globus_compute.block")
    parser.add_argument("--run-dir", type=Path, help="where blocks/<id>/status.json goes")
    parser.add_argument("--model-file", type=Path, help="the ModelSpec as JSON")
    parser.add_argument("--model", help=f"model NAME@VERSION in the store (default: ${MODEL_ENV})")
    parser.add_argument("--store", help=f"store URL of --model (default: ${STORE_ENV})")
    parser.add_argument("--no-model", action="store_true", help="run the worker pool with no engine")
    parser.add_argument("--nodes-per-block", type=int, help=f"default: ${NODES_ENV}, else 1")
    parser.add_argument("--engine-port", type=int, help=f"multi-node HTTP port (default: ${ENGINE_PORT_ENV})")
    parser.add_argument("--engine-factory", default=DEFAULT_ENGINE_FACTORY)
    parser.add_argument("--failed-linger", type=float, default=30.0)
    parser.add_argument("--parent-pid", type=int, help="stop the block when this process is gone")
    parser.add_argument("--watch-only", action="store_true", help="only run the command under the watch")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if len(command) == 1:
        command = shlex.split(command[0])
    if not command:
        raise SystemExit("warmpool.globus_compute.block: the worker pool command is empty.")
    if args.run_dir is None and not args.watch_only:
        raise SystemExit("warmpool.globus_compute.block: --run-dir is required.")
    return args, command


def resolve_model(args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    """The block's ModelSpec from the options, else the environment; None for no engine.

    Raises:
        BlockError: A model file cannot be read, or the model is not in the store.
    """
    from registry import ModelSpec

    if args.no_model:
        return None
    path = args.model_file or (Path(env[MODEL_FILE_ENV]) if env.get(MODEL_FILE_ENV) else None)
    if path is not None:
        try:
            return ModelSpec.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BlockError(f"The model file {path} cannot be read as a ModelSpec: {exc}") from None
    ref = args.model or env.get(MODEL_ENV, "").strip()
    if not ref:
        return None
    from registry import Registry
    from runtime import default_store_url, store_from_url

    url = args.store or env.get(STORE_ENV, "").strip() or default_store_url()
    try:
        return Registry(store_from_url(url)).get_model(ref)
    except Exception as exc:
        raise BlockError(f"The block's model {ref!r} cannot be read from the store {url}: {exc}") from None


def _nodes_per_block(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    raw = args.nodes_per_block if args.nodes_per_block is not None else env.get(NODES_ENV, "").strip() or 1
    try:
        nodes = int(raw)
    except ValueError:
        raise BlockError(f"{NODES_ENV}={raw!r} is not an integer.") from None
    if nodes < 1:
        raise BlockError(f"nodes_per_block must be at least 1, got {nodes}.")
    return nodes


def multinode_spec(spec: Any, placement: Any) -> Any:
    """``spec`` with this node's ``nnodes``/``node_rank``/``dist_init_addr`` in its engine_args."""
    if placement.nnodes <= 1:
        return spec
    args = dict(spec.engine_args) | {
        "nnodes": placement.nnodes,
        "node_rank": placement.node_rank,
        "dist_init_addr": placement.dist_init_addr,
    }
    return spec.model_copy(update={"engine_args": args})


def build_engine(factory: str, spec: Any, log_dir: Path, *, multinode: bool, port: int | None) -> Any:
    """The engine host for one engine of the block (not started).

    SGLang through the default factory gets the block's port and, for a
    multi-node engine, binds every address (other nodes' workers reach the head).
    Any other engine comes from ``factory(spec, log_dir)``. A model with
    ``weights_uri`` is staged into this node's weights cache when it starts.
    """
    from warmpool.weights import StagedEngineHost, WeightsCache, needs_staging

    def build(spec: Any, log_dir: Path) -> Any:
        if factory == DEFAULT_ENGINE_FACTORY and spec.engine == "sglang":
            from warmpool.engines._sglang import SGLangEngineHost

            host = "0.0.0.0" if multinode else "127.0.0.1"
            return SGLangEngineHost.from_spec(spec, log_dir=log_dir, host=host, port=port or 0)
        return _load_factory(factory)(spec, log_dir)

    if needs_staging(spec):  # weights from the store into this node's cache first ($FAAS_WEIGHTS_CACHE)
        return StagedEngineHost(spec, build, log_dir, WeightsCache())
    return build(spec, log_dir)


def _head_url(placement: Any, port: int) -> str:
    host = placement.head_addr
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _wait_head(engine: Any, url: str, deadline: float) -> None:
    """On a non-head node: wait until the head serves, while this node's rank stays alive."""
    import httpx

    from runtime import EngineError

    delay = 0.05
    while True:
        if not engine.alive():
            tail = engine.log_tail()
            raise EngineError(f"This node's engine rank exited before the head was ready:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health_generate", timeout=10.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise EngineError(f"The head engine at {url} was not ready in time.")
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 1.5, 1.0)


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """SIGTERM this process (the same path as scale-in) once ``pid`` is gone."""
    while not stop.wait(0.25):
        if not pid_alive(pid):
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: list[str] | None = None) -> int:
    """Start the engines, run the worker pool beside them, stop all; return the exit code."""
    args, command = _parse(sys.argv[1:] if argv is None else argv)
    if args.watch_only:
        return _watch_only(command, args.parent_pid)
    match = _BLOCK_ID.search(" ".join(command))
    block_id = match.group(1) if match else "0"
    host = socket.gethostname()
    block_dir = args.run_dir / "blocks" / f"{block_id}-{host}-{os.getpid()}"
    block_dir.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {
        "block_id": block_id,
        "host": host,
        "wrapper_pid": os.getpid(),
        "parent_pid": args.parent_pid,
        "state": "starting",
        "url": None,
        "urls": {},
        "pid": None,
        "engines": [],
        "started": time.time(),
        "ready": None,
        "stopped": None,
        "log_tail": "",
        "error": None,
        "engine": None,
    }
    _write_status(block_dir, status)

    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if starting:
            raise _Terminated

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()

    engines: list[Any] = []
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        spec: Any = None
        try:
            spec = resolve_model(args, os.environ)
            if spec is not None:
                _start_engines(args, command, spec, block_dir, status, engines, env)
            else:
                status.update(state="ready", ready=time.time())
        except _Terminated:
            raise
        except Exception as exc:
            tails = [e.log_tail(40) for e in engines]
            tail = "\n".join(t for t in tails if t)
            what = spec.ref if spec is not None else "its model"
            message = f"The engine of {what} on block {block_id} ({host}) failed to start: {exc}"
            if tail and tail not in message:
                message += f"\nLog tail:\n{tail}"
            for engine in engines:
                engine.stop()
            status.update(state="failed", error=message, log_tail=tail, stopped=None)
            env[ENGINE_ERROR_ENV] = message
        _write_status(block_dir, status)
        starting = False
        if stop.is_set():
            raise _Terminated
        return _run_pool(worker_pool_argv(command), env, engines, status, block_dir, stop, args)
    except _Terminated:
        return 143
    finally:
        stop.set()
        for engine in engines:
            engine.stop()
        if status["state"] in ("starting", "ready"):
            status["state"] = "stopped"
        status["stopped"] = time.time()
        if engines and not status["log_tail"]:
            with contextlib.suppress(Exception):
                status["log_tail"] = engines[0].log_tail(20)
        _write_status(block_dir, status)


def _start_engines(
    args: argparse.Namespace,
    command: list[str],
    spec: Any,
    block_dir: Path,
    status: dict[str, Any],
    engines: list[Any],
    env: dict[str, str],
) -> None:
    """Start one engine per accelerator group (or this node's rank of a multi-node engine)."""
    from warmpool.engines._placement import placement_from_env

    nodes = _nodes_per_block(args, os.environ)
    placement = placement_from_env(os.environ, nodes_per_block=nodes, hostname=socket.gethostname())
    multinode = placement.nnodes > 1
    groups: list[str | None] = list(accelerator_groups(command)) or [None]
    if multinode and len(groups) > 1:
        raise BlockError(
            f"A multi-node engine uses every accelerator of its node, but the worker pool has "
            f"{len(groups)} accelerator groups ({', '.join(g or '' for g in groups)}); use one group."
        )
    port: int | None = None
    if multinode:
        raw = args.engine_port or os.environ.get(ENGINE_PORT_ENV, "").strip() or DEFAULT_MULTINODE_PORT
        try:
            port = int(raw)
        except ValueError:
            raise BlockError(f"{ENGINE_PORT_ENV}={raw!r} is not an integer.") from None
        status["placement"] = {"nnodes": placement.nnodes, "node_rank": placement.node_rank,
                               "head": placement.head_addr, "source": placement.source}  # fmt: skip
    spec_here = multinode_spec(spec, placement)
    deadline = time.monotonic() + spec.startup_timeout
    for i, group in enumerate(groups):
        log_dir = block_dir if i == 0 else block_dir / f"engine-{i}"
        # The engine inherits this process's environment when it starts: its group's devices.
        with _environ(CUDA_VISIBLE_DEVICES=group):
            engine = build_engine(args.engine_factory, spec_here, log_dir, multinode=multinode, port=port)
            engines.append(engine)
            engine.start()
        status["engines"].append({"group": group, "pid": engine.pid, "url": None})
        status["pid"] = status["pid"] or engine.pid
        _write_status(block_dir, status)
    for entry, engine in zip(status["engines"], engines, strict=True):
        if multinode and not placement.is_head:
            assert port is not None
            entry["url"] = _head_url(placement, port)
            _wait_head(engine, entry["url"], deadline)
        else:
            engine.wait_ready(max(1.0, deadline - time.monotonic()))
            entry["url"] = str(engine.url)
    info = engines[0].server_info() if not multinode or placement.is_head else {}
    url = status["engines"][0]["url"]
    status.update(
        state="ready",
        url=url,
        urls={e["group"]: e["url"] for e in status["engines"] if e["group"] is not None},
        ready=time.time(),
        engine={
            "kind": spec.engine,
            "version": str(info["version"]) if info.get("version") else None,
            "args": dict(spec.engine_args),
            "url": url,
            "model_path": info.get("model_path") or spec.model_path,
        },
    )
    status["cold_start_s"] = status["ready"] - status["started"]
    env[ENGINE_URL_ENV] = str(url)
    if status["urls"]:
        env[ENGINE_URLS_ENV] = json.dumps(status["urls"])
    env[ENGINE_INFO_ENV] = json.dumps(
        {**status["engine"], "block_id": status["block_id"], "cold_start_s": status["cold_start_s"]}
    )


def _run_pool(
    argv: list[str],
    env: dict[str, str],
    engines: list[Any],
    status: dict[str, Any],
    block_dir: Path,
    stop: threading.Event,
    args: argparse.Namespace,
) -> int:
    busy_dir = block_dir / "busy"
    env = {**env, BUSY_DIR_ENV: str(busy_dir)}
    # Same process group as this wrapper: the provider's group kill reaches both.
    child = _start_pool(argv, env, busy_dir)
    status.update(worker_pool_pid=child.pid, worker_pool_restarts=0)
    _write_status(block_dir, status)
    failed_at = time.monotonic() if status["state"] == "failed" else None
    watch, suspect, restarts = WorkerWatch(child.pid, busy_dir), None, list[float]()
    try:
        while not stop.wait(0.25):  # a watch loop: the child, the engines and the clock
            if child.poll() is not None:
                break
            now = time.monotonic()
            if suspect is None and watch.idle_deaths():
                suspect = now  # a wedge (see _workers), unless the pool is shutting itself down
            if suspect is not None and now - suspect >= _RESTART_GRACE_S:
                restarts = [t for t in restarts if now - t < 60.0] + [now]
                if len(restarts) > _MAX_RESTARTS_PER_MINUTE:
                    status.update(
                        state="failed", error="The worker pool's processes keep dying; the block ends."
                    )
                    _write_status(block_dir, status)
                    break
                print("A worker pool process died idle; restarting the worker pool.", file=sys.stderr)
                _stop_tree(child)
                child = _start_pool(argv, env, busy_dir)
                status.update(
                    worker_pool_pid=child.pid, worker_pool_restarts=status["worker_pool_restarts"] + 1
                )
                _write_status(block_dir, status)
                watch, suspect = WorkerWatch(child.pid, busy_dir), None
            dead = [e for e in engines if not e.alive()] if status["state"] == "ready" else []
            if dead:
                tail = dead[0].log_tail(40)
                status.update(
                    state="failed",
                    error=f"The engine (pid {dead[0].pid}) exited while serving. Log tail:\n{tail}",
                    log_tail=tail,
                )
                _write_status(block_dir, status)
                break
            if failed_at is not None and time.monotonic() - failed_at > args.failed_linger:
                break
    finally:
        if args.parent_pid and not pid_alive(args.parent_pid) and status["state"] == "ready":
            status["error"] = f"The pool process (pid {args.parent_pid}) is gone; the block stopped with it."
        _stop_tree(child)
    return int(child.returncode or 0) if child.returncode and child.returncode > 0 else 0


def _start_pool(argv: list[str], env: dict[str, str], busy_dir: Path) -> subprocess.Popen[bytes]:
    """Start the worker pool, with no busy marks left from an earlier one (pids are reused)."""
    shutil.rmtree(busy_dir, ignore_errors=True)
    busy_dir.mkdir()
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)


def _stop_tree(child: subprocess.Popen[bytes]) -> None:
    """Stop ``child`` and whatever it started (HTEX's worker pool leaves a multiprocessing manager)."""
    tree = descendants(child.pid)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
    for pid in tree:  # orphaned when their parent went: nobody else will reap or stop them
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _watch_only(command: list[str], parent_pid: int | None) -> int:
    """Run ``command`` (stdin passed through) until it exits, SIGTERM arrives, or the parent is gone."""
    child = subprocess.Popen(command)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while child.poll() is None and not stop.wait(0.25):
            if parent_pid and not pid_alive(parent_pid):
                break
    finally:
        _stop_tree(child)
    return child.returncode if child.returncode and child.returncode > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
