"""Partial outputs: values a running invocation sends before it finishes (a stream's chunks).

The worker that runs an invocation installs a sink for it (:func:`partial_sink`);
code inside the invocation calls :func:`emit_partial`. Where the substrate has a
channel back (the local pool's worker sockets) the values reach whoever listens
to the invocation as they are made; elsewhere :func:`emit_partial` does nothing,
and the values must travel in the result as well, which is how the built-in
OpenAI functions use it. Best effort: a value is never a substitute for the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

PartialSink = Callable[[Any], None]

_SINK: ContextVar[PartialSink | None] = ContextVar("faas_partial_sink", default=None)


def emit_partial(value: Any) -> bool:
    """Send a partial output of the running invocation; returns whether there was a channel.

    Args:
        value: A picklable value (small: it travels over the worker's socket at once).
    """
    sink = _SINK.get()
    if sink is None:
        return False
    sink(value)
    return True


@contextlib.contextmanager
def partial_sink(sink: PartialSink | None) -> Iterator[None]:
    """Send this context's :func:`emit_partial` values to ``sink`` (None: nowhere)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)
