"""The pool service's HTTP API (FastAPI): a thin skin over :class:`ServiceCore`.

Blocking work (SQLite, the store) runs in Starlette's thread pool; waiting
(long-polled results, event streams) is asynchronous, woken by the core's
result listeners, so thousands of waiting clients cost no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from faas._usage import GroupBy
from faas.service._api import (
    FINAL_STATES,
    BatchRequest,
    BatchView,
    BindRequest,
    CancelView,
    ErrorBody,
    InvocationView,
    Item,
    RegisterFunction,
    ResultView,
    SessionInfo,
    ShareRequest,
    SubmitRequest,
    UsageReport,
    WatchRequest,
)
from faas.service._core import Listener, ServiceCore
from faas.service._dashboard_routes import install_dashboard_routes
from faas.service._limits import BodyLimit, check_batch_bytes, install_limits
from faas.service._metrics import render_metrics
from faas.service._openai_batch_routes import install_openai_batch_routes
from faas.service._openai_routes import install_openai_routes, openai_error
from faas.service._openai_routes import internal_error as openai_internal_error
from faas.service._tenant import Tenant, authorize_request
from faas.service._triggers import TriggerHost
from registry import FunctionSpec, TriggerBinding
from runtime import (
    AuthError,
    BackPressureError,
    BudgetExceededError,
    FaasError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    PoolClosedError,
    QuotaExceededError,
    SubmitError,
)
from warmpool import WorkFront

log = logging.getLogger("faas.service")

PING_SECONDS = 15.0
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (400, "Bad request"),
        (401, "Missing or wrong token"),
        (403, "The token may not do that (e.g. another tenant's usage without admin)"),
        (404, "Not found (or another tenant's)"),
        (413, "A body, inline value or batch over its size limit (stage large values)"),
        (429, "Quota, token budget (with Retry-After) or back-pressure"),
        (503, "Shutting down"),
    )
}


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, (NotFoundError, LookupError)):
        return 404
    if isinstance(exc, (QuotaExceededError, BackPressureError)):
        return 429
    if isinstance(exc, PoolClosedError):
        return 503
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, (SubmitError, ValueError)):
        return 400
    return 500


def _error(status: int, type_name: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"type": type_name, "message": message}}, status, headers=headers)


async def _tenant(request: Request) -> Tenant:
    """The request's tenant, from its bearer token and the method's scope (a FastAPI dependency).

    Async so that FastAPI runs it on the event loop: a sync dependency would cost every
    request a trip to the thread pool (see ``authorize_request``).
    """
    core: ServiceCore = request.app.state.core
    header = request.headers.get("authorization", "")
    return await authorize_request(core.auth, header, request.method, request.url.path)


Who = Annotated[Tenant, Depends(_tenant)]


def create_app(core: ServiceCore, *, manage: bool = True) -> FastAPI:
    """The FastAPI application serving ``core``.

    Args:
        core: The service core (started by the app's lifespan when ``manage``).
        manage: Start the core when the app starts and shut it down when it stops.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage:
            await run_in_threadpool(core.start)
            await run_in_threadpool(_app.state.openai_batches.recover)  # lines a crash kept out
        try:
            yield
        finally:
            if manage:
                await run_in_threadpool(core.shutdown)
                _app.state.openai_batches.close()

    app = FastAPI(
        title="tpm-faas pool service",
        version=_version(),
        description="Register functions, submit invocations, stream their results. See docs/service.md.",
        lifespan=lifespan,
    )
    app.state.core = core
    install_limits(app)

    @app.exception_handler(FaasError)
    async def faas_error(_request: Request, exc: FaasError) -> JSONResponse:
        status = _status_of(exc)
        if status == 500:
            log.error("Request failed: %s: %s", type(exc).__name__, exc)
        headers = None
        if isinstance(exc, BudgetExceededError):  # whole seconds, at least 1 (RFC 9110)
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return _error(status, type(exc).__name__, str(exc), headers)

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness and a one-line summary of the pool."""
        status = core.pool.status()
        return {"status": "ok", "pool": status["pool"], "models": sorted(status["models"])}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus metrics of the service and its pool."""
        body, content_type = render_metrics(core)
        return Response(body, media_type=content_type)

    @app.get("/v1/session", tags=["session"], responses=_ERRORS)
    def session(who: Who) -> SessionInfo:
        """Your tenant, your view of the store, your limits."""
        return core.session(who)

    @app.post("/v1/functions", tags=["functions"], responses=_ERRORS)
    def register(who: Who, body: RegisterFunction) -> FunctionSpec:
        """Register a function (its cloudpickle artifact) under your tenant."""
        return core.register(who, body)

    @app.get("/v1/functions", tags=["functions"], responses=_ERRORS)
    def functions(who: Who) -> list[FunctionSpec]:
        """Your functions (latest version of each)."""
        return core.list_functions(who)

    @app.get("/v1/functions/{ref}", tags=["functions"], responses=_ERRORS)
    def function(who: Who, ref: str) -> FunctionSpec:
        """One of your functions: ``name``, ``name@version`` or a digest."""
        return core.function(who, ref)

    @app.post("/v1/functions/{name}/shares", tags=["sharing"], responses=_ERRORS)
    def share(who: Who, name: str, body: ShareRequest) -> dict[str, Any]:
        """Let another tenant invoke your function ``name`` (every version) as ``you/name``."""
        return core.shares.share(who, name, body.tenant, {t.name for t in core.auth.tenants()})

    @app.get("/v1/functions/{name}/shares", tags=["sharing"], responses=_ERRORS)
    def shares(who: Who, name: str) -> dict[str, list[str]]:
        """The tenants your function ``name`` is shared with."""
        return {"tenants": core.shares.grantees(who, name)}

    @app.delete("/v1/functions/{name}/shares/{tenant}", tags=["sharing"], responses=_ERRORS)
    def unshare(who: Who, name: str, tenant: str) -> dict[str, bool]:
        """Stop sharing ``name`` with ``tenant`` (invocations it already made still finish)."""
        return {"removed": core.shares.unshare(who, name, tenant)}

    @app.get("/v1/shared", tags=["sharing"], responses=_ERRORS)
    def shared(who: Who) -> list[FunctionSpec]:
        """The functions other tenants share with you, named ``owner/name`` (invoke them by that name)."""
        return core.shares.received(who.name)

    @app.get("/v1/shared/{owner}/{name}", tags=["sharing"], responses=_ERRORS)
    def shared_one(who: Who, owner: str, name: str) -> FunctionSpec:
        """One function shared with you: ``name`` or ``name@version`` of ``owner``."""
        return core.shares.describe(who.name, f"{owner}/{name}")

    @app.post("/v1/invocations", tags=["invocations"], responses=_ERRORS)
    async def submit(who: Who, body: SubmitRequest) -> InvocationView:
        """Submit one invocation; with ``wait`` > 0, also wait that long for its result."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ResultView] = loop.create_future()

        def put(view: ResultView) -> None:
            if not waiter.done():
                waiter.set_result(view)

        listener = _listener(loop, put)
        item: Item = body  # a SubmitRequest is an Item: every per-call field (priority, ...) travels

        def accept() -> tuple[str, list[ResultView]]:
            # One trip to the thread pool: accept, and listen before the result can arrive.
            invocation_id = core.submit(who, body.function, [item]).ids[0]
            return invocation_id, core.listen(who, [invocation_id], listener) if body.wait > 0 else []

        invocation_id, done = await run_in_threadpool(accept)
        try:
            if body.wait > 0 and not done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, body.wait)
        finally:
            core.unlisten([invocation_id], listener)
        if done or waiter.done():
            return core.view(who, invocation_id)  # the result is in memory: no need for a thread
        return await run_in_threadpool(core.view, who, invocation_id)

    @app.post("/v1/invocation-batches", tags=["invocations"], responses=_ERRORS)
    def submit_batch(who: Who, body: BatchRequest) -> BatchView:
        """Submit many invocations of one function; stream their results from the batch's events."""
        check_batch_bytes(body.items)
        return core.submit(who, body.function, body.items, batch=True)

    @app.post("/v1/batches", tags=["invocations"], responses=_ERRORS)
    async def batches(request: Request) -> Response:
        """OpenAI's batch API where installed; a native body (``function`` + ``items``) is a native batch.

        Older clients submit native batches here; new ones use ``/v1/invocation-batches``.
        """
        data = await request.body()
        try:
            raw = json.loads(data)
        except ValueError:
            raw = None
        if isinstance(raw, dict) and "function" in raw and "items" in raw:
            who = await _tenant(request)
            try:
                body = BatchRequest.model_validate_json(data)  # JSON mode: bytes arrive as base64
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None
            check_batch_bytes(body.items)
            view = await run_in_threadpool(core.submit, who, body.function, body.items, batch=True)
            return JSONResponse(view.model_dump())
        create: Handler | None = getattr(request.app.state, "openai_batch_create", None)
        if create is None:
            return openai_error(NotFoundError("This service has no OpenAI batch API.", 404))
        return await create(request)

    async def batch_events(who: Who, batch_id: str) -> StreamingResponse:
        """Server-sent events: one ``result`` per invocation of the batch as it finishes, then ``end``."""
        ids = await run_in_threadpool(core.batch_ids, who, batch_id)
        return await _stream(core, who, ids)

    for path in (
        "/v1/invocation-batches/{batch_id}/events",
        "/v1/batches/{batch_id}/events",
    ):  # the latter: older clients
        app.get(path, tags=["invocations"], responses=_ERRORS, response_class=StreamingResponse)(batch_events)

    @app.post("/v1/watch", tags=["invocations"], responses=_ERRORS, response_class=StreamingResponse)
    async def watch(who: Who, body: WatchRequest) -> StreamingResponse:
        """Server-sent events: one ``result`` per listed invocation as it finishes, then ``end``."""
        return await _stream(core, who, list(dict.fromkeys(body.ids)))

    @app.get("/v1/invocations", tags=["invocations"], responses=_ERRORS)
    def invocations(
        who: Who,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
    ) -> list[InvocationView]:
        """Your invocations, newest first."""
        return core.list(who, limit, status)

    @app.get("/v1/invocations/{invocation_id}", tags=["invocations"], responses=_ERRORS)
    def invocation(who: Who, invocation_id: str) -> InvocationView:
        """What is known about one invocation (with its result once finished)."""
        return core.view(who, invocation_id)

    @app.get("/v1/invocations/{invocation_id}/result", tags=["invocations"], responses=_ERRORS)
    async def result(
        who: Who, invocation_id: str, timeout: Annotated[float, Query(ge=0, le=300)] = 30.0
    ) -> ResultView:
        """The result, waiting up to ``timeout`` seconds; a non-final ``status`` means it is not done."""
        view = await _wait_one(core, who, invocation_id, timeout)
        if view is not None:
            return view
        current = await run_in_threadpool(core.view, who, invocation_id)
        return ResultView(id=invocation_id, status=current.status)

    @app.post("/v1/invocations/{invocation_id}/cancel", tags=["invocations"], responses=_ERRORS)
    def cancel(who: Who, invocation_id: str) -> CancelView:
        """Cancel a queued or running invocation."""
        return core.cancel(who, invocation_id)

    @app.get(
        "/v1/invocations/{invocation_id}/logs",
        tags=["invocations"],
        responses=_ERRORS,
        response_class=PlainTextResponse,
    )
    def logs(who: Who, invocation_id: str) -> PlainTextResponse:
        """Captured stdout and stderr of a finished invocation."""
        return PlainTextResponse(core.logs(who, invocation_id))

    @app.get("/v1/pool", tags=["service"], responses=_ERRORS)
    def pool(who: Who) -> dict[str, Any]:
        """The pool: models, replicas, workers, counters."""
        return core.pool.status()

    @app.get("/v1/usage", tags=["usage"], responses=_ERRORS)
    def usage(
        who: Who,
        since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
        until: Annotated[float | None, Query(ge=0, le=1e11)] = None,
        by: GroupBy | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
        tenant: Annotated[str | None, Query(pattern="^[a-z0-9][a-z0-9_-]{0,62}$")] = None,
        all_tenants: bool = False,
    ) -> UsageReport:
        """Your usage: a row per finished invocation (newest first), or sums by model, function or time.

        With an admin token, ``tenant`` reads another tenant's rows and ``all_tenants`` every tenant's
        (``by=tenant`` sums them per tenant); without one, either is 403 (ForbiddenError).
        """
        names = (t.name for t in core.auth.tenants())
        scope = core.ledger.scope(who, names, tenant=tenant, all_tenants=all_tenants)
        return core.ledger.report(scope, since=since, until=until, by=by, limit=limit)

    @app.post("/v1/triggers", tags=["triggers"], responses=_ERRORS)
    def bind(who: Who, body: BindRequest) -> TriggerBinding:
        """Bind one of your functions to new objects under a bucket prefix; the service runs it."""
        return _trigger_host(core).bind(who, body)

    @app.get("/v1/triggers", tags=["triggers"], responses=_ERRORS)
    def triggers(who: Who) -> list[TriggerBinding]:
        """Your trigger bindings."""
        return _trigger_host(core).bindings(who)

    install_openai_batch_routes(app, core, install_openai_routes(app, core))
    install_dashboard_routes(app, core)
    return app


def front(app: FastAPI) -> WorkFront:
    """What ``faas serve`` runs: ``app``, its OpenAI routes answered without FastAPI's stack.

    Those routes parse their own bodies and answer their own errors, so FastAPI's
    middleware chain and router only cost them time (about a third of the event loop's
    under load, profiled); they keep the request body limit.
    """
    routes = getattr(app.state, "work_routes", {})
    return WorkFront(app, routes, on_error=openai_internal_error, guard=BodyLimit)


def _trigger_host(core: ServiceCore) -> TriggerHost:
    if core.triggers is None:
        raise NotFoundError("This service runs no trigger bindings (it was started with --no-triggers).", 404)
    return core.triggers


def _listener(loop: asyncio.AbstractEventLoop, put: Callable[[ResultView], Any]) -> Listener:
    """A core listener that hands results to ``put`` on the loop, waking it once per burst.

    Results committed while the loop has not yet taken the earlier ones join
    them: one wake-up of the loop (a write to its self-pipe) for all of them.
    """
    pending: list[ResultView] = []
    lock = threading.Lock()

    def drain() -> None:
        with lock:
            views = pending.copy()
            pending.clear()
        for view in views:
            put(view)

    def listener(view: ResultView) -> None:
        with lock:
            pending.append(view)
            if len(pending) > 1:
                return  # a drain is scheduled already
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody waits any more
            loop.call_soon_threadsafe(drain)

    return listener


async def _wait_one(core: ServiceCore, who: Tenant, invocation_id: str, timeout: float) -> ResultView | None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[ResultView] = loop.create_future()

    def put(view: ResultView) -> None:
        if not waiter.done():
            waiter.set_result(view)

    listener = _listener(loop, put)
    done = await run_in_threadpool(core.listen, who, [invocation_id], listener)
    if done:
        core.unlisten([invocation_id], listener)
        return done[0]
    try:
        return await asyncio.wait_for(waiter, timeout) if timeout > 0 else None
    except TimeoutError:
        return None
    finally:
        core.unlisten([invocation_id], listener)


async def _stream(core: ServiceCore, who: Tenant, ids: list[str]) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[ResultView] = asyncio.Queue()
    listener = _listener(loop, queue.put_nowait)
    finished = await run_in_threadpool(core.listen, who, ids, listener)  # raises 404 before streaming

    async def events() -> AsyncIterator[bytes]:
        sent: set[str] = set()
        try:
            for view in finished:
                sent.add(view.id)
                yield _event("result", view.model_dump_json())
            while len(sent) < len(ids):
                views = []
                if queue.empty():
                    try:
                        views.append(await asyncio.wait_for(queue.get(), PING_SECONDS))
                    except TimeoutError:
                        yield b": ping\n\n"
                        continue
                while not queue.empty():  # every result waiting goes out in one write
                    views.append(queue.get_nowait())
                chunk = []
                for view in views:
                    if view.id not in sent and view.status in FINAL_STATES:
                        sent.add(view.id)
                        chunk.append(_event("result", view.model_dump_json()))
                if chunk:
                    yield b"".join(chunk)
            yield _event("end", json.dumps({"count": len(sent)}))
        finally:
            core.unlisten(ids, listener)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def _version() -> str:
    from faas import __version__

    return __version__


Handler = Callable[[Request], Awaitable[Response]]
