"""The engine host of a Globus Compute block: ``python -m warmpool._block ... -- <worker pool command>``.

The block's launcher runs this wrapper once per node in place of the
HighThroughputExecutor's worker pool command. It starts the node-local engine
for the block's model, waits until it is ready, then runs the worker pool as a
child with ``FAAS_ENGINE_URL`` (and ``FAAS_ENGINE_INFO``) in its environment,
so every thin worker on the node talks to the same resident engine.

Its state goes to ``<run_dir>/blocks/<block>-<host>-<pid>/status.json``
(``starting``, ``ready``, ``failed`` or ``stopped``, with URL, pids, times and
the engine's log tail), which the pool reads to report replicas.

- Scale-in (SIGTERM to the block's process group): stop the worker pool and
  the engine, record ``stopped``.
- The worker pool exits, or the engine dies: stop the other, record it, exit;
  the executor's scaler starts a new block when work is waiting.
- The wrapper is SIGKILLed: the engine's ``--parent-pid`` watch stops it.
- The engine fails to start: record ``failed`` with its log tail and still run
  the worker pool, with ``FAAS_ENGINE_ERROR`` set, so tasks fail at once with
  that error instead of waiting; after ``--failed-linger`` seconds the wrapper
  exits so that a later invocation gets a fresh block (a fresh try).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINE_URL_ENV = "FAAS_ENGINE_URL"
ENGINE_INFO_ENV = "FAAS_ENGINE_INFO"
ENGINE_ERROR_ENV = "FAAS_ENGINE_ERROR"
DEFAULT_ENGINE_FACTORY = "warmpool._replica:default_engine_factory"
_BLOCK_ID = re.compile(r"--block_id=(\S+)")


class _Terminated(BaseException):
    """SIGTERM arrived while the engine was still starting."""


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
        raise ValueError(f"The engine factory {path!r} is not of the form 'module:function'.")
    factory = getattr(importlib.import_module(module), name)
    if not callable(factory):
        raise ValueError(f"The engine factory {path!r} is not callable.")
    return factory  # type: ignore[no-any-return]


def worker_pool_argv(command: list[str]) -> list[str]:
    """The worker pool command, run with this interpreter.

    ``globus-compute-endpoint python-exec M`` execs ``python -m M``; doing that
    directly spares the block a PATH lookup of the endpoint's console script.
    """
    if command[:2] == ["globus-compute-endpoint", "python-exec"]:
        return [sys.executable, "-m", *command[2:]]
    return command


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m warmpool._block [options] -- <worker pool command>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m warmpool._block")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--model-file", type=Path, help="the ModelSpec as JSON (none: no engine)")
    parser.add_argument("--engine-factory", default=DEFAULT_ENGINE_FACTORY)
    parser.add_argument("--failed-linger", type=float, default=30.0)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if len(command) == 1:
        command = shlex.split(command[0])
    if not command:
        raise SystemExit("warmpool._block: the worker pool command is empty.")
    return args, command


def main(argv: list[str] | None = None) -> int:
    """Start the engine, run the worker pool beside it, stop both; return the exit code."""
    args, command = _parse(sys.argv[1:] if argv is None else argv)
    match = _BLOCK_ID.search(" ".join(command))
    block_id = match.group(1) if match else "0"
    host = socket.gethostname()
    block_dir = args.run_dir / "blocks" / f"{block_id}-{host}-{os.getpid()}"
    block_dir.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {
        "block_id": block_id,
        "host": host,
        "wrapper_pid": os.getpid(),
        "state": "starting",
        "url": None,
        "pid": None,
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

    engine: Any = None
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        if args.model_file is not None:
            from registry._specs import ModelSpec  # light: pydantic only

            spec = ModelSpec.model_validate_json(args.model_file.read_text())
            try:
                engine = _load_factory(args.engine_factory)(spec, block_dir)
                engine.start()
                status["pid"] = engine.pid
                _write_status(block_dir, status)
                engine.wait_ready(spec.startup_timeout)
            except _Terminated:
                raise
            except Exception as exc:
                tail = engine.log_tail(40) if engine is not None else ""
                message = f"The engine of {spec.ref} on block {block_id} ({host}) failed to start: {exc}"
                if tail and tail not in message:
                    message += f"\nLog tail:\n{tail}"
                if engine is not None:
                    engine.stop()
                status.update(state="failed", error=message, log_tail=tail, stopped=None)
                env[ENGINE_ERROR_ENV] = message
            else:
                info = engine.server_info()
                status.update(
                    state="ready",
                    url=engine.url,
                    ready=time.time(),
                    engine={
                        "kind": spec.engine,
                        "version": str(info["version"]) if info.get("version") else None,
                        "args": dict(spec.engine_args),
                        "url": engine.url,
                        "model_path": info.get("model_path") or spec.model_path,
                    },
                )
                status["cold_start_s"] = status["ready"] - status["started"]
                env[ENGINE_URL_ENV] = str(engine.url)
                env[ENGINE_INFO_ENV] = json.dumps(
                    {**status["engine"], "block_id": block_id, "cold_start_s": status["cold_start_s"]}
                )
        else:
            status.update(state="ready", ready=time.time())
        _write_status(block_dir, status)
        starting = False
        if stop.is_set():
            raise _Terminated
        return _run_pool(worker_pool_argv(command), env, engine, status, block_dir, stop, args.failed_linger)
    except _Terminated:
        return 143
    finally:
        if engine is not None:
            engine.stop()
        if status["state"] in ("starting", "ready"):
            status["state"] = "stopped"
        status["stopped"] = time.time()
        if engine is not None and not status["log_tail"]:
            with contextlib.suppress(Exception):
                status["log_tail"] = engine.log_tail(20)
        _write_status(block_dir, status)


def _run_pool(
    argv: list[str],
    env: dict[str, str],
    engine: Any,
    status: dict[str, Any],
    block_dir: Path,
    stop: threading.Event,
    failed_linger: float,
) -> int:
    # Same process group as this wrapper: the provider's group kill reaches both.
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    status["worker_pool_pid"] = child.pid
    _write_status(block_dir, status)
    failed_at = time.monotonic() if status["state"] == "failed" else None
    try:
        while not stop.wait(0.25):  # a watch loop: the child, the engine and the clock
            if child.poll() is not None:
                break
            if engine is not None and status["state"] == "ready" and not engine.alive():
                tail = engine.log_tail(40)
                status.update(
                    state="failed",
                    error=f"The engine (pid {engine.pid}) exited while serving. Log tail:\n{tail}",
                    log_tail=tail,
                )
                _write_status(block_dir, status)
                break
            if failed_at is not None and time.monotonic() - failed_at > failed_linger:
                break
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
    return int(child.returncode or 0) if child.returncode and child.returncode > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
