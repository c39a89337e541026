"""Request size limits and the error bodies of malformed requests, for the pool service.

A body over its route's limit answers **413** ``PayloadTooLargeError`` before it
is parsed: a ``Content-Length`` over the limit is refused without reading a
byte, and a body sent without one (chunked) is counted as it arrives and
refused as soon as it passes the limit. Schema violations answer **422**
``InvalidParameterError`` (or 413 when a value is over its own size limit,
such as an inline argument over ``MAX_INLINE_BYTES``), in the service's error
shape ``{"error": {"type", "message"}}``; FastAPI's ``detail`` list stays
beside it, without the offending input (it could be megabytes, or hostile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from faas.service._api import MAX_BATCH_BYTES, MAX_BODY_BYTES, MAX_FUNCTION_BODY_BYTES, Item
from faas.service._openai_files import MAX_FILE_BYTES
from runtime import PayloadTooLargeError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTE_LIMITS: dict[str, int] = {
    "/v1/functions": MAX_FUNCTION_BODY_BYTES,  # a 64 MiB artifact, as base64
    "/v1/invocation-batches": MAX_BATCH_BYTES + MAX_BATCH_BYTES // 2,  # base64 and JSON around the args
    "/v1/batches": MAX_BATCH_BYTES + MAX_BATCH_BYTES // 2,
    "/v1/files": MAX_FILE_BYTES + (1 << 20),  # multipart around the file
}
"""Body limits of the routes that take more than ``MAX_BODY_BYTES``."""

_TOO_LONG = {"bytes_too_long"}  # a value over its size limit (a list over its count is a 422)


def body_limit(path: str) -> int:
    """The largest request body, in bytes, that ``path`` accepts."""
    return ROUTE_LIMITS.get(path.rstrip("/"), MAX_BODY_BYTES)


def too_large(what: str, size: int | str, limit: int) -> PayloadTooLargeError:
    """The error for ``what`` of ``size`` bytes over ``limit``."""
    return PayloadTooLargeError(
        f"The {what} ({size} bytes) is over the service's limit of {limit} bytes; "
        "stage large values in the store and pass references (the Python client does this by itself)."
    )


def _error(status: int, exc: Exception, detail: object = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over their route's limit with 413, before parsing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(str(scope.get("path", "")))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _error(413, too_large("request body", declared, limit))(scope, receive, send)
            return
        seen = 0
        tripped = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the app's answer to a cut-off body (a 400) is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if tripped and not started:
            await _error(413, too_large("request body", f"over {limit}", limit))(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def check_batch_bytes(items: Iterable[Item]) -> None:
    """Refuse a batch whose inline arguments together are over ``MAX_BATCH_BYTES``.

    Raises:
        PayloadTooLargeError: They are.
    """
    total = sum(len(item.args) for item in items)
    if total > MAX_BATCH_BYTES:
        raise too_large("batch's inline arguments together", total, MAX_BATCH_BYTES)


def install_limits(app: FastAPI) -> None:
    """Add the body limit and the error bodies of malformed requests to ``app``."""
    app.add_middleware(BodyLimit)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        detail = [{k: _plain(e.get(k)) for k in ("type", "loc", "msg")} for e in errors]
        where = [".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body" for e in errors]
        message = "; ".join(f"{w}: {e.get('msg', '')}" for w, e in zip(where, errors, strict=True))
        if any(e.get("type") in _TOO_LONG for e in errors):
            return _error(413, PayloadTooLargeError(f"Over a size limit: {message[:2000]}"), detail)
        from runtime import InvalidParameterError

        return _error(422, InvalidParameterError(f"Invalid request: {message[:2000]}"), detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {
            400: "SubmitError",
            404: "NotFoundError",
            405: "MethodNotAllowed",
            413: "PayloadTooLargeError",
        }
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "The request body is not valid JSON (it must be UTF-8 JSON of the documented shape)."
        body = {"error": {"type": names.get(exc.status_code, "HTTPError"), "message": message}}
        return JSONResponse({**body, "detail": exc.detail}, exc.status_code, headers=exc.headers)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
