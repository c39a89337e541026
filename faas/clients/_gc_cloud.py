"""``GlobusComputeCloudClient``: invocations sent through the Globus Compute cloud to a remote endpoint.

The optional backend for users outside the cluster: ``.submit`` hands each
invocation to the Globus Compute SDK ``Executor``, which sends it through the
Globus Compute web service to an endpoint, where a worker runs
:func:`run_cloud_invocation` (and through it :func:`warmpool.globus_compute.task.run_invocation`,
the same runtime the cluster substrate uses) against the node's engine.

What crosses the cloud is small: the task names :func:`run_cloud_invocation` by
reference and carries only the Invocation JSON and a dispatch dict. The
function artifact is registered in the object store's registry and loaded on
the endpoint by digest; arguments and results above the staging threshold go
through the same S3 store by reference, so the store must be S3 that both
sides can reach. Tested only up to the SDK boundary: docs/globus-compute-cloud.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from faas._future import Future
from faas.clients._base import RecordingClient, failed_result
from registry import FunctionSpec, ModelSpec
from runtime import (
    GlobusComputeConfigError,
    Invocation,
    InvocationError,
    ObjectStore,
    PoolClosedError,
    Result,
    store_from_url,
)
from runtime import staging_threshold as _threshold
from warmpool.globus_compute.task import run_invocation

if TYPE_CHECKING:
    import concurrent.futures


log = logging.getLogger("faas.gc_cloud")

ENDPOINT_ENV = "FAAS_GC_ENDPOINT"
"""The environment variable naming the Globus Compute endpoint id."""

CREDENTIAL_ENVS = ("GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET")
"""The SDK's own app-credential variables (both or neither)."""


