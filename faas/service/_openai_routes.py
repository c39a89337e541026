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
from faas.service._auth import Tenant
from faas.service._core import ServiceCore
from faas.service._openai import OpenAIGateway, Prepared
from runtime import (
    AuthError,
    BackPressureError,
    BudgetExceededError,
    EngineLost,
    EngineRejectedError,
    FaasError,
    InvalidParameterError,
    InvocationCancelled,
    InvocationTimeout,
    ModeNotAllowedError,
    NotFoundError,
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


class ModelNotReady(FaasError):
    """The model has no ready engine yet; one is starting."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _classify(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """``(status, type, code, param)`` of an error, in OpenAI's vocabulary."""
    table: list[tuple[type[BaseException], int, str, str | None]] = [
        (AuthError, 401, "invalid_request_error", "invalid_api_key"),
        (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
        (NotFoundError, 404, "invalid_request_error", "not_found"),
        (InvalidParameterError, 400, "invalid_request_error", "invalid_value"),
        (ModeNotAllowedError, 403, "permission_error", "mode_not_allowed"),
        (UnsupportedFeatureError, 400, "invalid_request_error", "unsupported_feature"),
        (EngineRejectedError, 400, "invalid_request_error", "invalid_value"),
        (BudgetExceededError, 429, "rate_limit_error", "rate_limit_exceeded"),
        (QuotaExceededError, 429, "rate_limit_error", "queue_quota_exceeded"),
        (BackPressureError, 429, "rate_limit_error", "engine_queue_full"),
        (ModelNotReady, 503, "service_unavailable", "model_not_ready"),
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
    if isinstance(exc, BudgetExceededError):  # whole seconds, at least 1 (RFC 9110)
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, ModelNotReady):
        headers["Retry-After"] = str(exc.retry_after)
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


def _who(core: ServiceCore, request: Request) -> Tenant:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else None
    found = core.auth.authenticate(bearer)
    if found is None:
        why = "is not valid" if bearer else "is missing"
        raise AuthError(
            f"The API key {why}; pass it as 'Authorization: Bearer <token>' (the client's api_key)."
        )
    return found


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
            _who(core, request)
            data = await run_in_threadpool(gateway.catalog)
        except FaasError as exc:
            return openai_error(exc)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def model(request: Request, model_id: str) -> Response:
        """One model version or alias."""
        try:
            _who(core, request)
            data = await run_in_threadpool(gateway.catalog)
            found = next((entry for entry in data if entry["id"] == model_id), None)
            if found is None:
                raise UnknownModelError(f"The model {model_id!r} does not exist (GET /v1/models lists them).")
        except FaasError as exc:
            return openai_error(exc)
        return JSONResponse(found)

    async def run(request: Request, kind: Kind) -> Response:
        try:
            who = _who(core, request)
            prepared = await run_in_threadpool(gateway.prepare, kind, await _body(request))
            if prepared.request.stream:
                return await _streamed(gateway, who, prepared)
            state = gateway.state(prepared.model)
            if state.state != "hot":
                gateway.warm(prepared.model)
                raise ModelNotReady(
                    f"Model {prepared.request.model!r} is {state.state}: its engine is starting; "
                    f"retry in {state.retry_after} s.",
                    state.retry_after,
                )
            invocation_id, view = await _submit_and_wait(gateway, who, prepared)
            body = gateway.reply(who, prepared, view)
        except FaasError as exc:
            return openai_error(exc)
        return JSONResponse(body, headers={"X-Faas-Invocation-Id": invocation_id})

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

    return gateway


class _Waiting:
    """One accepted request's invocation, waited for on the event loop (no thread while waiting)."""

    def __init__(self, gateway: OpenAIGateway, who: Tenant) -> None:
        self.core = gateway.core
        self.gateway = gateway
        self.who = who
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[ResultView] = self.loop.create_future()
        self.id = ""

    def _put(self, view: ResultView) -> None:
        if not self.waiter.done():
            self.waiter.set_result(view)

    def _listener(self, view: ResultView) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self._put, view)

    async def accept(self, prepared: Prepared) -> None:
        """Submit (durable when this returns) and listen, in one trip to the thread pool."""

        def accept() -> list[ResultView]:
            self.id = self.gateway.submit(self.who, [prepared]).ids[0]
            return self.core.listen(self.who, [self.id], self._listener)

        for view in await run_in_threadpool(accept):
            self._put(view)

    async def result(self, timeout: float) -> ResultView:
        """The result, waiting up to ``timeout`` (``TimeoutError`` then; the listener stays)."""
        return await asyncio.wait_for(asyncio.shield(self.waiter), timeout)

    def close(self) -> None:
        """Stop listening."""
        if self.id:
            self.core.unlisten([self.id], self._listener)


async def _submit_and_wait(gateway: OpenAIGateway, who: Tenant, prepared: Prepared) -> tuple[str, ResultView]:
    """Submit one request and wait for its result."""
    waiting = _Waiting(gateway, who)
    try:
        await waiting.accept(prepared)
        try:
            return waiting.id, await waiting.result(MAX_WAIT_SECONDS)
        except TimeoutError:
            raise InvocationTimeout(
                f"No result for invocation {waiting.id} in {MAX_WAIT_SECONDS:g} s."
            ) from None
    finally:
        waiting.close()


async def _streamed(gateway: OpenAIGateway, who: Tenant, prepared: Prepared) -> Response:
    """Server-sent events: keep-alive comments while the engine starts and the invocation runs.

    With the engine ready, the request is accepted before the stream starts, so a quota,
    budget or back-pressure refusal answers with its status; later errors become an
    ``error`` event before ``[DONE]``. The chunks arrive when the invocation finishes
    (workers have no partial-output channel yet).
    """
    waiting = _Waiting(gateway, who)
    accepted = gateway.state(prepared.model).state == "hot"
    if accepted:
        await waiting.accept(prepared)  # raises (an OpenAI error response) before any event is sent
    else:
        gateway.warm(prepared.model)

    async def events() -> AsyncIterator[bytes]:
        try:
            started = False
            while not accepted and not started:  # the engine is starting: keep the connection alive
                if gateway.state(prepared.model).state == "hot":
                    await waiting.accept(prepared)
                    started = True
                    break
                yield b": waiting for the model's engine to start\n\n"
                gateway.warm(prepared.model)
                await asyncio.sleep(1.0)
            while True:
                try:
                    view = await waiting.result(KEEPALIVE_SECONDS)
                    break
                except TimeoutError:
                    yield b": keep-alive\n\n"
            reply = gateway.reply(who, prepared, view)
            for chunk in reply["chunks"]:
                yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        except FaasError as exc:
            yield b"data: " + json.dumps(error_body(exc)[1]).encode() + b"\n\n"
        finally:
            waiting.close()
        yield b"data: [DONE]\n\n"

    headers = {**_SSE_HEADERS, **({"X-Faas-Invocation-Id": waiting.id} if waiting.id else {})}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
