"""The one worker-side execution of an invocation, for every kind of worker.

A local pool's worker process and a Globus Compute engine's HTEX worker both
receive a :class:`Dispatch` (pickled over the worker's pipe; JSON in a Globus
Compute task) and hand it to a :class:`Runner`, which:

1. opens the invocation's own store (a tenant's prefix in the service; the
   dispatch's ``store`` when the invocation names none) and loads the function
   by digest, verified before anything is unpickled;
2. builds (and caches) the :class:`runtime.Model` handle on the engine, with
   the model's allowed modes, resolving ``adapter=`` from the invocation's
   snapshot of adapter aliases (files fetched and verified on first use);
3. runs :func:`runtime.execute`, inline, or in a thread bounded by the
   dispatch's deadline, after which the invocation's engine requests are
   aborted and a timeout Result is returned so the worker is free again.

It never raises for a failure of the invocation: loading errors become a
``system`` Result, an engine that is missing or failed an ``engine_lost`` one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from registry import AdapterSpec, Registry, split_ref
from runtime import (
    INTERNALS_MODES,
    MODES,
    AdapterRef,
    AdapterResolver,
    EngineError,
    ErrorKind,
    FaasError,
    Invocation,
    InvocationTimeout,
    Model,
    ObjectNotFound,
    ObjectStore,
    PartialSink,
    Result,
    UnknownAdapterError,
    error_info,
    execute,
    fetch_adapter,
    partial_sink,
    store_from_config,
)


class Dispatch(BaseModel):
    """Run one invocation: the message every kind of worker receives.

    Attributes:
        invocation: What to run.
        engine_url: The engine replica to call (None: the worker's own block engine, or no model).
        model_name: The resolved model reference (``name@version``); None for no model.
        model_param: The parameter receiving the Model handle.
        model_param_index: Its position.
        model_modes: Inference modes the model allows (None: all).
        store: The store to load the function from when the invocation names none.
        deadline: When the pool stops waiting (epoch seconds); the runner returns then.
        engine_priority: The engine's per-request ``priority`` for the invocation's
            requests (None: not sent; see ``warmpool._fair.engine_priority``).
    """

    model_config = ConfigDict(frozen=True)

    invocation: Invocation
    engine_url: str | None = None
    model_name: str | None = None
    model_param: str | None = None
    model_param_index: int = 0
    model_modes: frozenset[str] | None = None
    store: dict[str, Any] | None = None
    deadline: float | None = None
    engine_priority: int | None = None


class Abort(BaseModel):
    """Stop caring about an invocation attempt and abort its engine requests (best effort)."""

    model_config = ConfigDict(frozen=True)

    invocation_id: str
    attempt: int = 0


def _abort_prefix(invocation_id: str, attempt: int) -> str:
    return f"inv-{invocation_id}-{attempt}-"  # the request ids execute() gives the attempt


class Runner:
    """Runs dispatched invocations in one worker; caches stores, registries and model handles.

    Args:
        store_config: The store used when neither the invocation nor the dispatch names one.
    """

    def __init__(self, store_config: dict[str, Any] | None = None) -> None:
        self._default = store_config
        self._lock = threading.Lock()
        self._stores: dict[str, tuple[ObjectStore, Registry]] = {}
        self._handles: dict[
            tuple[str, str, frozenset[str] | None, frozenset[str], frozenset[str]], Model
        ] = {}
        self._running: dict[tuple[str, int], Model] = {}
        self._adapter_specs: dict[tuple[int, str], AdapterSpec] = {}  # versions never change

    def open_store(self, config: dict[str, Any]) -> ObjectStore:
        """Open (and cache) a store; a worker opens its pool's store this way before it says Ready."""
        return self._registry(config)[0]

    def _registry(self, config: dict[str, Any]) -> tuple[ObjectStore, Registry]:
        key = json.dumps(config, sort_keys=True, default=str)
        with self._lock:
            hit = self._stores.get(key)
            if hit is None:
                store = store_from_config(config)
                hit = self._stores[key] = (store, Registry(store))
            return hit

    def _handle(self, url: str, name: str, modes: frozenset[str] | None, inv: Invocation) -> Model:
        # The one place every substrate's workers build handles: a token without the
        # ``internals`` scope, or a tenant without a grant, loses those modes here,
        # whatever the model allows.
        unscoped = INTERNALS_MODES if inv.internals_scope is False else frozenset()
        granted = inv.granted_modes
        ungranted = MODES - frozenset(granted) if granted is not None else frozenset()
        key = (url, name, modes, unscoped, ungranted)
        with self._lock:
            model = self._handles.get(key)
            if model is None:
                model = Model(url, name, allowed_modes=modes, unscoped=unscoped, ungranted=ungranted)
                self._handles[key] = model
            return model

    def _resolver(
        self, inv: Invocation, registry: Registry, fallback: dict[str, Any] | None, model: str | None
    ) -> AdapterResolver:
        """Resolves ``adapter=`` for one invocation: aliases from its submit-time snapshot.

        Versions are looked up in the invocation's own registry, then the pool's (a service
        tenant's functions live in its prefix; the operator's adapters beside the models).
        """
        snapshot = inv.adapters or {}

        def resolve(adapter: str) -> AdapterRef:
            name, version = split_ref(adapter)
            ref = snapshot.get(adapter) or (adapter if version and version.isdigit() else None)
            if ref is None:
                raise UnknownAdapterError(
                    f"Model {model!r} had no adapter alias {adapter!r} when this invocation was "
                    f"submitted (its aliases then: {sorted(snapshot) or 'none'}); pin a version as {name}@N."
                )
            spec, store = self._adapter_spec(ref, registry, fallback)
            if spec.base_model != model:
                raise UnknownAdapterError(f"Adapter {spec.ref} adapts {spec.base_model}, not {model}.")
            return AdapterRef(spec.ref, spec.sha256, str(fetch_adapter(store, spec.uri, spec.sha256)))

        return resolve

    def _adapter_spec(
        self, ref: str, registry: Registry, fallback: dict[str, Any] | None
    ) -> tuple[AdapterSpec, ObjectStore]:
        registries = [registry] + ([self._registry(fallback)[1]] if fallback else [])
        for reg in registries:
            key = (id(reg), ref)
            with self._lock:
                spec = self._adapter_specs.get(key)
            if spec is None:
                try:
                    spec = reg.adapters.get(ref)
                except (UnknownAdapterError, ObjectNotFound):
                    continue
                with self._lock:
                    self._adapter_specs[key] = spec
            return spec, reg.store
        raise UnknownAdapterError(f"No adapter {ref!r} is registered.")

    def abort(self, invocation_id: str, attempt: int) -> None:
        """Abort the engine requests of a running attempt (it finishes on its own)."""
        with self._lock:
            model = self._running.get((invocation_id, attempt))
        if model is not None:
            model.abort_prefix(_abort_prefix(invocation_id, attempt))

    def run(
        self, dispatch: Dispatch, *, engine_error: str | None = None, on_partial: PartialSink | None = None
    ) -> Result:
        """Run one invocation and return its Result (never raises for the invocation's failures).

        Args:
            dispatch: What to run, and against which engine.
            engine_error: Why this worker's engine is unusable (a block whose engine
                failed to start); invocations with a model then fail as ``engine_lost``.
            on_partial: Where the invocation's partial outputs go (``runtime.emit_partial``);
                None: this worker has no channel for them.
        """
        inv = dispatch.invocation
        try:
            model: Model | None = None
            if dispatch.model_name:
                if engine_error:
                    raise EngineError(engine_error)
                if not dispatch.engine_url:
                    raise EngineError(f"This worker has no engine for {dispatch.model_name}.")
                model = self._handle(dispatch.engine_url, dispatch.model_name, dispatch.model_modes, inv)
            config = inv.store or dispatch.store or self._default
            if config is None:
                raise FaasError(f"Invocation {inv.id} names no object store to load its function from.")
            store, registry = self._registry(config)
            fn = registry.load_function(inv.function_digest)
            if model is not None:
                fallback = dispatch.store or self._default
                model = model.with_adapters(self._resolver(inv, registry, fallback, dispatch.model_name))
        except Exception as exc:  # loading failed: engine, integrity, unpickling, store
            kind: ErrorKind = "engine_lost" if isinstance(exc, EngineError) else "system"
            return _failed(inv, exc, kind, with_traceback=not isinstance(exc, EngineError))

        def call() -> Result:
            with partial_sink(on_partial):  # set in the thread that runs it
                return execute(
                    inv,
                    fn,
                    model=model,
                    model_param=dispatch.model_param,
                    model_param_index=dispatch.model_param_index,
                    store=store,
                    engine_priority=dispatch.engine_priority,
                )

        key = (inv.id, inv.attempt)
        if model is not None:
            with self._lock:
                self._running[key] = model
        try:
            if dispatch.deadline is None:
                return call()
            box: list[Result] = []
            thread = threading.Thread(
                target=lambda: box.append(call()), name=f"faas-inv-{inv.id}", daemon=True
            )
            thread.start()
            thread.join(max(0.0, dispatch.deadline - time.time()))
            if box:
                return box[0]
            # The pool has failed it already; free this worker and the engine's slots.
            if model is not None:
                model.abort_prefix(_abort_prefix(inv.id, inv.attempt))
            late = InvocationTimeout(f"The invocation of {inv.function_name!r} ran past its deadline.")
            return _failed(inv, late, "timeout", with_traceback=False)
        finally:
            with self._lock:
                self._running.pop(key, None)


def _failed(inv: Invocation, exc: BaseException, kind: ErrorKind, *, with_traceback: bool) -> Result:
    return Result(
        invocation_id=inv.id,
        error=error_info(exc, kind, with_traceback=with_traceback),
        worker_pid=os.getpid(),
        attempt=inv.attempt,
        finished_at=time.time(),
    )
