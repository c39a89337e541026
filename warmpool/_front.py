"""A front door for hot routes: answered without FastAPI's per-request middleware stack and router.

Profiled under 64 concurrent one-token ``/generate`` requests (py-spy, GIL-holding
samples of the CPU engine's process), FastAPI's middleware chain and router cost about
as much of the event loop's time as the handler itself, and that loop shares the GIL
with the scheduler's forward steps: every millisecond it holds is a millisecond a
batch waits. The service's OpenAI routes showed the same under load. Routes that take
a plain ``Request``, return a ``Response`` and handle their own errors need none of
that chain; this ASGI wrapper answers them directly and hands every other request
(and the lifespan) to the app unchanged. Both the CPU engine and ``faas serve`` use it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("warmpool.front")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]


class WorkFront:
    """An ASGI app that serves ``routes`` itself and passes everything else to ``app``.

    Args:
        app: The FastAPI app (every other route, and the lifespan).
        routes: ``(method, path)`` to the endpoint that answers it. A path must match
            exactly; anything else (a trailing slash, another method) goes to ``app``,
            which answers it as before.
        on_error: The answer to an endpoint's unexpected exception (it is logged).
        guard: Wraps the routes' own handling in ASGI middleware of ``app``'s that they
            must keep (the service's request body limit, say).
    """

    def __init__(
        self,
        app: App,
        routes: dict[tuple[str, str], Endpoint],
        on_error: Callable[[Exception], Response],
        guard: Callable[[App], App] | None = None,
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.on_error = on_error
        self._serve = guard(self._answer) if guard is not None else self._answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection scope."""
        if scope["type"] == "http" and (scope.get("method"), scope.get("path")) in self.routes:
            await self._serve(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes[(scope["method"], scope["path"])]
        started = receive_failed = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def receiving() -> MutableMapping[str, Any]:
            nonlocal receive_failed
            try:
                return await receive()
            except Exception:
                receive_failed = True
                raise

        try:
            response = await endpoint(Request(scope, receiving, send))
            await response(scope, receiving, tracked)
        except Exception as exc:
            # A stream that broke midway cannot be answered any more; an error of the request's
            # own receiving (a guard's body limit, say) belongs to whoever raised it.
            if started or receive_failed:
                raise
            log.exception("unhandled error in %s", scope.get("path"), exc_info=exc)
            await self.on_error(exc)(scope, receive, send)
