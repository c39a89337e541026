"""The OpenAI-compatible routes of ``faas serve``: ``/v1/models``, chat, completions, embeddings.

A thin skin over :class:`OpenAIGateway`: each request is authenticated with the
service's bearer tokens, checked, and run as the tenant's invocation of a
built-in function; the route waits for its result without a thread (a
listener on the core, as the native long-poll does). Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``); the native API keeps
its own shape. A model with no ready engine answers 503 with ``Retry-After``
(at most 120 s) and starts one; a streamed request instead holds its stream
open with keep-alive comments until the engine is ready. See docs/openai.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from faas.openai import Kind
from faas.service._api import ResultView
from faas.service._core import ServiceCore
from faas.service._openai import OpenAIGateway, Prepared
from faas.service._tenant import Tenant, authorize_request
from runtime import (
    AuthError,
    BackPressureError,
    BudgetExceededError,
    EngineLost,
    EngineRejectedError,
    FaasError,
    ForbiddenError,
    InvalidParameterError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    ModelNotReadyError,
    ModeNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PoolClosedError,
    QuotaExceededError,
    SubmitError,
    UnknownModelError,
    UnsupportedFeatureError,
    WorkerLost,
)

KEEPALIVE_SECONDS = 5.0
"""How often a stream waiting for an engine or a result sends an SSE comment."""
MAX_WAIT_SECONDS = 3600.0
"""The longest a request waits for its invocation's result."""
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _classify(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """``(status, type, code, param)`` of an error, in OpenAI's vocabulary."""
    table: list[tuple[type[BaseException], int, str, str | None]] = [
        (ForbiddenError, 403, "permission_error", "insufficient_scope"),
        (AuthError, 401, "invalid_request_error", "invalid_api_key"),
        (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
        (NotFoundError, 404, "invalid_request_error", "not_found"),
        (InvalidParameterError, 400, "invalid_request_error", "invalid_value"),
        (PayloadTooLargeError, 413, "invalid_request_error", "request_too_large"),
        (ModeNotAllowedError, 403, "permission_error", "mode_not_allowed"),
        (UnsupportedFeatureError, 400, "invalid_request_error", "unsupported_feature"),
        (EngineRejectedError, 400, "invalid_request_error", "invalid_value"),
        (BudgetExceededError, 429, "rate_limit_error", "rate_limit_exceeded"),
        (QuotaExceededError, 429, "rate_limit_error", "queue_quota_exceeded"),
        (BackPressureError, 429, "rate_limit_error", "engine_queue_full"),
        (ModelNotReadyError, 503, "service_unavailable", "model_not_ready"),
        (PoolClosedError, 503, "service_unavailable", "shutting_down"),
        (EngineLost, 503, "server_error", "engine_lost"),
        (WorkerLost, 503, "server_error", "worker_lost"),
        (InvocationTimeout, 504, "server_error", "timeout"),
        (InvocationCancelled, 500, "server_error", "cancelled"),
        (SubmitError, 400, "invalid_request_error", None),
    ]
    for cls, status, kind, code in table:
        if isinstance(exc, cls):
            param = exc.param if isinstance(exc, InvalidParameterError) else None
            param = "model" if isinstance(exc, UnknownModelError) else param
            return status, kind, code, param
    return 500, "server_error", None, None


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error body and headers for an error."""
    status, kind, code, param = _classify(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, BudgetExceededError | ModelNotReadyError):  # whole seconds, at least 1 (RFC 9110)
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif status == 429:
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": {"message": str(exc), "type": kind, "param": param, "code": code}}
    return status, body, headers


def openai_error(exc: BaseException) -> JSONResponse:
    """An OpenAI-shaped error response for ``exc``."""
    status, body, headers = error_body(exc)
    return JSONResponse(body, status, headers=headers)


async def _who(core: ServiceCore, request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    return await authorize_request(core.auth, header, request.method, request.url.path, what="API key")


async def _body(request: Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise InvalidParameterError("The request body is not valid JSON.", None) from None


def install_openai_routes(app: FastAPI, core: ServiceCore) -> OpenAIGateway:
    """Add the OpenAI-compatible routes to the service's app; returns their gateway.

    The gateway is also ``app.state.openai`` (other OpenAI routes, such as batches, use it).
    """
    gateway = OpenAIGateway(core)
    app.state.openai = gateway

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> Response:
        """Every model version and alias, with its state (``hot``, ``starting``, ``cold``)."""
        try:
            await _who(core, request)
            data = await run_in_threadpool(gateway.catalog)
        except FaasError as exc:
            return openai_error(exc)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def model(request: Request, model_id: str) -> Response:
        """One model version or alias."""
        try:
            await _who(core, request)
            data = await run_in_threadpool(gateway.catalog)
            found = next((entry for entry in data if entry["id"] == model_id), None)
            if found is None:
                raise UnknownModelError(f"The model {model_id!r} does not exist (GET /v1/models lists them).")
        except FaasError as exc:
            return openai_error(exc)
        return JSONResponse(found)

    async def run(request: Request, kind: Kind) -> Response:
        waiting: _Waiting | None = None
        try:
            who = await _who(core, request)
            waiting = _Waiting(gateway, who)
            prepared = await waiting.begin(kind, await _body(request))
            if prepared.request.stream:
                response = _streamed(waiting, prepared)
                waiting = None  # the stream owns it now
                return response
            if not waiting.id:
                state = gateway.state(prepared.model)
                gateway.warm(prepared.model)
                raise ModelNotReadyError(
                    f"Model {prepared.request.model!r} is {state.state}: its engine is starting; "
                    f"retry in {state.retry_after} s.",
                    state.retry_after,
                )
            try:
                view = await waiting.result_unless_gone(request, MAX_WAIT_SECONDS)
            except TimeoutError:
                raise InvocationTimeout(
                    f"No result for invocation {waiting.id} in {MAX_WAIT_SECONDS:g} s."
                ) from None
            if view is None:  # the client left: stop the engine's work, as a stream does
                waiting.close()
                waiting.loop.run_in_executor(None, _cancel_quietly, waiting)
                return Response(status_code=499)
            body = gateway.reply(who, prepared, view)
        except FaasError as exc:
            return openai_error(exc)
        finally:
            if waiting is not None:
                waiting.close()
        return JSONResponse(body, headers={"X-Faas-Invocation-Id": view.id})

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat(request: Request) -> Response:
        """A chat completion (``stream`` for server-sent events), run as ``openai.chat``."""
        return await run(request, "chat")

    @app.post("/v1/completions", tags=["openai"])
    async def completions(request: Request) -> Response:
        """A text completion (``stream`` for server-sent events), run as ``openai.completions``."""
        return await run(request, "completions")

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(request: Request) -> Response:
        """Embeddings of the inputs, run as ``openai.embeddings``."""
        return await run(request, "embeddings")

    # What the service's front answers without FastAPI's stack (see faas.service._app.front).
    app.state.work_routes = {
        ("POST", "/v1/chat/completions"): chat,
        ("POST", "/v1/completions"): completions,
        ("POST", "/v1/embeddings"): embeddings,
    }
    return gateway


def internal_error(exc: Exception) -> Response:
    """The answer to an OpenAI route's unexpected error (the front logs it): OpenAI-shaped, no internals."""
    message = "The service failed on this request; its log says why."
    return JSONResponse(
        {"error": {"message": message, "type": "InternalServerError", "param": None, "code": None}}, 500
    )


class _Waiting:
    """One accepted request's invocation, waited for on the event loop (no thread while waiting).

    ``events`` gets a streamed request's partial outputs ``(attempt, chunk)`` as the
    worker sends them, then its final ResultView (in that order: the worker sends its
    partial outputs before its result, and both reach the loop in order).
    """

    def __init__(self, gateway: OpenAIGateway, who: Tenant) -> None:
        self.core = gateway.core
        self.gateway = gateway
        self.who = who
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[ResultView] = self.loop.create_future()
        self.events: asyncio.Queue[tuple[int, Any] | ResultView] = asyncio.Queue()
        self.id = ""

    def _put(self, view: ResultView) -> None:
        if not self.waiter.done():
            self.waiter.set_result(view)
            self.events.put_nowait(view)

    def _listener(self, view: ResultView) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self._put, view)

    def _partial(self, _invocation_id: str, attempt: int, value: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (attempt, value))

    def _accept(self, prepared: Prepared) -> None:
        partials = self._partial if prepared.request.stream else None
        batch = self.gateway.submit(self.who, [prepared], on_partial=partials, listener=self._listener)
        self.id = batch.ids[0]

    async def begin(self, kind: Kind, raw: object) -> Prepared:
        """Check the body and, if its model is hot, submit it (durable) and listen: one thread trip.

        ``id`` stays empty when the model is not hot (nothing was accepted).
        """

        def begin() -> Prepared:
            prepared = self.gateway.prepare(kind, raw)
            if self.gateway.state(prepared.model).state == "hot":
                self._accept(prepared)
            return prepared

        return await run_in_threadpool(begin)

    async def accept(self, prepared: Prepared) -> None:
        """Submit (durable when this returns) and listen."""
        await run_in_threadpool(self._accept, prepared)

    async def result(self, timeout: float) -> ResultView:
        """The result, waiting up to ``timeout`` (``TimeoutError`` then; the listener stays)."""
        return await asyncio.wait_for(asyncio.shield(self.waiter), timeout)

    async def result_unless_gone(self, request: Request, timeout: float) -> ResultView | None:
        """:meth:`result`, or None as soon as the client disconnects (its body is read already)."""
        result = asyncio.ensure_future(self.result(timeout))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if result.done():
            return result.result()
        result.cancel()
        return None

    def close(self) -> None:
        """Stop listening."""
        if self.id:
            self.core.unlisten([self.id], self._listener)


def _streamed(waiting: _Waiting, prepared: Prepared) -> Response:
    """Server-sent events: the engine's chunks as the worker relays them, then ``[DONE]``.

    With the engine ready, the request was accepted before the stream starts, so a
    quota, budget or back-pressure refusal answered with its status. A cold engine
    holds the stream with comments until it is ready; later errors become an
    ``error`` event before ``[DONE]``. Where the substrate has no partial-output
    channel, the chunks arrive with the result.
    """
    gateway = waiting.gateway
    if not waiting.id:
        gateway.warm(prepared.model)

    async def events() -> AsyncIterator[bytes]:
        try:
            while not waiting.id:  # the engine is starting: keep the connection alive
                if gateway.state(prepared.model).state == "hot":
                    await waiting.accept(prepared)
                    break
                yield b": waiting for the model's engine to start\n\n"
                gateway.warm(prepared.model)
                await asyncio.sleep(1.0)
            sent, attempt, retried = 0, None, False
            while True:
                try:
                    item = await asyncio.wait_for(waiting.events.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if isinstance(item, ResultView):
                    break
                if attempt != item[0]:  # the first chunk, or a retry's
                    retried = retried or sent > 0
                    attempt = item[0]
                chunk = gateway.client_chunk(prepared, item[1])
                if chunk is not None and not retried:
                    sent += 1
                    yield _data(chunk)
            reply = gateway.reply(waiting.who, prepared, item)
            if retried:
                raise InvocationError(
                    "The invocation was retried after its stream began; the reply is incomplete."
                )
            for chunk in reply["chunks"][sent:]:  # all of them where no partial outputs came
                yield _data(chunk)
        except FaasError as exc:
            yield b"data: " + json.dumps(error_body(exc)[1]).encode() + b"\n\n"
        finally:
            waiting.close()
        yield b"data: [DONE]\n\n"

    headers = {**_SSE_HEADERS, **({"X-Faas-Invocation-Id": waiting.id} if waiting.id else {})}
    return _Stream(waiting, events(), media_type="text/event-stream", headers=headers)


class _Stream(StreamingResponse):
    """A stream that cancels its invocation when the client leaves before the result."""

    def __init__(self, waiting: _Waiting, content: AsyncIterator[bytes], **options: Any) -> None:
        super().__init__(content, **options)
        self.waiting = waiting

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            waiting = self.waiting
            if waiting.id and not waiting.waiter.done():  # the client left: stop the engine's work
                waiting.close()
                waiting.loop.run_in_executor(None, _cancel_quietly, waiting)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel_quietly(waiting: _Waiting) -> None:
    with contextlib.suppress(FaasError):
        waiting.core.cancel(waiting.who, waiting.id)


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