class SdkExecutor(Protocol):
    """What this client needs of ``globus_compute_sdk.Executor``."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the endpoint; the future gets its return value."""
        ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting (and, with ``cancel_futures``, drop tasks not yet sent)."""
        ...


ExecutorFactory = Callable[[str], SdkExecutor]
"""Builds the SDK executor for an endpoint id."""


def default_executor_factory(endpoint_id: str) -> SdkExecutor:
    """A ``globus_compute_sdk.Executor`` for ``endpoint_id``, authenticated as the SDK decides.

    With ``GLOBUS_COMPUTE_CLIENT_ID`` and ``GLOBUS_COMPUTE_CLIENT_SECRET`` set it acts
    as that client identity; otherwise it uses an earlier interactive login's tokens.

    Raises:
        GlobusComputeConfigError: The Globus Compute SDK is not installed.
    """
    try:
        from globus_compute_sdk import Executor
    except ImportError:
        raise GlobusComputeConfigError(
            "The Globus Compute cloud backend needs the Globus Compute SDK, which is not installed; "
            "install it with: pip install 'tpm-faas[globus]'."
        ) from None
    return Executor(endpoint_id=endpoint_id)


def run_cloud_invocation(invocation_json: str, dispatch_json: str) -> str:
    """The task a Globus Compute endpoint runs for one invocation; returns the Result as JSON.

    Sent by reference (module and name): the endpoint must have tpm-faas
    installed. The deadline counts from the task's start on the endpoint (cloud
    queueing and clock skew do not count). The rest is
    :func:`warmpool.globus_compute.task.run_invocation`: the function comes from the
    store by digest, the model is the engine at the worker's ``FAAS_ENGINE_URL``.

    Args:
        invocation_json: The :class:`runtime.Invocation` as JSON.
        dispatch_json: As for ``run_invocation``, with ``timeout`` (seconds)
            in place of an absolute deadline.
    """
    dispatch: dict[str, Any] = json.loads(dispatch_json)
    timeout = dispatch.pop("timeout", None)
    dispatch["deadline"] = None if timeout is None else time.time() + float(timeout)
    dispatch["invocation"] = json.loads(invocation_json)
    return run_invocation(json.dumps(dispatch))


@dataclass
class _Work:
    invocation: Invocation
    spec: FunctionSpec
    model: ModelSpec | None
    future: Future[Any]
    dispatch: str
    task: concurrent.futures.Future[Any] | None = None
    cancel_requested: bool = False
    resends: int = 0


class GlobusComputeCloudClient(RecordingClient):
    """Submits invocations through the Globus Compute cloud to one endpoint.

    It implements the client protocol (``faas.FaasClient``)
    like :class:`faas.Client`; requests and results are recorded in the store.

    Args:
        endpoint_id: The Globus Compute endpoint's id (a UUID).
        store: The S3 store (``s3://bucket/prefix?...`` or an ObjectStore)
            that both this process and the endpoint can reach. The endpoint
            uses its own AWS credentials; the store's config (bucket, prefix,
            endpoint URL, never secrets) travels inside each invocation.
        staging_threshold: Arguments and results above this many bytes travel
            through the store by reference (default ``$FAAS_STAGING_THRESHOLD``
            or 1 MiB).
        executor_factory: Builds the SDK executor from the endpoint id, on
            first submit (default: ``globus_compute_sdk.Executor``).

    Raises:
        GlobusComputeConfigError: The endpoint id is not a UUID, the store is
            not an S3 store, or the staging threshold is not a size.
    """

    CLOSED_MESSAGE = "This Globus Compute client has been shut down."

    def __init__(
        self,
        endpoint_id: str,
        *,
        store: ObjectStore | str,
        staging_threshold: int | str | None = None,
        executor_factory: ExecutorFactory | None = None,
    ) -> None:
        super().__init__()
        self.endpoint_id = _endpoint_id(endpoint_id)
        self._init_records(_s3_store(store), "async")
        try:
            self.staging_threshold = _threshold(staging_threshold)
        except ValueError as exc:
            raise GlobusComputeConfigError(f"Bad staging threshold: {exc}") from None
        self._factory: ExecutorFactory = executor_factory or default_executor_factory
        self._executor: SdkExecutor | None = None
        self._work: dict[str, _Work] = {}
        self.counters = {"submitted": 0, "succeeded": 0, "failed": 0, "retried": 0, "executors": 0}

    @classmethod
    def from_env(cls, *, executor_factory: ExecutorFactory | None = None) -> GlobusComputeCloudClient:
        """A client configured from ``$FAAS_GC_ENDPOINT``, ``$FAAS_STORE`` and ``$FAAS_STAGING_THRESHOLD``.

        Raises:
            GlobusComputeConfigError: ``$FAAS_GC_ENDPOINT`` or ``$FAAS_STORE`` is
                unset or unusable, or only one of ``$GLOBUS_COMPUTE_CLIENT_ID``
                and ``$GLOBUS_COMPUTE_CLIENT_SECRET`` is set.
        """
        endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
        if not endpoint:
            raise GlobusComputeConfigError(
                f"${ENDPOINT_ENV} is not set: name the Globus Compute endpoint to send invocations to."
            )
        store = os.environ.get("FAAS_STORE", "").strip()
        if not store:
            raise GlobusComputeConfigError(
                "$FAAS_STORE is not set: name an s3:// store the endpoint can reach."
            )
        given = [name for name in CREDENTIAL_ENVS if os.environ.get(name)]
        if len(given) == 1:
            missing = next(name for name in CREDENTIAL_ENVS if name not in given)
            raise GlobusComputeConfigError(
                f"${given[0]} is set but ${missing} is not: set both to act as a Globus client "
                "identity, or neither to use an interactive Globus login."
            )
        return cls(endpoint, store=store, executor_factory=executor_factory)

    def __repr__(self) -> str:
        return f"<faas.GlobusComputeCloudClient endpoint={self.endpoint_id} store={self.store.url()!r}>"

    # -- functions and invocations -------------------------------------------------------------
    def _model_for(self, ref: str | None) -> ModelSpec | None:
        return self.registry.get_model(ref) if ref else None

    def _dispatch(
        self, invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, future: Future[Any]
    ) -> None:
        dispatch = {
            "store": None,  # the invocation carries it
            "model_name": model.ref if model else None,
            "model_param": spec.model_param,
            "model_param_index": spec.model_param_index,
            "model_modes": sorted(model.modes) if model else None,
            "timeout": spec.timeout,
        }
        work = _Work(invocation, spec, model, future, json.dumps(dispatch))
        with self._lock:
            self._work[invocation.id] = work
            self.counters["submitted"] += 1
        try:
            self._send(work)
        except BaseException:
            with self._lock:
                self._work.pop(invocation.id, None)
                self.counters["failed"] += 1
            raise

    def attach(self, invocation_id: str) -> Future[Any]:
        """A future for an invocation, by id: one in flight from this client, or one whose result is recorded.

        Raises:
            UnsupportedOperationError: The invocation was sent by another
                process and has no recorded result yet: following a running
                Globus Compute task needs its SDK task id, which only the
                submitting process holds.
            NotFoundError: Nothing is recorded under that id in this store.
        """
        with self._lock:
            work = self._work.get(invocation_id)
        if work is not None:
            return work.future
        future = self._attach_recorded(invocation_id)
        if future is not None:
            return future
        if self.records.request(invocation_id) is not None:
            raise self._unsupported(
                "attach",
                f"invocation {invocation_id} was sent through Globus Compute by another process and has "
                "no recorded result yet; re-attaching to a running Globus Compute task needs its SDK task "
                "id (globus_compute_sdk.Client.get_result(task_id)), which only the submitting process "
                "holds. Attach again once the submitting process has recorded the result.",
            )
        raise self._not_recorded(invocation_id)

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation the SDK has not sent yet; a task already in the cloud keeps running.

        Returns:
            Whether the SDK withdrew the task.
        """
        with self._lock:
            work = self._work.get(invocation_id)
        if work is None or work.task is None:
            return False
        work.cancel_requested = True
        return work.task.cancel()

    def _engines_elsewhere(self) -> str:
        return (
            f"this client sends invocations through Globus Compute to endpoint {self.endpoint_id}, whose "
            "engines are not reachable from here; use .remote() to run it on the endpoint"
        )

    def status(self) -> dict[str, Any]:
        """The endpoint id, the number of invocations in flight, and counters."""
        with self._lock:
            return {
                "endpoint_id": self.endpoint_id,
                "in_flight": len(self._work),
                "counters": dict(self.counters),
            }

    def shutdown(self) -> None:
        """Stop sending; futures still pending fail with PoolClosedError; records are flushed.

        Tasks already in the cloud keep running on the endpoint; their results are not recorded.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
            pending = list(self._work.values())
            self._work.clear()
        for work in pending:
            closed = PoolClosedError(
                f"The Globus Compute client was shut down before invocation {work.invocation.id} finished."
            )
            self._complete(work, failed_result(work.invocation, closed, "cancelled"), record=False)
        if executor is not None:
            try:
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception:  # the SDK's own shutdown must not cost our records
                log.exception("The Globus Compute executor did not shut down cleanly")
        self._close_recorder()

    # -- internals -----------------------------------------------------------------------------

    def _live_executor(self) -> SdkExecutor:
        """The SDK executor; a new one when the last stopped (the SDK stops one after a failed send)."""
        with self._lock:
            self._check_open()
            executor = self._executor
            if executor is not None and not getattr(executor, "_stopped", False):
                return executor
            self._executor = None
        fresh = self._factory(self.endpoint_id)
        with self._lock:
            if self._closed:
                fresh.shutdown(wait=False, cancel_futures=True)
                raise PoolClosedError(self.CLOSED_MESSAGE)
            self._executor = fresh
            self.counters["executors"] += 1
        if executor is not None:
            with contextlib.suppress(Exception):
                executor.shutdown(wait=False, cancel_futures=True)
        return fresh

    def _send(self, work: _Work) -> None:
        inv = work.invocation
        attempt = inv.attempt
        executor = self._live_executor()
        try:
            task = executor.submit(run_cloud_invocation, inv.model_dump_json(), work.dispatch)
        except RuntimeError:  # the SDK stopped this executor after a failed send: use a fresh one
            if not getattr(executor, "_stopped", False):
                raise
            task = self._live_executor().submit(run_cloud_invocation, inv.model_dump_json(), work.dispatch)
        work.task = task
        task.add_done_callback(lambda done: self._on_task_done(work, attempt, done))

    def _on_task_done(self, work: _Work, attempt: int, task: concurrent.futures.Future[Any]) -> None:
        inv = work.invocation
        if inv.attempt != attempt:
            return  # an answer for an attempt that was already retried
        if work.future.done():  # cancelled by the caller
            with self._lock:
                self._work.pop(inv.id, None)
            return
        if task.cancelled() and not (work.cancel_requested or self._closed) and work.resends < 3:
            work.resends += 1  # the SDK dropped it unsent (its executor stopped): send it again
            try:
                self._send(work)
                return
            except Exception as unsent:
                self._complete(work, failed_result(inv, unsent, "system"))
                return
        if task.cancelled():
            cancelled = InvocationError(f"Invocation {inv.id} was cancelled before Globus Compute sent it.")
            self._complete(work, failed_result(inv, cancelled, "cancelled"))
            return
        exc = task.exception()
        if exc is None:
            self._complete(work, self._result_of(inv, task.result()))
            return
        if attempt < inv.retries and not self._closed:
            work.invocation = inv.model_copy(update={"attempt": attempt + 1})
            with self._lock:
                self.counters["retried"] += 1
            log.warning("Invocation %s failed in Globus Compute (%s); retrying", inv.id, exc)
            try:
                self._send(work)
                return
            except Exception as again:
                exc = again
        lost = InvocationError(
            f"Globus Compute could not run invocation {inv.id} of {inv.function_name!r} on endpoint "
            f"{self.endpoint_id}: {type(exc).__name__}: {exc}"
        )
        self._complete(work, failed_result(inv, lost, "worker_lost"))

    def _result_of(self, inv: Invocation, raw: Any) -> Result:
        try:
            if isinstance(raw, Result):
                result = raw
            elif isinstance(raw, str | bytes):
                result = Result.model_validate_json(raw)
            else:
                raise TypeError(f"a {type(raw).__name__}, not the Result JSON")
            if result.invocation_id != inv.id:
                raise ValueError(f"the Result of invocation {result.invocation_id}")
        except (TypeError, ValueError) as exc:
            bad = InvocationError(
                f"The endpoint {self.endpoint_id} answered invocation {inv.id} with {exc}; is the same "
                "tpm-faas version installed there?"
            )
            return failed_result(inv, bad, "system")
        return result

    def _complete(self, work: _Work, result: Result, *, record: bool = True) -> None:
        with self._lock:
            self._work.pop(work.invocation.id, None)
            self.counters["succeeded" if result.ok else "failed"] += 1
        record = record and not self._closed  # after shutdown the recorder is closed
        self._finish(work.future, work.invocation, work.spec, work.model, result, record=record)


def _endpoint_id(value: str) -> str:
    try:
        return str(uuid.UUID(str(value).strip()))
    except ValueError:
        raise GlobusComputeConfigError(
            f"The Globus Compute endpoint id {value!r} is not a UUID; use the id that "
            "'globus-compute-endpoint list' shows for the endpoint."
        ) from None


def _s3_store(store: ObjectStore | str) -> ObjectStore:
    url = store if isinstance(store, str) else store.url()
    if not url.startswith("s3://") or (not isinstance(store, str) and store.config().get("kind") != "s3"):
        raise GlobusComputeConfigError(
            f"The Globus Compute backend needs an s3:// store that the endpoint can reach, not {url!r}: "
            "a remote endpoint cannot read this machine's files. Set FAAS_STORE to an s3:// URL."
        )
    if not isinstance(store, str):
        return store
    try:
        return store_from_url(store)
    except ValueError as exc:
        raise GlobusComputeConfigError(f"The Globus Compute backend cannot open its store: {exc}") from None
