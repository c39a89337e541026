"""Partial outputs: values a running invocation emits reach the pool's listener before its result."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from registry import Registry
from runtime import Invocation, LocalStore, Result, dumps, emit_partial, loads, new_id
from tests.warmpool._pool_helpers import register
from warmpool import Pool


def _count_aloud(n: int) -> list[bool]:
    return [emit_partial({"i": i}) for i in range(n)]


def test_partial_outputs_arrive_in_order_before_the_result(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = register(Registry(store), _count_aloud)
    pool = Pool(store, workers=1).start()
    try:
        seen: list[tuple[str, Any]] = []
        lock = threading.Lock()

        def on_partial(attempt: int, value: Any) -> None:
            with lock:
                seen.append(("partial", (attempt, value)))

        def on_done(result: Result) -> None:
            with lock:
                seen.append(("result", result))
            done.set_result(result)

        done: concurrent.futures.Future[Result] = concurrent.futures.Future()
        inv = Invocation(
            id=new_id(), function_name=spec.name, function_digest=spec.digest, args=dumps(((5,), {}))
        )
        pool.submit(inv, spec, None, on_done, on_partial=on_partial)
        result = done.result(timeout=60)
        assert result.ok and loads(result.value or b"") == [True] * 5  # the worker had a channel
        assert [kind for kind, _ in seen] == ["partial"] * 5 + ["result"]
        assert [value for _, value in seen[:5]] == [(0, {"i": i}) for i in range(5)]

        # Without a listener the values are dropped at the pool; the result is unchanged.
        quiet: concurrent.futures.Future[Result] = concurrent.futures.Future()
        inv = Invocation(
            id=new_id(), function_name=spec.name, function_digest=spec.digest, args=dumps(((2,), {}))
        )
        pool.submit(inv, spec, None, quiet.set_result)
        assert loads(quiet.result(timeout=60).value or b"") == [True, True]
    finally:
        pool.shutdown()


def test_without_a_channel_emit_partial_says_so() -> None:
    assert emit_partial("nobody listens") is False
