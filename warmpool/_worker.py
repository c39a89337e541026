"""Worker processes: long-lived, each running many invocations at once in threads.

A function mostly waits on the engine, so one worker process runs up to
``threads`` invocations concurrently; their requests reach the engine together
and are batched there. The parent talks to a worker over one duplex connection
(a socketpair the worker inherits, see :mod:`warmpool.worker`):

- parent -> worker: :class:`Start` first, then :class:`Dispatch` (run this),
  :class:`Abort` (drop it), ``None`` (exit);
- worker -> parent: :class:`Ready` once it can run work, then :class:`runtime.Result`.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from registry._registry import Registry
from runtime._execute import error_info, execute
from runtime._model import Model
from runtime._store import ObjectStore, store_from_config
from runtime._wire import Invocation, Result


@dataclass(frozen=True)
class Start:
    """The first message to a new worker: what it serves.

    Attributes:
        store_config: ``ObjectStore.config()`` of the pool's store.
        threads: Invocations it runs at once.
    """

    store_config: dict[str, Any]
    threads: int


@dataclass(frozen=True)
class Ready:
    """The worker's first message: it imported everything and opened the store.

    Attributes:
        pid: The worker's process id.
    """

    pid: int


@dataclass(frozen=True)
class Dispatch:
    """Run one invocation.

    Attributes:
        invocation: What to run.
        engine_url: Base URL of the model's engine replica, if the function has a model.
        model_name: The resolved model reference (``name@version``).
        model_param: Parameter receiving the Model handle.
        model_param_index: Its position.
    """

    invocation: Invocation
    engine_url: str | None = None
    model_name: str | None = None
    model_param: str | None = None
    model_param_index: int = 0
    model_modes: frozenset[str] | None = None


@dataclass(frozen=True)
class Abort:
    """Stop caring about an invocation attempt and abort its engine requests (best effort)."""

    invocation_id: str
    attempt: int = 0


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def serve(conn: Connection) -> None:
    """Run a worker on ``conn`` until told to exit or the parent is gone; never returns.

    Receives :class:`Start`, answers :class:`Ready`, then runs what it is sent.
    """
    try:
        start = conn.recv()
    except (EOFError, OSError):
        os._exit(0)  # the pool went away before we started
    if not isinstance(start, Start):
        raise TypeError(f"a worker's first message must be Start, not {type(start).__name__}")
    worker_main(conn, start.store_config, start.threads)


def worker_main(conn: Connection, store_config: dict[str, Any], threads: int) -> None:
    """Open the store, say :class:`Ready`, then run invocations until told to exit; never returns."""
    store = store_from_config(store_config)
    registry = Registry(store)
    # Each invocation loads its function from its own store (a tenant's prefix in
    # the service); one Registry per distinct store config, the pool's as fallback.
    registries: dict[str, tuple[Registry, ObjectStore]] = {_config_key(store_config): (registry, store)}
    registries_lock = threading.Lock()
    handles: dict[tuple[str, str, frozenset[str] | None], Model] = {}
    handles_lock = threading.Lock()
    send_lock = threading.Lock()
    running: dict[tuple[str, int], tuple[Model, str]] = {}

    def handle_for(url: str, name: str, modes: frozenset[str] | None) -> Model:
        with handles_lock:
            model = handles.get((url, name, modes))
            if model is None:
                model = handles[(url, name, modes)] = Model(url, name, allowed_modes=modes)
            return model

    def registry_for(config: dict[str, Any] | None) -> tuple[Registry, ObjectStore]:
        if config is None:
            return registry, store
        key = _config_key(config)
        with registries_lock:
            entry = registries.get(key)
            if entry is None:
                own = store_from_config(config)
                entry = registries[key] = (Registry(own), own)
            return entry

    def run(msg: Dispatch) -> None:
        inv = msg.invocation
        try:
            inv_registry, inv_store = registry_for(inv.store)
            fn = inv_registry.load_function(inv.function_digest)
            model = (
                handle_for(msg.engine_url, msg.model_name or "", msg.model_modes) if msg.engine_url else None
            )
            if model is not None:
                running[(inv.id, inv.attempt)] = (model, f"inv-{inv.id}-{inv.attempt}-")
            result = execute(
                inv,
                fn,
                model=model,
                model_param=msg.model_param,
                model_param_index=msg.model_param_index,
                store=inv_store,
            )
        except Exception as exc:  # loading failed: integrity, unpickling, store
            result = Result(invocation_id=inv.id, error=error_info(exc, "system"), worker_pid=os.getpid())
        finally:
            running.pop((inv.id, inv.attempt), None)
        with send_lock:
            try:
                conn.send(result)
            except (OSError, ValueError):
                os._exit(0)  # parent is gone

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faas-inv")
    try:
        conn.send(Ready(os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the pool is gone: its end of the socket closed with it
            if msg is None:
                break
            if isinstance(msg, Abort):
                entry = running.get((msg.invocation_id, msg.attempt))
                if entry is not None:
                    entry[0].abort_prefix(entry[1])
                continue
            pool.submit(run, msg)
    finally:
        # Threads stuck in user code (past their timeout) must not hold the exit.
        os._exit(0)
