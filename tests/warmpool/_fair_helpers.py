"""Two tenants on one warm engine, for the fair-admission tests of both substrates.

Tenant ``a`` floods the model with ``FLOOD`` long calls, then tenant ``b`` sends
``SHORT`` short ones. :func:`flood_then_short` returns, for each of b's calls,
how many of a's had finished when it did: under weighted VTC each of b's calls
waits for about one of a's, under FCFS for all of a's backlog.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

from registry import FunctionSpec, ModelSpec
from runtime import Result, dumps
from warmpool import Substrate

FLOOD = 16  # tenant a's backlog: 8x the model's two slots
SHORT = 3  # tenant b's short calls, sent after the flood
LONG_TOKENS = 48  # each of a's calls
SHORT_TOKENS = 2  # each of b's calls


def submit_as(
    pool: Substrate,
    spec: FunctionSpec,
    model: ModelSpec,
    tenant: str,
    tokens: int,
    on_done: Callable[[], None],
    priority: str | None = None,
) -> concurrent.futures.Future[Result]:
    """Submit ``generate(prompt, tokens)`` as ``tenant``; ``on_done`` runs before the future completes."""
    fut: concurrent.futures.Future[Result] = concurrent.futures.Future()

    def done(result: Result) -> None:
        on_done()
        fut.set_result(result)

    inv = spec.invocation(
        dumps((("The quick brown fox", tokens), {})),
        model=model.ref,
        store=None,
        stage_threshold=None,
        tenant=tenant,
        priority=priority,  # type: ignore[arg-type]
    )
    pool.submit(inv, spec, model, done)
    return fut


def flood_then_short(
    pool: Substrate, spec: FunctionSpec, model: ModelSpec, timeout: float = 120.0
) -> list[int]:
    """Run a's flood and then b's short calls; how many of a's had finished as each of b's finished.

    Every call must succeed; the model's engine should be warm already (the
    cold start is not what this measures).
    """
    lock = threading.Lock()
    a_done: list[int] = []
    a_done_when_b_finished: list[int] = []

    def a_finished() -> None:
        with lock:
            a_done.append(1)

    def b_finished() -> None:
        with lock:
            a_done_when_b_finished.append(len(a_done))

    flood = [submit_as(pool, spec, model, "a", LONG_TOKENS, a_finished) for _ in range(FLOOD)]
    # b's calls also carry a priority: the CPU engine accepts SGLang's field and ignores it.
    short = [submit_as(pool, spec, model, "b", SHORT_TOKENS, b_finished, "interactive") for _ in range(SHORT)]
    for fut in short + flood:
        result = fut.result(timeout=timeout)
        assert result.ok, result.error
    return a_done_when_b_finished
