"""Helpers for pool tests: register plain functions and submit them to a Pool directly."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from registry import FunctionSpec, ModelSpec, Registry
from runtime import Invocation, Model, Result, dumps, new_id
from runtime._serde import digest_of
from runtime._source import bundle_function
from tests._wait import wait_for  # noqa: F401 - this module's users import it from here
from warmpool import Pool


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def register(registry: Registry, fn: Callable[..., Any], *, model: bool = False) -> FunctionSpec:
    blob = dumps(bundle_function(fn))
    spec = FunctionSpec(
        name=fn.__name__, digest=digest_of(blob), model_param="model" if model else None, model_param_index=0
    )
    return registry.register_function(blob, spec)


def submit(
    pool: Pool,
    spec: FunctionSpec,
    *args: Any,
    model: ModelSpec | None = None,
    retries: int = 0,
    timeout: float | None = None,
) -> concurrent.futures.Future[Result]:
    fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
    inv = Invocation(
        id=new_id(),
        function_name=spec.name,
        function_digest=spec.digest,
        model=model.ref if model else None,
        args=dumps((args, {})),
        timeout=timeout,
        retries=retries,
    )
    pool.submit(inv, spec, model, fut.set_result)
    fut.invocation_id = inv.id  # type: ignore[attr-defined]
    return fut


def generate(model: Model, prompt: str, n: int) -> int:
    out = model.generate(prompt, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return out.completion_tokens  # type: ignore[union-attr]


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
