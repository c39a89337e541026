"""The task a Globus Compute engine's worker runs for one invocation.

:func:`run_invocation` is imported by reference in the HighThroughputExecutor
worker (it is serialised by module and name, never by value). It loads the
function from the invocation's store, verified by digest, builds a
:class:`runtime.Model` handle on the block's engine for this worker
(:func:`engine_url_for`: the engine of the worker's accelerator group from
``FAAS_ENGINE_URLS``, else ``FAAS_ENGINE_URL``, both set by
:mod:`warmpool._block`), and runs :func:`runtime._execute.execute`. It returns
the Result as JSON and never raises for a failure of the invocation itself.

A worker runs one task at a time. When the invocation has a deadline, the
function runs in a thread and the task returns at the deadline (aborting the
invocation's engine requests), so a stuck function does not hold the worker.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from registry._registry import Registry
from runtime._errors import EngineError, FaasError, InvocationTimeout
from runtime._execute import error_info, execute
from runtime._model import Model
from runtime._store import ObjectStore, store_from_config
from runtime._wire import ErrorKind, Invocation, Result
from warmpool._block import ENGINE_ERROR_ENV, ENGINE_INFO_ENV, ENGINE_URL_ENV, ENGINE_URLS_ENV

_lock = threading.Lock()
_stores: dict[str, tuple[ObjectStore, Registry]] = {}
_handles: dict[tuple[str, str, frozenset[str] | None], Model] = {}


def _registry(config: dict[str, Any]) -> tuple[ObjectStore, Registry]:
    key = json.dumps(config, sort_keys=True, default=str)
    with _lock:
        hit = _stores.get(key)
        if hit is None:
            store = store_from_config(config)
            hit = _stores[key] = (store, Registry(store))
        return hit


def _handle(url: str, name: str, modes: frozenset[str] | None) -> Model:
    with _lock:
        model = _handles.get((url, name, modes))
        if model is None:
            model = _handles[(url, name, modes)] = Model(url, name, allowed_modes=modes)
        return model


def engine_url_for(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The engine this worker uses, and its accelerator group: ``(url, group)``.

    HTEX sets each worker's ``CUDA_VISIBLE_DEVICES`` to its accelerator group;
    the block's wrapper published one engine per group in ``FAAS_ENGINE_URLS``
    (``{"0,1,2,3": url, "4,5,6,7": url}``). A worker whose group is not there
    (no groups, or an older block) uses ``FAAS_ENGINE_URL``.

    Args:
        env: The worker's environment (``os.environ``).

    Returns:
        The URL (None when the block has no engine) and the group (None when not chosen by group).
    """
    raw = env.get(ENGINE_URLS_ENV, "")
    group = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if raw and group:
        try:
            urls = json.loads(raw)
        except ValueError:
            urls = {}
        if isinstance(urls, dict):
            url = urls.get(group) or urls.get(group.replace(" ", ""))
            if url:
                return str(url), group
    return env.get(ENGINE_URL_ENV) or None, None


def _engine_info(url: str | None, group: str | None) -> dict[str, Any] | None:
    raw = os.environ.get(ENGINE_INFO_ENV)
    try:
        info = dict(json.loads(raw)) if raw else None
    except ValueError:
        return None
    if info is not None and url:
        info["url"] = url
        if group is not None:
            info["group"] = group
    return info


def run_invocation(invocation_json: str, dispatch_json: str) -> str:
    """Run one invocation in this worker; return its Result as JSON.

    Args:
        invocation_json: The :class:`runtime.Invocation` as JSON.
        dispatch_json: ``{"store", "model_name", "model_param", "model_param_index",
            "model_modes", "deadline"}``: where to load the function from, how to
            hand it the model, and when the pool stops waiting (epoch seconds).
    """
    inv = Invocation.model_validate_json(invocation_json)
    dispatch: dict[str, Any] = json.loads(dispatch_json)
    modes = dispatch.get("model_modes")
    model: Model | None = None
    url, group = engine_url_for(os.environ)
    try:
        if dispatch.get("model_name"):
            error = os.environ.get(ENGINE_ERROR_ENV)
            if error:
                raise EngineError(error)
            if not url:
                raise EngineError(
                    f"This Globus Compute block has no engine for {dispatch['model_name']}: "
                    f"{ENGINE_URL_ENV} is not set (the block was not started by warmpool._block)."
                )
            model = _handle(url, dispatch["model_name"], frozenset(modes) if modes is not None else None)
        config = inv.store or dispatch.get("store")
        if config is None:
            raise FaasError(f"Invocation {inv.id} names no object store to load its function from.")
        store, registry = _registry(config)
        fn = registry.load_function(inv.function_digest)
    except Exception as exc:
        kind: ErrorKind = "engine_lost" if isinstance(exc, EngineError) else "system"
        result = Result(
            invocation_id=inv.id,
            error=error_info(exc, kind, with_traceback=not isinstance(exc, EngineError)),
            worker_pid=os.getpid(),
            attempt=inv.attempt,
            finished_at=time.time(),
        )
        return result.model_dump_json()

    def run() -> Result:
        return execute(
            inv,
            fn,
            model=model,
            model_param=dispatch.get("model_param"),
            model_param_index=int(dispatch.get("model_param_index") or 0),
            store=store,
        )

    deadline = dispatch.get("deadline")
    if deadline is None:
        result = run()
    else:
        box: list[Result] = []
        thread = threading.Thread(target=lambda: box.append(run()), name=f"faas-inv-{inv.id}", daemon=True)
        thread.start()
        thread.join(max(0.0, float(deadline) - time.time()))
        if box:
            result = box[0]
        else:  # the pool has already failed it; free this worker and the engine's slots
            if model is not None:
                model.abort_prefix(f"inv-{inv.id}-{inv.attempt}")
            late = InvocationTimeout(f"The invocation of {inv.function_name!r} ran past its deadline.")
            result = Result(
                invocation_id=inv.id,
                error=error_info(late, "timeout", with_traceback=False),
                worker_pid=os.getpid(),
                attempt=inv.attempt,
                finished_at=time.time(),
            )
    if model is not None:
        result.engine = _engine_info(url, group)
    return result.model_dump_json()


def engine_url() -> str:
    """The engine URL of the block this worker runs in (a probe task)."""
    error = os.environ.get(ENGINE_ERROR_ENV)
    if error:
        raise EngineError(error)
    url, _ = engine_url_for(os.environ)
    if not url:
        raise EngineError(f"This Globus Compute block has no engine: {ENGINE_URL_ENV} is not set.")
    return url
