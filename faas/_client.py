"""The client: registers functions and submits invocations to the embedded pool."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from faas._future import Future, submit_each
from faas._gc_cloud import ENDPOINT_ENV, GlobusComputeCloudClient
from faas._provenance import build_provenance
from faas._remote import RemoteClient
from registry._registry import Registry
from registry._specs import FunctionSpec, ModelSpec
from runtime._errors import NotFoundError, ObjectNotFound, PoolClosedError, StoreError
from runtime._execute import error_info
from runtime._model import Model
from runtime._paths import default_store_url
from runtime._records import InvocationRecord, RecordStore, RecordWriter
from runtime._staging import Ref, StagedRef, stage_args, stage_object, staging_threshold, unstage_value
from runtime._store import ObjectStore, store_from_url
from runtime._wire import Invocation, OutputTarget, Result
from warmpool._replica import EngineFactory, default_engine_factory
from warmpool._substrate import Substrate, SubstrateKind, make_substrate

if TYPE_CHECKING:
    from faas._function import Function

log = logging.getLogger("faas.client")

RecordsMode = Literal["async", "sync", "off"]


class Client:
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
        if store is None:
            store = default_store_url()
        self.store: ObjectStore = store_from_url(store) if isinstance(store, str) else store
        self.registry = Registry(self.store)
        self.staging_threshold = _threshold(staging_threshold)
        self.records = RecordStore(self.store)
        self._records_mode: RecordsMode = records
        self._recorder = RecordWriter(self.records) if records == "async" else None
        self._store_config = self.store.config()
        self._pool_args: dict[str, Any] = {
            "workers": workers,
            "threads_per_worker": threads_per_worker,
            "engine_factory": engine_factory,
            "log_dir": log_dir,
        }
        self._substrate: SubstrateKind = substrate
        self._substrate_options: dict[str, Any] = dict(substrate_options or {})
        self._pool: Substrate | None = None
        self._lock = threading.Lock()
        self._specs: dict[int, tuple[Function[Any], FunctionSpec]] = {}
        self._handles: dict[str, Model] = {}
        self._closed = False
        self._model_cache: dict[str, tuple[ModelSpec, float]] = {}

    def __repr__(self) -> str:
        return f"<faas.Client store={self.store.url()!r}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def pool(self) -> Substrate:
        """The embedded pool, started on first use."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("This faas client has been shut down.")
            if self._pool is None:
                warm = [m for m in self.registry.list_models() if m.min_replicas >= 1]
                options = {**self._pool_args, **self._substrate_options}
                self._pool = make_substrate(self._substrate, self.store, **options).start(models=warm)
            return self._pool

    def register(self, function: Function[Any]) -> FunctionSpec:
        """Register ``function`` in the store (once per client) and return its spec."""
        with self._lock:
            cached = self._specs.get(id(function))
            if cached is not None and cached[0] is function:
                return cached[1]
        artifact, spec = function.bundle()
        spec = self.registry.register_function(artifact, spec)
        with self._lock:
            self._specs[id(function)] = (function, spec)
        return spec

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

    def submit(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Validate, register and submit one invocation; return its future.

        Raises:
            SubmitError: Unknown model, bad or unpicklable arguments (nothing runs).
            PoolClosedError: The client is shut down.
        """
        function.check_arguments(args, kwargs)
        model = self.resolve_model(function.model) if function.model else None
        if model is not None and "@" not in (function.model or ""):
            model = self.pool.prefer_warm(model)  # an alias moved: warm the new version first
        blob, refs = stage_args(self.store, args, kwargs, self.staging_threshold, what=repr(function.name))
        spec = self.register(function)
        return self.submit_spec(spec, model, blob, refs)

    def submit_spec(
        self,
        spec: FunctionSpec,
        model: ModelSpec | None,
        blob: bytes,
        refs: tuple[StagedRef, ...] = (),
        *,
        output: OutputTarget | None = None,
    ) -> Future[Any]:
        """Submit a registered function version with already serialised (or staged) arguments.

        This is what ``submit`` does after validation, what ``faas replay``
        uses to run an invocation again with its stored inputs, and what a
        trigger runner uses (with ``output``: the worker writes the output).
        """
        invocation = spec.invocation(
            blob,
            model=model.ref if model else None,
            store=self._store_config,
            stage_threshold=self.staging_threshold,
            refs=refs,
            output=output,
        )
        future: Future[Any] = Future(invocation.id, self.cancel, self._phase, self._load_value)
        pool = self.pool
        self._record(invocation)

        def done(result: Result) -> None:
            try:
                prov = build_provenance(invocation, spec, model, result)
                result.provenance = prov.model_dump(mode="json")
            except Exception:  # provenance must never cost the result
                log.exception("Could not build the provenance of invocation %s", result.invocation_id)
            try:
                self._record(result)
            except Exception:  # a record that cannot be queued must not lose the result
                log.exception("Could not record the result of invocation %s", result.invocation_id)
            future._resolve(result)

        try:
            pool.submit(invocation, spec, model, done)
        except Exception as exc:
            failed = error_info(exc, "cancelled", with_traceback=False)
            done(Result(invocation_id=invocation.id, error=failed, finished_at=time.time()))
            raise
        return future

    def _record(self, item: Invocation | Result) -> None:
        if self._recorder is not None and isinstance(item, Invocation):
            self._recorder.request(item)
        elif self._recorder is not None and isinstance(item, Result):
            self._recorder.result(item)
        elif self._records_mode == "sync" and isinstance(item, Invocation):
            self.records.write_request(item)
        elif self._records_mode == "sync" and isinstance(item, Result):
            self.records.write_result(item)

    def _load_value(self, data: bytes) -> Any:
        return unstage_value(self.store, data, what="result")

    def put(self, obj: Any) -> Ref:
        """Upload ``obj`` to the store once and return a reference to pass to invocations.

        The object is content-addressed: putting the same value again uploads
        nothing. A function receiving the reference (anywhere in its
        arguments) receives the value itself.

        Raises:
            SerializationError: ``obj`` cannot be pickled.
            StoreError: The upload failed.
        """
        return Ref(stage_object(self.store, obj, what="value passed to faas.put"))

    def record(self, invocation_id: str, *, timeout: float | None = 30.0) -> InvocationRecord:
        """The invocation's record from the store (request merged with result, if any).

        Records queued by this client are written first.

        Raises:
            ObjectNotFound: Nothing is recorded under that id.
        """
        self.flush_records(timeout)
        return self.records.get(invocation_id)

    def flush_records(self, timeout: float | None = None) -> None:
        """Wait until every invocation record this client queued is in the store.

        Raises:
            StoreError: Records are still unwritten when ``timeout`` runs out.
        """
        if self._recorder is not None:
            self._recorder.flush(timeout)

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
        if self._recorder is not None:
            try:
                self._recorder.close()
            except Exception as exc:
                log.error("Some invocation records could not be written: %s", exc)

    # -- parity with faas.RemoteClient -------------------------------------------------------
    def submit_many(
        self, function: Function[Any], calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
    ) -> list[Future[Any]]:
        """Submit one invocation per ``(args, kwargs)``; futures in input order.

        Every call's arguments are checked before anything is submitted. If a
        submit fails part way, the invocations already submitted are cancelled
        and the error is raised.
        """
        return submit_each(self.submit, function, calls)

    def call(
        self,
        function: Function[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any:
        """Run one invocation and return its value (what ``.remote`` does).

        Raises:
            TimeoutError: Not done within ``timeout`` seconds (it keeps running).
        """
        return self.submit(function, args, kwargs).result(timeout)

    def attach(self, invocation_id: str) -> Future[Any]:
        """A future for an invocation recorded in this client's store, by id.

        If its result is recorded, the future is resolved at once; otherwise a
        daemon thread reads the store, with backoff, until the result appears
        (this needs ``records`` other than ``"off"`` in the submitting client).

        Raises:
            NotFoundError: Nothing is recorded under that id and this client's pool does not know it.
        """
        future: Future[Any] = Future(invocation_id, self.cancel, self._phase, self._load_value)
        with contextlib.suppress(StoreError):
            self.flush_records(5.0)
        result = self._stored_result(invocation_id)
        if result is not None:
            future._resolve(result)
            return future
        if self.records.request(invocation_id) is None and self._phase(invocation_id) is None:
            raise NotFoundError(
                f"No invocation {invocation_id!r} is recorded in {self.store.url()}; check the id "
                "and that this client uses the store the invocation was submitted to.",
                404,
            )
        threading.Thread(target=self._poll_result, args=(future,), name="faas-attach", daemon=True).start()
        return future

    def _stored_result(self, invocation_id: str) -> Result | None:
        record = self.records.result(invocation_id)
        if record is None:
            return None
        return Result(
            invocation_id=invocation_id,
            value=None if record.value is None else record.value.to_wire(),
            error=record.error,
            worker_pid=record.worker_pid,
            worker_host=record.worker_host,
            started_at=record.started_at,
            finished_at=record.finished_at,
            attempt=record.attempt,
            provenance=record.provenance,
            logs=str(getattr(record, "logs", "") or ""),
        )

    def _poll_result(self, future: Future[Any]) -> None:
        delay = 0.05
        while not future.done():
            if self._closed:
                if not future.done():
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

    def invocation(self, invocation_id: str) -> InvocationRecord:
        """The invocation's record (request merged with result, if any).

        Raises:
            NotFoundError: Nothing is recorded under that id.
        """
        try:
            return self.record(invocation_id)
        except ObjectNotFound as exc:
            raise NotFoundError(str(exc), 404) from None

    def logs(self, invocation_id: str) -> str:
        """What the invocation wrote to stdout and stderr (empty until it has finished).

        Raises:
            NotFoundError: Nothing is recorded under that id.
        """
        record = self.invocation(invocation_id)
        return str(getattr(record, "logs", "") or "")

    def list_functions(self) -> list[FunctionSpec]:
        """The latest version of each registered function."""
        return self.registry.list_functions()

    def list_models(self) -> list[ModelSpec]:
        """The registered models."""
        return self.registry.list_models()

    def pool_status(self) -> dict[str, Any]:
        """Same as :meth:`status` (the remote client's name for it)."""
        return self.status()


def _threshold(value: int | str | None) -> int:
    try:
        return staging_threshold(value)
    except ValueError as exc:
        from runtime._errors import SubmitError

        raise SubmitError(str(exc)) from None


AnyClient = Union["Client", RemoteClient, GlobusComputeCloudClient]
"""What ``faas.get_client()`` may return: embedded, a ``faas serve`` service, or Globus Compute cloud."""


def put(obj: Any, *, client: AnyClient | None = None) -> Ref:
    """Upload ``obj`` once and return a :class:`faas.Ref` to pass to many invocations.

    Args:
        obj: Any picklable value (``bytes`` are stored as they are).
        client: The client whose store to use (default: the default client's).
    """
    return (client or get_client()).put(obj)


_default: AnyClient | None = None
_default_lock = threading.Lock()


def get_client() -> AnyClient:
    """The process-wide default client, created on first use.

    It is a :class:`RemoteClient` of the service named by ``$FAAS_URL`` (with
    ``$FAAS_TOKEN``) when that is set; else a :class:`GlobusComputeCloudClient`
    when ``$FAAS_GC_ENDPOINT`` names a Globus Compute endpoint; else an
    embedded :class:`Client`.
    """
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            url = os.environ.get("FAAS_URL")
            if url:
                _default = RemoteClient(url)
            elif os.environ.get(ENDPOINT_ENV):
                _default = GlobusComputeCloudClient.from_env()
            else:
                _default = Client()
        return _default


def configure(**options: Any) -> AnyClient:
    """Replace the default client with one built from ``options``.

    With ``url=...`` (and optionally ``token=``, ``timeout=``) it builds a
    :class:`RemoteClient` of that service; otherwise an embedded
    :class:`Client` (see its arguments).
    """
    global _default
    url = options.pop("url", None)
    new: AnyClient = RemoteClient(url, **options) if url else Client(**options)
    with _default_lock:
        old, _default = _default, new
    if old is not None:
        old.shutdown()
    return new


def shutdown() -> None:
    """Shut down the default client's pool, if one was started."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.shutdown()


atexit.register(shutdown)
