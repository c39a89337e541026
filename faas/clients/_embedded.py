"""``faas.Client``: registers functions and submits invocations to a pool embedded in this process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faas._future import Future
from faas.clients._base import RecordingClient, RecordsMode
from registry import AdapterSpec, ModelSpec
from runtime import (
    Invocation,
    Model,
    ObjectStore,
    PoolClosedError,
    StoreError,
    SubmitError,
    default_store_url,
    staging_threshold,
    store_from_url,
)
from warmpool import (
    AdapterMove,
    EngineFactory,
    Pool,
    Substrate,
    SubstrateKind,
    default_engine_factory,
    make_substrate,
    move_adapter_alias,
)

if TYPE_CHECKING:
    from registry import FunctionSpec

log = logging.getLogger("faas.client")


class Client(RecordingClient):
    """Submits invocations to a warm pool running embedded in this process.

    The pool (its workers and engines) starts on first use and stops on
    :meth:`shutdown`, at interpreter exit, or when the ``with`` block ends.

    Args:
        store: An ObjectStore or store URL (default ``$FAAS_STORE`` or a
            directory under the user's cache).
        workers: Worker processes in the pool.
        threads_per_worker: Invocations each worker runs at once.
        engine_factory: Builds engine hosts (tests inject failing ones).
        log_dir: Where engine logs go.
        staging_threshold: Arguments and results above this many bytes travel
            through the store by reference (default ``$FAAS_STAGING_THRESHOLD``
            or 1 MiB; ints or strings such as ``"4MiB"``).
        records: How invocation records are written to the store: ``"async"``
            (default: on a background thread, in order, flushed at shutdown),
            ``"sync"`` (before ``submit`` returns and before the future
            resolves) or ``"off"``.
        substrate: Where invocations run: ``"local"`` (engines and workers as
            child processes) or ``"globus-compute"`` (one Globus Compute engine
            per model; see ``warmpool.GlobusComputePool``).
        substrate_options: Extra options of the substrate's constructor
            (e.g. ``{"address": "127.0.0.1", "workers_per_node": 16}``).
    """

    def __init__(
        self,
        *,
        store: ObjectStore | str | None = None,
        workers: int = 2,
        threads_per_worker: int = 64,
        engine_factory: EngineFactory = default_engine_factory,
        log_dir: Path | None = None,
        staging_threshold: int | str | None = None,
        records: RecordsMode = "async",
        substrate: SubstrateKind = "local",
        substrate_options: dict[str, Any] | None = None,
    ) -> None:
        if records not in ("async", "sync", "off"):
            raise ValueError(f"records must be 'async', 'sync' or 'off', not {records!r}.")
        super().__init__()
        if store is None:
            store = default_store_url()
        self._init_records(store_from_url(store) if isinstance(store, str) else store, records)
        self.staging_threshold = _threshold(staging_threshold)
        self._pool_args: dict[str, Any] = {
            "workers": workers,
            "threads_per_worker": threads_per_worker,
            "engine_factory": engine_factory,
            "log_dir": log_dir,
        }
        self._substrate: SubstrateKind = substrate
        self._substrate_options: dict[str, Any] = dict(substrate_options or {})
        self._pool: Substrate | None = None
        self._handles: dict[str, Model] = {}
        self._model_cache: dict[str, tuple[ModelSpec, float]] = {}

    def __repr__(self) -> str:
        return f"<faas.Client store={self.store.url()!r}>"

    @property
    def pool(self) -> Substrate:
        """The embedded pool, started on first use."""
        with self._lock:
            if self._closed:
                raise PoolClosedError(self.CLOSED_MESSAGE)
            if self._pool is None:
                warm = [m for m in self.registry.list_models() if m.min_replicas >= 1]
                options = {**self._pool_args, **self._substrate_options}
                self._pool = make_substrate(self._substrate, self.store, **options).start(models=warm)
            return self._pool

    MODEL_CACHE_SECONDS = 0.5
    """How long a resolved model reference is reused: an alias move is seen within this."""

    def resolve_model(self, ref: str) -> ModelSpec:
        """Resolve a model reference; raises UnknownModelError for unknown names.

        Resolutions are cached for ``MODEL_CACHE_SECONDS`` so a burst of
        submits does not read the registry twice per invocation.
        """
        now = time.monotonic()
        hit = self._model_cache.get(ref)
        if hit is not None and now - hit[1] < self.MODEL_CACHE_SECONDS:
            return hit[0]
        spec = self.registry.get_model(ref)
        self._model_cache[ref] = (spec, now)
        return spec

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``name@alias`` at ``version``; this client sees it at once, others within a cache period."""
        self.registry.set_model_alias(name, alias, version)
        self._model_cache.clear()

    def add_adapter(
        self,
        directory: str | Path,
        name: str,
        base_model: str,
        *,
        version: str | None = None,
        alias: str | None = "latest",
    ) -> AdapterSpec:
        """Register a PEFT LoRA adapter directory as a new version of ``name`` for ``base_model``.

        ``base_model`` is resolved now (``sci`` -> ``sci@2``): an adapter adapts one model version.
        """
        base = self.resolve_model(base_model).ref
        return self.registry.adapters.add(directory, name, base, version=version, alias=alias)

    def set_adapter_alias(
        self, name: str, version: str, alias: str = "latest", *, timeout: float = 600.0
    ) -> AdapterMove:
        """Move ``name@alias`` to ``version``: load it on the warm replicas, move, drain the old, unload it.

        Invocations submitted before the move keep the version they resolved (in flight or
        queued); those submitted after run on ``version``. Moving it back is the rollback.
        A pool that is not local only moves the alias (engines load adapters on first use).
        """
        pool = self.pool
        if isinstance(pool, Pool):
            return move_adapter_alias(self.registry, pool, name, version, alias, timeout=timeout)
        spec = self.registry.adapters.set_alias(name, alias, version)
        return AdapterMove(alias=f"{name}@{alias}", old=None, new=spec.ref)

    def _model_for(self, ref: str | None) -> ModelSpec | None:
        if not ref:
            return None
        model = self.resolve_model(ref)
        if "@" not in ref:
            model = self.pool.prefer_warm(model)  # an alias moved: warm the new version first
        return model

    def _check_open(self) -> None:
        """Refuse when shut down; start the pool (or refuse) before anything is recorded."""
        super()._check_open()
        self.pool  # noqa: B018

    def _dispatch(
        self, invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, future: Future[Any]
    ) -> None:
        self.pool.submit(
            invocation, spec, model, lambda result: self._finish(future, invocation, spec, model, result)
        )

    def _phase(self, invocation_id: str) -> str | None:
        pool = self._pool
        return pool.state(invocation_id) if pool is not None else None

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation by id."""
        pool = self._pool
        return pool.cancel(invocation_id) if pool is not None else False

    def model_handle(self, ref: str) -> Model:
        """A handle on a ready replica of model ``ref`` (starting one if needed)."""
        spec = self.resolve_model(ref)
        url = self.pool.engine_url(spec)
        with self._lock:
            handle = self._handles.get(url)
            if handle is None:
                handle = self._handles[url] = Model(
                    url, spec.ref, request_prefix="local", allowed_modes=frozenset(spec.modes)
                )
            return handle

    def status(self) -> dict[str, Any]:
        """The pool's models (queues, replicas, metrics), workers and counters."""
        pool = self._pool
        return pool.status() if pool is not None else {"counters": {}, "models": {}, "workers": []}

    def shutdown(self) -> None:
        """Stop the pool and every process it started."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.close()
        if pool is not None:
            pool.shutdown()
        self._close_recorder()

    def attach(self, invocation_id: str) -> Future[Any]:
        """A future for an invocation recorded in this client's store, by id.

        If its result is recorded, the future is resolved at once; otherwise a
        daemon thread reads the store, with backoff, until the result appears
        (this needs ``records`` other than ``"off"`` in the submitting client).

        Raises:
            NotFoundError: Nothing is recorded under that id and this client's pool does not know it.
        """
        future = self._attach_recorded(invocation_id)
        if future is not None:
            return future
        if self.records.request(invocation_id) is None and self._phase(invocation_id) is None:
            raise self._not_recorded(invocation_id)
        future = self._future(invocation_id)
        threading.Thread(target=self._poll_result, args=(future,), name="faas-attach", daemon=True).start()
        return future

    def _poll_result(self, future: Future[Any]) -> None:
        delay = 0.05
        while not future.done():
            if self._closed:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(
                        PoolClosedError(
                            f"The faas client was shut down before invocation {future.invocation_id} "
                            "finished; re-attach with faas.Future.from_id(invocation_id)."
                        )
                    )
                return
            try:
                result = self._stored_result(future.invocation_id)
            except StoreError as exc:  # a store hiccup: keep trying
                log.warning("Could not read the result of invocation %s: %s", future.invocation_id, exc)
                result = None
            if result is not None:
                future._resolve(result)
                return
            time.sleep(delay)  # polling the store is the embedded fallback only
            delay = min(delay * 1.5, 2.0)


def _threshold(value: int | str | None) -> int:
    try:
        return staging_threshold(value)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
