"""The work routes' front door: ``/generate`` and friends without FastAPI's per-request stack.

Profiled under 64 concurrent one-token ``/generate`` requests (py-spy, GIL-holding
samples of the engine process), FastAPI's middleware chain and router cost about as
much of the event loop's time as the handler itself, and that loop shares the GIL
with the scheduler's forward steps: every millisecond it holds is a millisecond a
batch waits. The work routes take a plain ``Request`` and return a ``Response``, so
they need none of that chain; this ASGI wrapper answers them directly and hands
every other request (health, info, LoRA, lifespan) to the FastAPI app unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from warmpool.cpu_engine._http import error

log = logging.getLogger("warmpool.cpu_engine")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]


class WorkFront:
    """An ASGI app that serves ``routes`` itself and passes everything else to ``app``.

    Args:
        app: The engine's FastAPI app (every other route, and the lifespan).
        routes: ``(method, path)`` to the endpoint that answers it. A path must match
            exactly; anything else (a trailing slash, another method) goes to ``app``,
            which answers it as before.
    """

    def __init__(self, app: App, routes: dict[tuple[str, str], Endpoint]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection scope."""
        endpoint = (
            self.routes.get((scope.get("method", ""), scope.get("path", "")))
            if scope["type"] == "http"
            else None
        )
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, tracked)
        except Exception as exc:
            if started:  # a stream broke midway: nothing can be answered any more
                raise
            log.exception("unhandled error in %s", scope.get("path"), exc_info=exc)
            await error(500, f"internal error: {type(exc).__name__}: {exc}")(scope, receive, send)
