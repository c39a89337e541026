"""What the three clients do the same way, written once and mixed in.

:class:`ClientBase` holds the plumbing every client shares: the ``with``
block, registering each function once, ``submit_many`` (every call checked
before anything is sent, the sent ones cancelled if a later send fails),
``call``, ``put`` and reading result values back from the store.

:class:`RecordingClient` adds the life of an invocation for the clients that
keep it in this process (the embedded client and the Globus Compute cloud
client): building the invocation, recording its request and result in the
store, provenance, failure results, and reading records back for ``attach``,
``logs`` and the registry listings. The remote client leaves all of that to
the service.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

from faas._future import Future
from faas._usage import usage_key, usage_row, write_usage
from faas.clients._protocol import Calls
from registry import Registry
from runtime import (
    ErrorKind,
    FaasError,
    Invocation,
    InvocationRecord,
    NotFoundError,
    ObjectNotFound,
    OutputTarget,
    PoolClosedError,
    Priority,
    RecordStore,
    RecordWriter,
    Ref,
    Result,
    StagedRef,
    UnsupportedOperationError,
    error_info,
    stage_args,
    stage_object,
    unstage_value,
)
from warmpool import ensure_provenance

if TYPE_CHECKING:
    from typing import Self

    from faas._function import Function
    from registry import FunctionSpec, ModelSpec
    from runtime import Model, ObjectStore

log = logging.getLogger("faas.client")

RecordsMode = Literal["async", "sync", "off"]
LOCAL_TENANT = "default"
"""The tenant name of usage rows written by the clients that keep their own records."""


class ClientBase(ABC):
    """The plumbing shared by every client (see the module docstring).

    Subclasses set ``store`` (an attribute or a property) and implement
    :meth:`submit`, :meth:`cancel`, :meth:`status`, :meth:`shutdown` and
    :meth:`_register_new`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[int, tuple[Function[Any], FunctionSpec]] = {}
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- what each client does its own way ----------------------------------------------------
    @property
    @abstractmethod
    def store(self) -> ObjectStore:
        """Where large arguments, results and ``put`` objects live."""

    @abstractmethod
    def submit(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Validate, register and start one invocation; return its future."""

    @abstractmethod
    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation by id."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Where this client sends work and its counters."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the client."""

    @abstractmethod
    def _register_new(self, function: Function[Any]) -> FunctionSpec:
        """Register a function this client has not registered yet."""

    # -- shared -------------------------------------------------------------------------------
    def register(self, function: Function[Any]) -> FunctionSpec:
        """Register ``function`` (once per client) and return its spec.

        Raises:
            SerializationError: The function cannot be pickled.
            SubmitError: The registry (or the service) refused it.
        """
        function = function.origin  # a with_options() copy is its decorated function, registered once
        with self._lock:
            cached = self._specs.get(id(function))
            if cached is not None and cached[0] is function:
                return cached[1]
        spec = self._register_new(function)
        with self._lock:
            self._specs[id(function)] = (function, spec)
        return spec

    def submit_many(self, function: Function[Any], calls: Calls) -> list[Future[Any]]:
        """Submit one invocation per ``(args, kwargs)``; futures in input order.

        Every call's arguments are checked before anything is submitted. If a
        submit fails part way, the invocations already submitted are cancelled
        and the error is raised.
        """
        calls = list(calls)
        for args, kwargs in calls:
            function.check_arguments(args, kwargs)
        futures: list[Future[Any]] = []
        try:
            self._submit_checked(function, calls, futures)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def _submit_checked(self, function: Function[Any], calls: Calls, futures: list[Future[Any]]) -> None:
        """Submit calls whose arguments were checked, appending each future as it is made."""
        for args, kwargs in calls:
            futures.append(self.submit(function, args, kwargs))

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
            Exception: The invocation's error, or a submit error as for :meth:`submit`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self._start_call(function, args, kwargs, deadline)
        return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _start_call(
        self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float | None
    ) -> Future[Any]:
        """Start the invocation ``call`` waits for (``deadline`` on the monotonic clock)."""
        return self.submit(function, args, kwargs)

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

    def model_handle(self, ref: str) -> Model:
        """A handle on an engine of model ``ref`` in this process's reach (what ``Function.local`` uses).

        Raises:
            UnsupportedOperationError: This client's engines are out of reach
                (the embedded client overrides this).
        """
        raise self._unsupported(
            "model_handle",
            f"Function.local() with model {ref!r} needs an engine in reach, but {self._engines_elsewhere()}.",
        )

    def _engines_elsewhere(self) -> str:
        """Where this client's engines are, and what to do instead of ``Function.local``."""
        return "this client's engines are not in reach of this process; use .remote()"

    def pool_status(self) -> dict[str, Any]:
        """Same as :meth:`status` (an older name)."""
        return self.status()

    def _unsupported(self, operation: str, reason: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(type(self).__name__, operation, reason)

    def _future(self, invocation_id: str | None) -> Future[Any]:
        return Future(invocation_id, self._cancel_future, self._phase, self._load_value)

    def _cancel_future(self, invocation_id: str) -> bool:
        """What ``Future.cancel`` calls."""
        return self.cancel(invocation_id)

    def _phase(self, invocation_id: str) -> str | None:
        """Where an unfinished invocation is (``Future.status``); None when this client cannot tell."""
        return None

    def _load_value(self, data: bytes) -> Any:
        return unstage_value(self.store, data, what="result")


class RecordingClient(ClientBase):
    """A client that runs an invocation's life in this process and records it in the store.

    Subclasses call :meth:`_init_records`, and implement :meth:`_model_for`
    (resolve the function's model) and :meth:`_dispatch` (hand one recorded
    invocation to where it runs, which later calls :meth:`_finish`).
    """

    CLOSED_MESSAGE = "This faas client has been shut down."

    staging_threshold: int
    """Arguments and results above this many bytes travel through the store by reference."""

    def _init_records(self, store: ObjectStore, mode: RecordsMode) -> None:
        self._object_store = store
        self.registry = Registry(store)
        self.records = RecordStore(store)
        self._records_mode: RecordsMode = mode
        self._recorder = RecordWriter(self.records) if mode == "async" else None
        self._store_config = store.config()

    @property
    def store(self) -> ObjectStore:
        """The store of this client's registry, records and staged values."""
        return self._object_store

    @abstractmethod
    def _model_for(self, ref: str | None) -> ModelSpec | None:
        """The model version an invocation naming model ``ref`` runs against (None for none).

        Raises:
            UnknownModelError: No such model.
        """

    @abstractmethod
    def _dispatch(
        self, invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, future: Future[Any]
    ) -> None:
        """Send a recorded invocation on; raises if it cannot be sent (its future then fails)."""

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Validate, stage, register and send one invocation; return its future.

        Raises:
            SubmitError: Unknown model, bad or unpicklable arguments (nothing runs).
            PoolClosedError: The client is shut down.
        """
        self._check_open()
        function.check_arguments(args, kwargs)
        model = self._model_for(function.model)
        blob, refs = stage_args(self.store, args, kwargs, self.staging_threshold, what=repr(function.name))
        spec = self.register(function)
        return self.submit_spec(spec, model, blob, refs, priority=function.priority)

    def submit_by_name(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Submit an already registered function by reference (``name``, ``name@version`` or a digest).

        The arguments are not checked here (this process may not have the
        function); a call that does not fit fails when it runs.

        Raises:
            UnknownFunctionError: No function is registered under ``name``.
            UnknownModelError: The function's model is not registered.
        """
        self._check_open()
        spec = self.registry.get_function(name)
        model = self._model_for(spec.model)
        blob, refs = stage_args(self.store, args, kwargs, self.staging_threshold, what=repr(spec.name))
        return self.submit_spec(spec, model, blob, refs)

    def submit_spec(
        self,
        spec: FunctionSpec,
        model: ModelSpec | None,
        blob: bytes,
        refs: tuple[StagedRef, ...] = (),
        *,
        output: OutputTarget | None = None,
        priority: Priority | None = None,
    ) -> Future[Any]:
        """Submit a registered function version with already serialised (or staged) arguments.

        This is what ``submit`` does after validation, what ``faas replay``
        uses to run an invocation again with its stored inputs, and what a
        trigger runner uses (with ``output``: the worker writes the output).
        ``priority`` overrides the spec's for this call.
        """
        self._check_open()
        invocation = spec.invocation(
            blob,
            model=model.ref if model else None,
            store=self._store_config,
            stage_threshold=self.staging_threshold,
            refs=refs,
            output=output,
            priority=priority,
            adapters=self.registry.adapters.snapshot(model.ref) if model else None,
        )
        future = self._future(invocation.id)
        self._record(invocation)
        try:
            self._dispatch(invocation, spec, model, future)
        except BaseException as exc:
            self._finish(future, invocation, spec, model, failed_result(invocation, exc, "cancelled"))
            raise
        return future

    def _finish(
        self,
        future: Future[Any],
        invocation: Invocation,
        spec: FunctionSpec,
        model: ModelSpec | None,
        result: Result,
        *,
        record: bool = True,
    ) -> None:
        """Complete an invocation: provenance and result record (unless not ``record``), then the future."""
        if record:
            ensure_provenance(invocation, spec, model, result)  # the pool's book built it, the cloud did not
            try:
                self._record(result)
            except Exception:  # a record that cannot be queued must not lose the result
                log.exception("Could not record the result of invocation %s", result.invocation_id)
            try:
                self._record_usage(invocation, spec, model, result)
            except Exception:  # nor must its usage row
                log.exception("Could not record the usage of invocation %s", result.invocation_id)
        future._resolve(result)

    def _record_usage(
        self, invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, result: Result
    ) -> None:
        """Write the invocation's usage row (``usage/<day>/<hour>/<id>.json``) after its result record."""
        if self._records_mode == "off":
            return
        row = usage_row(invocation, spec, model, result, LOCAL_TENANT)
        if self._recorder is not None:
            self._recorder.put_once(row.invocation_id, usage_key(row), row.model_dump_json().encode())
        else:
            write_usage(self.store, row)

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError(self.CLOSED_MESSAGE)

    # -- records ------------------------------------------------------------------------------
    def _register_new(self, function: Function[Any]) -> FunctionSpec:
        artifact, spec = function.bundle()
        return self.registry.register_function(artifact, spec)

    def _record(self, item: Invocation | Result) -> None:
        if isinstance(item, Invocation):
            if self._recorder is not None:
                self._recorder.request(item)
            elif self._records_mode == "sync":
                self.records.write_request(item)
        elif self._recorder is not None:
            self._recorder.result(item)
        elif self._records_mode == "sync":
            self.records.write_result(item)

    def flush_records(self, timeout: float | None = None) -> None:
        """Wait until every invocation record this client queued is in the store.

        Raises:
            StoreError: Records are still unwritten when ``timeout`` runs out.
        """
        if self._recorder is not None:
            self._recorder.flush(timeout)

    def _close_recorder(self) -> None:
        if self._recorder is not None:
            try:
                self._recorder.close()
            except FaasError as exc:
                log.error("Some invocation records could not be written: %s", exc)

    def record(self, invocation_id: str, *, timeout: float | None = 30.0) -> InvocationRecord:
        """The invocation's record from the store (request merged with result, if any).

        Records queued by this client are written first.

        Raises:
            ObjectNotFound: Nothing is recorded under that id.
        """
        self.flush_records(timeout)
        return self.records.get(invocation_id)

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
        return self.invocation(invocation_id).logs

    def list_functions(self) -> list[FunctionSpec]:
        """The latest version of each function registered in the store."""
        return self.registry.list_functions()

    def list_models(self) -> list[ModelSpec]:
        """The models registered in the store."""
        return self.registry.list_models()

    def _stored_result(self, invocation_id: str) -> Result | None:
        record = self.records.result(invocation_id)
        return None if record is None else record.to_result()

    def _attach_recorded(self, invocation_id: str) -> Future[Any] | None:
        """A resolved future for an invocation whose result is recorded; None if it has none yet."""
        with contextlib.suppress(FaasError):  # a slow store: read what is there
            self.flush_records(5.0)
        result = self._stored_result(invocation_id)
        if result is None:
            return None
        future = self._future(invocation_id)
        future._resolve(result)
        return future

    def _not_recorded(self, invocation_id: str) -> NotFoundError:
        return NotFoundError(
            f"No invocation {invocation_id!r} is recorded in {self.store.url()}; check the id and that "
            "this client uses the store the invocation was submitted to.",
            404,
        )


def failed_result(invocation: Invocation, exc: BaseException, kind: ErrorKind) -> Result:
    """The Result of an invocation that ended with ``exc`` outside the function (no traceback)."""
    return Result(
        invocation_id=invocation.id,
        error=error_info(exc, kind, with_traceback=False),
        attempt=invocation.attempt,
        finished_at=time.time(),
    )
