"""OpenAI request bodies as invocations of the service's built-in functions.

The one mechanism behind the OpenAI-compatible routes (and any other way in
that has OpenAI bodies, such as a batch file): :meth:`OpenAIGateway.prepare`
checks a body and resolves its model before anything is accepted;
:meth:`OpenAIGateway.submit` hands prepared requests to
:meth:`ServiceCore.submit` as invocations of ``openai.chat``,
``openai.completions`` or ``openai.embeddings`` for the tenant (durable,
queued, fair-shared, retried, recorded with provenance and a usage row like
any invocation); :meth:`OpenAIGateway.reply` turns a finished invocation back
into the OpenAI response body, or raises its typed error. No web code here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from faas._future import rebuild_error
from faas.openai import Kind, Request, check_request
from faas.service._api import MAX_INLINE_BYTES, BatchView, Item, ResultView
from faas.service._core import ServiceCore
from faas.service._tenant import Tenant
from registry import ModelSpec
from runtime import (
    EngineError,
    FaasError,
    InvalidParameterError,
    MissingScopeError,
    ModeNotAllowedError,
    PayloadTooLargeError,
    dumps,
    is_marker,
    scoped_store,
    unstage_value,
)

log = logging.getLogger("faas.service")

BUILTIN_OF: dict[Kind, str] = {
    "chat": "openai.chat",
    "completions": "openai.completions",
    "embeddings": "openai.embeddings",
}
MAX_RETRY_AFTER = 120
"""The longest ``Retry-After`` the service sends: the official client waits no longer."""
DEFAULT_COLD_START = 60.0
"""Assumed cold start of a model that has never started here."""

CATALOG_SECONDS = 1.0
"""How long the list of model versions is reused (states are always current)."""

ModelStateName = Literal["hot", "starting", "cold"]


@dataclass(frozen=True)
class Prepared:
    """A checked OpenAI request, its model resolved, ready to submit.

    Attributes:
        request: The checked body.
        model: The model version it runs on.
        item: The built-in function's arguments (the body) and the call's priority.
    """

    request: Request
    model: ModelSpec
    item: Item

    @property
    def function(self) -> str:
        """The reserved name of the built-in function it runs as."""
        return BUILTIN_OF[self.request.kind]


@dataclass(frozen=True)
class ModelState:
    """Whether a model version can answer now.

    Attributes:
        state: ``hot`` (a ready engine), ``starting`` (one is starting) or ``cold``.
        eta_seconds: While starting, the expected seconds to ready (from its last cold start here).
    """

    state: ModelStateName
    eta_seconds: float | None = None

    @property
    def retry_after(self) -> int:
        """Whole seconds a client should wait before trying again (1 to ``MAX_RETRY_AFTER``)."""
        eta = self.eta_seconds if self.eta_seconds is not None else DEFAULT_COLD_START
        return max(1, min(MAX_RETRY_AFTER, round(eta)))


class OpenAIGateway:
    """Runs OpenAI request bodies as a tenant's invocations of the built-in functions.

    Args:
        core: The service core the invocations go through.
    """

    def __init__(self, core: ServiceCore) -> None:
        self.core = core
        self._lock = threading.Lock()
        self._warming: set[str] = set()
        self._builtins: dict[tuple[str, str], str] = {}  # (tenant, built-in name) -> digest
        self._versions: tuple[float, list[tuple[ModelSpec, list[str]]]] = (-math.inf, [])

    # -- requests ----------------------------------------------------------------------
    def prepare(self, kind: Kind, raw: object) -> Prepared:
        """Check a body and resolve its model; nothing is accepted yet.

        Raises:
            InvalidParameterError: A field is missing or malformed.
            UnknownModelError: No such model.
            ModeNotAllowedError: The model's policy refuses the request (logprobs, embeddings).
        """
        request = check_request(kind, raw)
        model = self.core.resolve_model(request.model)
        if "@" not in request.model:
            model = self.core.pool.prefer_warm(model)
        needs = (
            {"encode"} if kind == "embeddings" else {"generate", *(["logprobs"] if request.logprobs else [])}
        )
        denied = needs - set(model.modes)
        if denied:
            raise ModeNotAllowedError(
                f"Model {request.model!r} does not allow {', '.join(sorted(denied))} "
                f"(it allows {', '.join(model.modes) or 'nothing'})."
            )
        args = dumps(((request.body,), {}), what="request body")
        if len(args) > MAX_INLINE_BYTES:  # a huge prompt: refused whole, never half-accepted
            raise PayloadTooLargeError(
                f"The request ({len(args)} bytes serialised) is over the service's limit of "
                f"{MAX_INLINE_BYTES} bytes for one request; send a shorter prompt."
            )
        return Prepared(request, model, Item(args=args, priority=request.priority))

    def submit(
        self,
        tenant: Tenant,
        prepared: Sequence[Prepared],
        *,
        batch: bool = False,
        on_partial: Callable[[str, int, Any], None] | None = None,
        listener: Callable[[ResultView], None] | None = None,
        batch_id: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> BatchView:
        """Accept prepared requests as the tenant's invocations; durable when this returns.

        All of them must be of one kind and one model version (a batch file's are).
        ``on_partial(invocation_id, attempt, chunk)`` receives a streamed request's
        engine chunks as they come, where the substrate has a channel (pass them
        through :meth:`client_chunk`); the reply carries them all in any case.
        ``listener`` is told of each result as it is committed (``ServiceCore.listen``).

        Raises:
            InvalidParameterError: Mixed kinds or models.
            MissingScopeError: A request asks for logprobs and the tenant lacks the
                ``internals`` scope (nothing accepted; the worker would refuse it too).
            QuotaExceededError: The tenant's queue quota (nothing accepted).
            BudgetExceededError: The tenant's token budget (nothing accepted).
            BackPressureError: The model's queue is full.
            PoolClosedError: The service is shutting down.
        """
        if not prepared:
            raise InvalidParameterError("Nothing to submit.", None)
        first = prepared[0]
        if any(p.function != first.function or p.model.ref != first.model.ref for p in prepared):
            raise InvalidParameterError(
                "Requests submitted together must share one route and one model.", "model"
            )
        if any(p.request.logprobs for p in prepared):
            if not tenant.may("internals"):
                raise MissingScopeError(
                    "Your token lacks the 'internals' scope, which logprobs needs; nothing was accepted."
                )
            granted = tenant.granted_modes(first.model.ref)
            if granted is not None and "logprobs" not in granted:
                raise ModeNotAllowedError(
                    f"Tenant {tenant.name!r} is not granted logprobs on {first.model.name!r}; "
                    "nothing was accepted."
                )
        key = (tenant.name, first.function)
        digest = self._builtins.get(key)
        if digest is None:
            digest = self._builtins[key] = self.core.builtin(tenant, first.function).digest
        items = [p.item for p in prepared]
        return self.core.submit(
            tenant,
            digest,
            items,
            batch=batch,
            model=first.model,
            on_partial=on_partial,
            listener=listener,
            batch_id=batch_id,
            ids=ids,
        )

    def wait(self, tenant: Tenant, ids: Sequence[str], timeout: float | None = None) -> dict[str, ResultView]:
        """Block until the invocations finish (or ``timeout``); returns the finished ones by id.

        For threads (a batch runner); the routes wait without a thread through ``core.listen``.

        Raises:
            NotFoundError: An id is unknown or another tenant's.
        """
        done: dict[str, ResultView] = {}
        cond = threading.Condition()

        def put(view: ResultView) -> None:
            with cond:
                done[view.id] = view
                cond.notify_all()

        wanted = list(dict.fromkeys(ids))
        for view in self.core.listen(tenant, wanted, put):
            put(view)
        try:
            with cond:
                cond.wait_for(lambda: len(done) >= len(wanted), timeout)
                return dict(done)
        finally:
            self.core.unlisten(wanted, put)

    def reply(self, tenant: Tenant, prepared: Prepared, view: ResultView) -> dict[str, Any]:
        """The OpenAI response body of a finished invocation (a streamed one's: ``chunks``).

        The ``model`` in the body (and in every chunk) is the name the client asked for.
        A streamed request's reply is ``{"object": "faas.stream", "chunks": [...]}``,
        without the usage chunk unless the client asked for it.

        Raises:
            FaasError: The invocation failed: its own typed error (a rejected request is
                an ``EngineRejectedError``, a refused mode a ``ModeNotAllowedError``, ...).
        """
        return self.reply_to(tenant, prepared.request, view)

    def reply_to(self, tenant: Tenant, request: Request, view: ResultView) -> dict[str, Any]:
        """:meth:`reply` for a checked request (a batch line's, read back from its file)."""
        if view.status != "succeeded" or view.value is None:
            if view.error is None:
                raise FaasError(f"Invocation {view.id} ended {view.status} without a result.")
            raise rebuild_error(view.error)
        store = scoped_store(self.core.store, tenant.prefix) if is_marker(view.value) else None
        body = unstage_value(store, view.value, what=f"reply of invocation {view.id}")
        if not isinstance(body, dict):
            raise EngineError(f"Invocation {view.id} returned {type(body).__name__}, not a response body.")
        if body.get("object") == "faas.stream":
            chunks = [self.request_chunk(request, c) for c in body.get("chunks", [])]
            return {**body, "chunks": [c for c in chunks if c is not None]}
        return {**body, "model": request.model}

    def client_chunk(self, prepared: Prepared, chunk: object) -> dict[str, Any] | None:
        """An engine chunk as the client sees it (its model name; usage only if asked), or None."""
        return self.request_chunk(prepared.request, chunk)

    def request_chunk(self, request: Request, chunk: object) -> dict[str, Any] | None:
        """:meth:`client_chunk` for a checked request."""
        if not isinstance(chunk, dict):
            return None
        if not request.include_usage:
            if not chunk.get("choices"):
                return None  # the usage chunk the engine always sends
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return {**chunk, "model": request.model}

    # -- models ------------------------------------------------------------------------
    def state(self, model: ModelSpec) -> ModelState:
        """Whether ``model`` has a ready engine, one starting (and when it should be ready), or none."""
        replicas = self.core.pool.replicas(model.ref)
        states = {r.state.value for r in replicas}
        if "ready" in states:
            return ModelState("hot")
        starting = [r for r in replicas if r.state.value == "starting"]
        if not starting:
            return ModelState("cold")
        took = [r.cold_start_s for r in replicas if r.cold_start_s is not None]
        expected = took[-1] if took else min(model.startup_timeout, DEFAULT_COLD_START)
        elapsed = max(0.0, time.monotonic() - min(r.created_at for r in starting))
        return ModelState("starting", max(1.0, expected - elapsed))

    def tier(self, model: ModelSpec, state: ModelState) -> str:
        """``hot``, ``staged`` or ``cold`` (a substrate that cannot see its nodes' disks: hot or cold)."""
        of = getattr(self.core.pool, "weights_tier", None)
        if of is None:
            return "hot" if state.state == "hot" else "cold"
        try:
            return str(of(model))
        except OSError:
            return "hot" if state.state == "hot" else "cold"

    def warm(self, model: ModelSpec) -> None:
        """Start an engine of ``model`` in the background (once at a time); returns at once."""
        with self._lock:
            if model.ref in self._warming:
                return
            self._warming.add(model.ref)

        def start() -> None:
            try:
                self.core.pool.engine_url(model)
            except Exception as exc:  # the replica records why; a later request tries again
                log.warning("Warming %s failed: %s", model.ref, exc)
            finally:
                with self._lock:
                    self._warming.discard(model.ref)

        threading.Thread(target=start, name=f"faas-warm-{model.ref}", daemon=True).start()

    def catalog(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: every alias (``name`` for ``latest``, ``name@alias``) and version.

        Each is an OpenAI model object with our fields: ``version``, ``aliases``,
        ``state``, ``eta_seconds``, ``tier`` (``hot``: an engine is up; ``staged``:
        its weights are on the pool node's disk; ``cold``: only in the object
        store), ``root`` (the version it names) and ``spec``.
        """
        listed_at, versions = self._versions
        if time.monotonic() - listed_at > CATALOG_SECONDS:  # a store listing: not on every request
            versions = self.core.models.model_versions()
            self._versions = (time.monotonic(), versions)
        entries: list[dict[str, Any]] = []
        for spec, aliases in versions:
            state = self.state(spec)
            tier = self.tier(spec, state)
            ids = [spec.ref] + [spec.name if a == "latest" else f"{spec.name}@{a}" for a in aliases]
            for model_id in ids:
                entries.append(
                    {
                        "id": model_id,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tpm-faas",
                        "root": spec.ref,
                        "version": spec.version,
                        "aliases": aliases,
                        "state": state.state,
                        "eta_seconds": state.eta_seconds,
                        "tier": tier,
                        "spec": spec.model_dump(mode="json"),
                    }
                )
        return sorted(entries, key=lambda e: e["id"])
