"""``execute()``: run one invocation inside a worker and capture its outcome.

Staged arguments (and the :class:`runtime.Ref` values inside them) are fetched
and verified before the function is called; if any check fails, the function
does not run. A return value above the staging threshold is written back to the
store and travels as a reference. What the function prints (in its own thread)
is captured into ``Result.logs`` (see :mod:`runtime._capture`). A trigger
invocation (``Invocation.output``) writes its output here, inside the
invocation, and returns a report of the write (see :mod:`runtime._outputs`).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from runtime import _serde
from runtime._capture import DEFAULT_LIMIT_BYTES, Capture, capturing, utf8_safe
from runtime._errors import EngineLost, FaasError, StoreError
from runtime._model import Model
from runtime._objectref import cached_store, using_store
from runtime._outputs import with_outputs, write_output
from runtime._staging import stage_value, staging_threshold, unstage_value
from runtime._store import ObjectStore
from runtime._wire import ErrorInfo, ErrorKind, Invocation, Result

_HOST = socket.gethostname()


def error_info(exc: BaseException, kind: ErrorKind, *, with_traceback: bool = True) -> ErrorInfo:
    """Describe ``exc`` for a Result, serialising it when it can be."""
    try:
        blob: bytes | None = _serde.dumps(exc, what="exception")
    except FaasError:
        blob = None
    tb = "".join(traceback.format_exception(exc)) if with_traceback else ""
    cls = type(exc)
    return ErrorInfo(
        kind=kind,
        type_name=f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__ != "builtins"
        else cls.__qualname__,
        message=utf8_safe(str(exc)),  # a record is UTF-8 JSON: a lone surrogate must not sink it
        traceback=utf8_safe(tb),
        exception=blob,
    )


def execute(
    invocation: Invocation,
    fn: Callable[..., Any],
    *,
    model: Model | None = None,
    model_param: str | None = None,
    model_param_index: int = 0,
    store: ObjectStore | None = None,
    engine_priority: int | None = None,
) -> Result:
    """Run one invocation of ``fn`` and return its Result; never raises.

    Args:
        invocation: The invocation; its ``args`` hold the serialised ``(args, kwargs)``.
        fn: The verified, deserialised user function.
        model: The handle on the engine of the function's model, if it has one.
        model_param: Name of the parameter that receives ``model``.
        model_param_index: Position of that parameter; 0 means it is passed first.
        store: Where staged values live; default: the store named by
            ``invocation.store`` (one instance per process).
        engine_priority: The engine's per-request ``priority`` for this
            invocation's requests (None: not sent); the pool derives it from
            ``invocation.priority`` and the engine's settings.
    """
    started = time.time()
    result = Result(
        invocation_id=invocation.id,
        worker_pid=os.getpid(),
        worker_host=_HOST,
        started_at=started,
        attempt=invocation.attempt,
    )
    bound: Model | None = None
    try:
        if store is None and invocation.store is not None:
            store = cached_store(invocation.store)
        args, kwargs = unstage_value(store, invocation.args, what=f"arguments of invocation {invocation.id}")
        if model_param is not None:
            if model is None:
                raise FaasError(
                    f"Function {invocation.function_name!r} needs a model handle but none was given."
                )
            bound = model.bind(f"inv-{invocation.id}-{invocation.attempt}", priority=engine_priority)
            if model_param_index == 0:
                args = (bound, *args)
            else:
                kwargs = {**kwargs, model_param: bound}
        if invocation.output is not None:
            kwargs = with_outputs(fn, invocation.output, kwargs)
    except Exception as exc:
        result.error = error_info(exc, "system")
        result.finished_at = time.time()
        return result
    capture: Capture | None = None
    try:
        # using_store: what ObjectRef.open() reads through; capturing: the invocation's logs.
        with using_store(store), capturing(DEFAULT_LIMIT_BYTES) as capture:
            value = fn(*args, **kwargs)
    except EngineLost as exc:
        # The engine died under the function: not the function's fault, so the pool may retry.
        result.error = error_info(exc, "engine_lost")
        result.finished_at = time.time()
        return result
    except Exception as exc:
        # Drop this frame from the traceback: the user wants their own frames.
        result.error = error_info(
            exc.with_traceback(exc.__traceback__.tb_next if exc.__traceback__ else None), "user"
        )
        result.finished_at = time.time()
        return result
    finally:
        if bound is not None:
            result.engine_calls = list(bound.calls)  # for the invocation's provenance
        if capture is not None:
            result.logs = capture.text()
    try:
        if invocation.output is not None:
            value = write_output(invocation.output, value, store)
        threshold = staging_threshold(invocation.stage_threshold)
        what = f"return value of {invocation.function_name!r}"
        result.value = stage_value(store, value, threshold, what=what)
    except StoreError as exc:
        result.error = error_info(exc, "system", with_traceback=False)
    except (FaasError, TypeError) as exc:  # TypeError: a value that cannot be a trigger output
        result.error = error_info(exc, "user", with_traceback=False)
    result.finished_at = time.time()
    return result
