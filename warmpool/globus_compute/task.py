"""The task a Globus Compute engine's worker runs for one invocation.

:func:`run_invocation` is imported by reference in the HighThroughputExecutor
worker (it is serialised by module and name, never by value). It reads the
:class:`warmpool._runner.Dispatch`, points it at the block's engine for this
worker (:func:`engine_url_for`: the engine of the worker's accelerator group
from ``FAAS_ENGINE_URLS``, else ``FAAS_ENGINE_URL``, both set by
:mod:`warmpool.globus_compute.block`), and hands it to the one worker-side
:class:`~warmpool._runner.Runner` that local workers use too. It returns the
Result as JSON and never raises for a failure of the invocation itself.

A worker runs one task at a time. When the invocation has a deadline, the
runner returns at it (aborting the invocation's engine requests), so a stuck
function does not hold the worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from runtime import EngineError
from warmpool._runner import Dispatch, Runner
from warmpool.globus_compute._workers import busy
from warmpool.globus_compute.block import ENGINE_ERROR_ENV, ENGINE_INFO_ENV, ENGINE_URL_ENV, ENGINE_URLS_ENV

_runner = Runner()  # one per worker process: caches stores, registries and model handles


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


def run_invocation(dispatch_json: str) -> str:
    """Run one invocation in this worker; return its Result as JSON.

    Args:
        dispatch_json: The :class:`~warmpool._runner.Dispatch` as JSON (its
            ``engine_url`` is filled in here, from the block this worker runs in).
    """
    dispatch = Dispatch.model_validate_json(dispatch_json)
    url, group = engine_url_for(os.environ)
    if dispatch.model_name:
        dispatch = dispatch.model_copy(update={"engine_url": url})
    error = os.environ.get(ENGINE_ERROR_ENV) or None
    if dispatch.model_name and not url and not error:
        error = (
            f"This Globus Compute block has no engine for {dispatch.model_name}: "
            f"{ENGINE_URL_ENV} is not set (the block was not started by warmpool.globus_compute.block)."
        )
    with busy():  # a worker that dies now is not wedging its pool (see _workers)
        result = _runner.run(dispatch, engine_error=error)
    if dispatch.model_name and result.engine is None:
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
