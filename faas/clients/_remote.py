"""``faas.RemoteClient``: the same calls as the embedded client, made to a running ``faas serve``.

Arguments and results above the staging threshold go straight between this
process and the tenant's object store (``GET /v1/session`` says where); the
service only ever sees references to them. Completions arrive over
server-sent event streams (see :mod:`faas.clients._watch`), never by polling
each invocation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from faas._future import Future
from faas._usage import GroupBy, UsageReport
from faas.clients._base import ClientBase
from faas.clients._http_errors import error_for_response
from faas.clients._pipeline import SubmitPipeline, chunks
from faas.clients._protocol import Calls
from faas.clients._sharing import SharingCalls
from faas.clients._watch import Watcher
from faas.service._api import (
    FINAL_STATES,
    MAX_INLINE_BYTES,
    BatchRequest,
    BatchView,
    BindRequest,
    CancelView,
    InvocationView,
    Item,
    RegisterFunction,
    ResultView,
    SessionInfo,
    SubmitRequest,
)
from registry import FunctionSpec, ModelSpec, TriggerBinding
from runtime import (
    ErrorInfo,
    FaasError,
    KeepAlivePosts,
    NotFoundError,
    ObjectStore,
    PoolClosedError,
    Result,
    ServiceError,
    SubmitError,
    stage_args,
    store_from_config,
    tcp_transport,
)

if TYPE_CHECKING:
    from faas._function import Function

log = logging.getLogger("faas.remote")

M = TypeVar("M", bound=BaseModel)

_FUNCTIONS = TypeAdapter(list[FunctionSpec])
_MODELS = TypeAdapter(list[ModelSpec])
_INVOCATIONS = TypeAdapter(list[InvocationView])
_BINDINGS = TypeAdapter(list[TriggerBinding])
_JSON = {"Content-Type": "application/json"}


class RemoteClient(SharingCalls, ClientBase):
    """Submits invocations to a pool service (``faas serve``) over HTTP.

    It implements the client protocol (``faas.FaasClient``)
    like the embedded :class:`faas.Client`, so ``.remote``, ``.submit``,
    ``.map`` and ``.aio`` work unchanged when ``FAAS_URL`` names a service.
    The service keeps the invocations' records; this client keeps only the
    futures it is waiting on. One keep-alive HTTP connection pool serves
    every call from every thread.

    Args:
        url: The service, e.g. ``http://127.0.0.1:8470``.
        token: Bearer token (default ``$FAAS_TOKEN``; none for a service without tokens).
        timeout: Seconds each ordinary request may take.
        reconnect_deadline: Seconds a broken completion stream is retried (the
            service restarting, say) before its futures fail with ServiceError.
        stream_read_timeout: Seconds of silence after which a completion
            stream is reopened.
        transport: An httpx transport to use instead of the network (tests).
    """

    CALL_WAIT = 60.0
    """Longest ``call`` waits inside its submit request before it falls back to the stream."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        reconnect_deadline: float = 120.0,
        stream_read_timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"The faas service URL must start with http:// or https://; got {url!r}.")
        super().__init__()
        if token is None:
            token = os.environ.get("FAAS_TOKEN") or None
        self.url = url.rstrip("/")
        self.label = f"the faas service at {_without_userinfo(self.url)}"
        self.timeout = timeout
        headers = {"User-Agent": "tpm-faas"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        connect = min(timeout, 10.0)
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect),
            transport=transport
            or tcp_transport(httpx.Limits(max_connections=512, max_keepalive_connections=128), url=self.url),
        )
        self._stream_http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect, read=stream_read_timeout),
            transport=transport
            or tcp_transport(httpx.Limits(max_connections=64, max_keepalive_connections=16), url=self.url),
        )
        # JSON POSTs (submits, calls, batches) go over plain keep-alive connections: one send
        # per request and a fraction of httpx's client CPU (runtime._net.KeepAlivePosts).
        # httpx keeps everything else, https, URLs with credentials, and test transports.
        plain = transport is None and url.startswith("http://") and "@" not in urlsplit(url).netloc
        self._posts = (
            KeepAlivePosts(self.url, timeout=timeout, connect_timeout=connect, headers=headers, max_idle=128)
            if plain
            else None
        )
        self._watcher = Watcher(
            self._stream_http,
            resolve=self._resolve,
            error_for=self._error_for,
            check=self.invocation,
            reconnect_deadline=reconnect_deadline,
            label=self.label,
        )
        self._pipeline = SubmitPipeline(self._send_batch, self._watcher.add)
        self._session: SessionInfo | None = None
        self._store: ObjectStore | None = None

    def __repr__(self) -> str:
        return f"<faas.RemoteClient {_without_userinfo(self.url)!r}>"

    # -- the tenant's session and store --------------------------------------------------------
    @property
    def session(self) -> SessionInfo:
        """Who the token is, where its store is, its limits (asked once, then kept)."""
        with self._lock:
            if self._session is not None:
                return self._session
        session = self._get("/v1/session", SessionInfo)
        with self._lock:
            self._session = self._session or session
            return self._session

    @property
    def store(self) -> ObjectStore:
        """The tenant's object store: large values are staged here directly, never via the service."""
        with self._lock:
            if self._store is not None:
                return self._store
        config = self.session.store
        try:
            store = store_from_config(config)
        except ValueError as exc:
            raise ServiceError(f"{self.label} named an object store this client cannot open: {exc}") from None
        with self._lock:
            self._store = self._store or store
            return self._store

    @property
    def staging_threshold(self) -> int:
        """Arguments above this many bytes travel through the store by reference."""
        return min(self.session.staging_threshold, MAX_INLINE_BYTES)

    # -- functions and invocations -------------------------------------------------------------
    def _register_new(self, function: Function[Any]) -> FunctionSpec:
        artifact, local = function.bundle()
        try:
            body = RegisterFunction(
                artifact=artifact, **local.model_dump(exclude={"version", "digest", "created_at"})
            )
        except ValidationError as exc:
            raise SubmitError(
                f"Function {function.name!r} cannot be registered with the service: {exc}"
            ) from None
        return self._post("/v1/functions", body, FunctionSpec)

    def submit(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Validate and stage one invocation, queue it for sending, and return its future at once.

        Submits are pipelined: one sender thread sends what has queued as
        batch requests, so a loop of submits does not wait a round trip each.
        What the service answers arrives on the future: ``invocation_id``
        waits for the id it chose, and a refusal is raised by ``result()``
        (and by ``invocation_id``) as the same typed error.

        Raises:
            SubmitError: Bad or unpicklable arguments, or the function cannot be
                registered (raised here, before anything is queued).
            AuthError: The token is missing or wrong (on registering a new function).
            PoolClosedError: This client has been shut down.

        The future then raises, where the service refuses: SubmitError
        (UnknownModelError, QuotaExceededError, BackPressureError, ...),
        AuthError, or ServiceError when the service could not be reached.
        """
        function.check_arguments(args, kwargs)
        spec = self.register(function)
        future = self._future(None)
        self._pipeline.put(_ref(spec), self._item(function, args, kwargs), future)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submit so far has been answered by the service (ids or refusals).

        Returns:
            False if ``timeout`` seconds passed first.
        """
        return self._pipeline.flush(timeout)

    def _send_batch(self, function: str, items: list[Item]) -> list[str]:
        """The pipeline's sending: one batch request; the ids in item order."""
        body = BatchRequest(function=function, items=items)
        return self._post("/v1/invocation-batches", body, BatchView).ids

    def _start_call(
        self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float | None
    ) -> Future[Any]:
        # One round trip when it is quick: the service holds the request open up to CALL_WAIT.
        left = self.CALL_WAIT if deadline is None else deadline - time.monotonic()
        return self._submit(function, args, kwargs, wait=max(0.0, min(self.CALL_WAIT, left)))

    def _submit(
        self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, wait: float = 0.0
    ) -> Future[Any]:
        function.check_arguments(args, kwargs)
        spec = self.register(function)
        item = self._item(function, args, kwargs)
        body = SubmitRequest(
            function=_ref(spec), args=item.args, refs=item.refs, priority=item.priority, wait=wait
        )
        timeout = wait + self.timeout if wait else None
        return self._settle(self._post("/v1/invocations", body, InvocationView, timeout=timeout))

    def submit_by_name(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Submit an already registered function by reference (``name``, ``name@version`` or a digest).

        The arguments are not checked here (this process may not have the
        function); the service refuses what does not fit at run time.
        """
        item = self._item_named(name, args, kwargs)
        view = self._post(
            "/v1/invocations", SubmitRequest(function=name, args=item.args, refs=item.refs), InvocationView
        )
        return self._settle(view)

    def _submit_checked(self, function: Function[Any], calls: Calls, futures: list[Future[Any]]) -> None:
        """``submit_many``'s sending: batches of up to ``MAX_BATCH`` invocations per request."""
        if not calls:
            return
        spec = self.register(function)
        items = [self._item(function, args, kwargs) for args, kwargs in calls]
        for span in chunks(items):  # by count and by inline bytes, as the service takes them
            ids = self._send_batch(_ref(spec), [items[n] for n in span])
            if len(ids) != len(span):
                raise ServiceError(f"{self.label} answered a batch of {len(span)} with {len(ids)} ids.", 500)
            new = [(i, self._future(i)) for i in ids]
            futures.extend(f for _, f in new)
            self._watcher.add(new)

    def attach(self, invocation_id: str) -> Future[Any]:
        """A future for an invocation submitted earlier, by this process or another.

        Raises:
            NotFoundError: The service knows no such invocation for this tenant.
        """
        return self._settle(self.invocation(invocation_id))

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation by id; False if it had already finished.

        Raises:
            NotFoundError: No such invocation for this tenant.
        """
        return self._post(f"/v1/invocations/{_quote(invocation_id)}/cancel", None, CancelView).cancelled

    def invocation(self, invocation_id: str) -> InvocationView:
        """What the service knows about one invocation (status, function, result once final)."""
        return self._get(f"/v1/invocations/{_quote(invocation_id)}", InvocationView)

    def list_invocations(self) -> list[InvocationView]:
        """The tenant's invocations, newest first."""
        return _INVOCATIONS.validate_json(self._request("GET", "/v1/invocations").content)

    def logs(self, invocation_id: str) -> str:
        """The captured stdout and stderr of an invocation (empty until it has run)."""
        return self._request("GET", f"/v1/invocations/{_quote(invocation_id)}/logs").text

    def list_functions(self) -> list[FunctionSpec]:
        """The latest version of each of this tenant's functions."""
        return _FUNCTIONS.validate_json(self._request("GET", "/v1/functions").content)

    def list_models(self) -> list[ModelSpec]:
        """The models the service can serve."""
        # OpenAI's model list: one entry per version and alias; the bare name is the latest version.
        # (A service before the OpenAI API answered the list of specs itself.)
        answer = self._request("GET", "/v1/models").json()
        if isinstance(answer, list):
            return _MODELS.validate_python(answer)
        data = answer.get("data", []) if isinstance(answer, dict) else []
        latest = [
            e["spec"] for e in data if isinstance(e, dict) and e.get("id") == e.get("spec", {}).get("name")
        ]
        return _MODELS.validate_python(latest)

    def status(self) -> dict[str, Any]:
        """The service's pool: models (queues, replicas, metrics), workers and counters."""
        data = self._request("GET", "/v1/pool").json()
        if not isinstance(data, dict):
            raise ServiceError(f"{self.label} answered /v1/pool with a {type(data).__name__}, not an object.")
        return data

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        by: GroupBy | None = None,
        limit: int = 1000,
        tenant: str | None = None,
        all_tenants: bool = False,
    ) -> UsageReport:
        """The usage ledger: rows (newest first) or their sums ``by`` model, function, tenant, hour or day.

        Your own tenant's rows, unless an admin token asks for another
        tenant's (``tenant``) or every tenant's (``all_tenants``).

        Args:
            since: Rows that finished at or after this time (epoch seconds).
            until: Rows that finished before this time.
            by: Sum the rows by this key instead of listing them.
            limit: Most rows listed.
            tenant: Another tenant's rows (needs an admin token).
            all_tenants: Every tenant's rows (needs an admin token).

        Raises:
            ForbiddenError: A token without admin asked for another tenant's or every tenant's rows.
        """
        params: dict[str, Any] = {"limit": limit}
        params.update({k: v for k, v in (("since", since), ("until", until), ("by", by)) if v is not None})
        if tenant is not None:
            params["tenant"] = tenant
        if all_tenants:
            params["all_tenants"] = "true"
        return self._get("/v1/usage?" + urlencode(params), UsageReport)

    def bind_trigger(
        self, spec: FunctionSpec, *, name: str | None = None, reprocess: bool = False, **options: Any
    ) -> TriggerBinding:
        """Bind a registered function to new objects under a bucket prefix; the service runs the binding.

        ``fn.on_object(...)`` calls this when ``fn``'s client is a RemoteClient.

        Args:
            spec: The function version (as :meth:`register` returned it).
            name: The binding's name (default: the function's name).
            reprocess: On re-binding another version, run it on every object again.
            options: The binding's fields (``bucket``, ``output_prefix``, ``prefix``, ...).

        Raises:
            BindingError: The binding is malformed (nothing is stored).
            NotFoundError: The service does not know the function, or runs no triggers.
        """
        body = BindRequest(function=spec.digest, name=name, reprocess=reprocess, options=options)
        return self._post("/v1/triggers", body, TriggerBinding)

    def list_triggers(self) -> list[TriggerBinding]:
        """The trigger bindings of this client's tenant, as the service runs them."""
        return _BINDINGS.validate_json(self._request("GET", "/v1/triggers").content)

    def _engines_elsewhere(self) -> str:
        return (
            f"this client talks to {self.label}, which does not lend its engines out; use .remote() to "
            "run it in the service, or unset FAAS_URL to run it against an embedded pool"
        )

    def add_request_hook(self, hook: Callable[[httpx.Request], None]) -> Callable[[], None]:
        """Call ``hook(request)`` before every HTTP request this client sends (streams included).

        Returns:
            A function that removes the hook again.
        """
        for http in (self._http, self._stream_http):
            hooks = http.event_hooks
            hooks["request"] = [*hooks.get("request", []), hook]
            http.event_hooks = hooks

        def remove() -> None:
            for http in (self._http, self._stream_http):
                hooks = http.event_hooks
                hooks["request"] = [h for h in hooks.get("request", []) if h is not hook]
                http.event_hooks = hooks

        return remove

    def shutdown(self) -> None:
        """Send queued submits, stop watching (pending futures fail with PoolClosedError), close.

        Invocations already submitted keep running in the service.
        """
        with self._lock:
            if self._closed:
                return
        self._pipeline.close(self.timeout)  # queued submits are sent first, or fail: never dropped
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._watcher.close()
        self._http.close()
        self._stream_http.close()
        if self._posts is not None:
            self._posts.close()

    # -- internals -----------------------------------------------------------------------------
    def _item(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Item:
        item = self._item_named(function.name, args, kwargs)
        if function.priority != function.origin.priority:  # a with_options() override for this call
            item.priority = function.priority
        return item

    def _item_named(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Item:
        blob, refs = stage_args(self.store, args, kwargs, self.staging_threshold, what=repr(name))
        return Item(args=blob, refs=list(refs))

    def _settle(self, view: InvocationView) -> Future[Any]:
        future = self._future(view.id)
        if view.result is not None and view.result.status in FINAL_STATES:
            self._resolve(future, view.result)
        else:  # not done yet (or final but sent without its result): the watch stream delivers it
            self._watcher.add([(view.id, future)])
        return future

    def _resolve(self, future: Future[Any], view: ResultView) -> None:
        if view.status == "succeeded":
            result = Result(invocation_id=view.id, value=view.value if view.value is not None else b"")
        else:
            error = view.error or ErrorInfo(
                kind="cancelled" if view.status == "cancelled" else "system",
                type_name="InvocationCancelled" if view.status == "cancelled" else "ServiceError",
                message=f"Invocation {view.id} {view.status}; the service gave no reason.",
            )
            result = Result(invocation_id=view.id, error=error, finished_at=time.time())
        future._resolve(result)

    def _cancel_future(self, invocation_id: str) -> bool:
        """The futures' canceller: the stream must not resolve the future while it is being cancelled."""
        future = self._watcher.forget(invocation_id)
        try:
            cancelled = self.cancel(invocation_id)
            if not cancelled and future is not None:  # it had finished: keep its result
                view = self.invocation(invocation_id)
                if view.result is not None and view.result.status in FINAL_STATES:
                    self._resolve(future, view.result)
                    future = None
            return cancelled
        except FaasError as exc:  # Future.cancel must not raise for a service hiccup
            log.warning("Could not cancel invocation %s: %s", invocation_id, exc)
            return False
        finally:
            if future is not None and not future.done() and not self._closed:
                with contextlib.suppress(PoolClosedError):
                    self._watcher.add([(invocation_id, future)])

    def _get(self, path: str, model: type[M]) -> M:
        return model.model_validate_json(self._request("GET", path).content)

    def _post(self, path: str, body: BaseModel | None, model: type[M], *, timeout: float | None = None) -> M:
        content = body.model_dump_json().encode() if body is not None else b"{}"
        if self._posts is not None:
            status, payload = self._post_plain(path, content, timeout)
        else:
            response = self._request("POST", path, content=content, timeout=timeout)
            status, payload = response.status_code, response.content
        try:
            return model.model_validate_json(payload)
        except ValidationError as exc:
            raise ServiceError(
                f"{self.label} answered POST {path} with a body this client does not understand: {exc}",
                status,
            ) from None

    def _post_plain(self, path: str, content: bytes, timeout: float | None) -> tuple[int, bytes]:
        assert self._posts is not None
        if self._closed:
            raise PoolClosedError("This faas remote client has been shut down.")
        for hook in self._http.event_hooks.get("request", []):  # as httpx would call them
            hook(self._http.build_request("POST", path, content=content, headers=_JSON))
        try:
            status, payload, headers = self._posts.post_bytes(path, content, timeout=timeout or self.timeout)
        except (OSError, HTTPException) as exc:
            if self._closed:  # shut down while this call was on its way
                raise PoolClosedError("This faas remote client has been shut down.") from None
            raise self._not_reached("POST", path, exc, timed_out=isinstance(exc, TimeoutError)) from None
        if status >= 400:
            request = self._http.build_request("POST", path, content=content, headers=_JSON)
            raise self._error_for(httpx.Response(status, headers=headers, content=payload, request=request))
        return status, payload

    def _request(
        self, method: str, path: str, *, content: bytes | None = None, timeout: float | None = None
    ) -> httpx.Response:
        if self._closed:
            raise PoolClosedError("This faas remote client has been shut down.")
        try:
            response = self._http.request(
                method,
                path,
                content=content,
                headers=_JSON if content is not None else None,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            timed_out = isinstance(exc, httpx.TimeoutException)
            raise self._not_reached(method, path, exc, timed_out=timed_out) from None
        if response.status_code >= 400:
            raise self._error_for(response)
        return response

    def _not_reached(self, method: str, path: str, exc: Exception, *, timed_out: bool) -> ServiceError:
        """The error of a request that got no answer, from either HTTP path."""
        if timed_out:
            return ServiceError(
                f"{self.label} did not answer {method} {path} in time ({type(exc).__name__}).", 0
            )
        return ServiceError(
            f"Could not reach {self.label} for {method} {path}: {type(exc).__name__}: {exc}.", 0
        )

    def _error_for(self, response: httpx.Response) -> FaasError:
        return error_for_response(response, self.label)


def _ref(spec: FunctionSpec) -> str:
    return spec.ref if spec.version > 0 else spec.digest


def _quote(invocation_id: str) -> str:
    if not invocation_id:
        raise NotFoundError("An empty invocation id names no invocation.", 404)
    return quote(invocation_id, safe="")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
