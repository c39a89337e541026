"""Trigger bindings run inside ``faas serve``: one trigger runner per tenant, submitting through the core.

:class:`TriggerHost` is the service's pluggable trigger part. Once the core
has started (and replayed its index), the host starts a
:class:`faas.triggers.TriggerRunner` for every tenant that has bindings in its
scoped store (``tenants/<name>/registry/triggers/``), and for a tenant's first
binding as soon as it is made (``POST /v1/triggers``, which is what
``fn.on_object`` does through a :class:`faas.RemoteClient`). Each runner is the
same runner as ``faas triggers run``; only its submitter differs:
:class:`CoreSubmitter` submits through :meth:`ServiceCore.submit`, so tenants'
quotas and the durable index apply to trigger invocations as to any other.

Exactly once across a SIGKILL of the service: a runner's id is stable across
restarts of the same service (host and state directory), and every attempt's
invocation id is derived from the tenant, binding, object version and attempt
number. After a restart, the runner finds its own claims without done markers
and resumes them at the same attempt; the submitter finds the invocation the
index replayed (or finished) under that id and waits for it, and submits only
attempts the index never accepted. The worker writes each output inside its
invocation, commit-once, so a replayed invocation does not write it twice.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import socket
import threading
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from faas.service._api import BindRequest, Item, ResultView
from faas.service._tenant import Tenant
from faas.triggers._binding import create_binding
from faas.triggers._runner import TriggerRunner
from faas.triggers._submit import AttemptFailed, AttemptFuture
from registry import Bindings, TriggerBinding
from runtime import (
    REPORT_STATES,
    BindingError,
    NotFoundError,
    ObjectStore,
    OutputTarget,
    SerializationError,
    SubmitError,
    is_marker,
    loads_data,
    parse_marker,
    scoped_store,
)

if TYPE_CHECKING:
    from faas.service._core import ServiceCore

log = logging.getLogger("faas.service")


class TriggerItem(Item):
    """One trigger attempt for :meth:`ServiceCore.submit`: its arguments, id and output target.

    Built only by :class:`CoreSubmitter`; HTTP requests carry plain items.
    """

    invocation_id: str
    output: OutputTarget


def trigger_fields(item: Item, invocation_id: str | None = None) -> dict[str, Any]:
    """The invocation fields an item presets: a trigger attempt's id and outputs, or a chosen id."""
    fields: dict[str, Any] = {}
    if isinstance(item, TriggerItem):
        fields = {"id": item.invocation_id, "output": item.output}
    if invocation_id is not None:
        fields["id"] = invocation_id
    return fields


class CoreSubmitter:
    """Submits one tenant's trigger attempts through the service core.

    Args:
        core: The service core.
        tenant: Whose attempts these are (its quotas apply).
        store: The tenant's store view (for a report staged by reference).
    """

    def __init__(self, core: ServiceCore, tenant: Tenant, store: ObjectStore) -> None:
        self.core, self.tenant, self.store = core, tenant, store

    def invocation_id(self, attempt: str) -> str:
        """The invocation id of an attempt: the same after a restart, unique across tenants."""
        return hashlib.sha256(f"trigger|{self.tenant.name}|{attempt}".encode()).hexdigest()[:32]

    def submit(
        self, binding: TriggerBinding, args: bytes, *, attempt: str, output: OutputTarget
    ) -> concurrent.futures.Future[Any]:
        """Start an attempt, or find the one the index holds (see ``faas.triggers._submit.Submitter``)."""
        invocation_id = self.invocation_id(attempt)
        future = AttemptFuture(invocation_id)
        listener = functools.partial(self._settle, future)
        try:  # accepted before a restart: replayed by the index, or finished
            finished = self.core.listen(self.tenant, [invocation_id], listener)
        except NotFoundError:
            item = TriggerItem(args=args, invocation_id=invocation_id, output=output)
            try:
                self.core.submit(self.tenant, binding.function_digest, [item])
            except NotFoundError as exc:
                raise SubmitError(
                    f"Binding {binding.name!r} runs function {binding.function_digest[:12]}..., which tenant "
                    f"{self.tenant.name!r} has not registered: {exc}"
                ) from None
            finished = self.core.listen(self.tenant, [invocation_id], listener)
        for view in finished:
            self._settle(future, view)
        return future

    def _settle(self, future: concurrent.futures.Future[Any], view: ResultView) -> None:
        if future.done():
            return
        if view.status != "succeeded":
            error = view.error
            future.set_exception(
                AttemptFailed(
                    error.type_name if error else "InvocationFailed",
                    error.message if error else f"The invocation {view.status} without a reason.",
                    error.traceback if error else "",
                )
            )
            return
        try:
            future.set_result(self._report(view.value or b""))
        except Exception as exc:  # a report that is not one: the attempt failed
            future.set_exception(AttemptFailed(type(exc).__name__, str(exc)))

    def _report(self, data: bytes) -> dict[str, Any]:
        # Read as plain data only: a function sharing the worker could forge the report.
        if is_marker(data):
            ref = parse_marker(data)
            data = self.store.get(ref.key, sha256=ref.sha256)
        report = loads_data(data, what="trigger report")
        if not isinstance(report, dict) or report.get("state") not in REPORT_STATES:
            raise SerializationError(f"The worker's trigger report is malformed: {str(report)[:200]}")
        return report


class TriggerHost:
    """Runs the trigger bindings of a service's tenants: one runner per tenant with bindings.

    Args:
        scan_interval: Seconds between looks for tenants whose first binding was
            stored without the API (e.g. ``faas triggers add`` on the store).
        stop_timeout: Seconds :meth:`stop` waits for each runner's thread.
        runner_options: Passed to every :class:`TriggerRunner` (intervals, threads).
    """

    def __init__(
        self, *, scan_interval: float = 5.0, stop_timeout: float = 10.0, **runner_options: Any
    ) -> None:
        self.scan_interval, self.stop_timeout = scan_interval, stop_timeout
        self.runner_options = runner_options
        self._core: ServiceCore | None = None
        self._runners: dict[str, TriggerRunner] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runner_id = ""

    def start(self, core: ServiceCore) -> None:
        """Start runners for the tenants that have bindings, and the scan for new ones."""
        self._core = core
        # Stable across restarts of this service: it resumes its own claims instead of waiting out a lease.
        where = f"{socket.gethostname()}|{core.index.path.resolve()}"
        self._runner_id = f"serve-{socket.gethostname()}-{hashlib.sha256(where.encode()).hexdigest()[:10]}"
        self.scan()
        self._thread = threading.Thread(target=self._scan_loop, name="faas-trigger-host", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every runner; their claims stay held, and the index replays what was in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout)
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            try:
                runner.stop(self.stop_timeout, drain=0.0, release=False)
            except Exception:
                log.exception("Stopping trigger runner %s failed", runner.id)

    def scan(self) -> None:
        """Start a runner for every tenant that has bindings and none yet."""
        for tenant in self._require_core().auth.tenants():
            if tenant.name in self._runners:
                continue
            try:
                if Bindings(self._store(tenant)).list():
                    self._runner(tenant)
            except Exception as exc:  # one tenant's broken binding must not stop the others'
                log.warning("Could not start the trigger runner of tenant %s: %s", tenant.name, exc)

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.scan_interval):
            self.scan()

    def runner(self, tenant: str) -> TriggerRunner | None:
        """The running runner of ``tenant``, if it has one."""
        with self._lock:
            return self._runners.get(tenant)

    def _runner(self, tenant: Tenant) -> TriggerRunner:
        core = self._require_core()
        with self._lock:
            runner = self._runners.get(tenant.name)
            if runner is None and not self._stop.is_set():
                store = self._store(tenant)
                runner = TriggerRunner(
                    store=store,
                    submitter=CoreSubmitter(core, tenant, store),
                    runner_id=self._runner_id,
                    **self.runner_options,
                ).start()
                self._runners[tenant.name] = runner
                log.info("Running the trigger bindings of tenant %s: %s", tenant.name, runner.binding_names())
        if runner is None:
            raise BindingError("The service is shutting down; bind again once it is back.")
        return runner

    def _store(self, tenant: Tenant) -> ObjectStore:
        return scoped_store(self._require_core().store, tenant.prefix)

    def _require_core(self) -> ServiceCore:
        if self._core is None:
            raise RuntimeError("The trigger host has not been started.")
        return self._core

    # -- the API -------------------------------------------------------------------------
    def bind(self, tenant: Tenant, req: BindRequest) -> TriggerBinding:
        """Store a binding of one of the tenant's functions and start running it.

        Raises:
            NotFoundError: The tenant has no such function.
            BindingError: The binding is malformed (nothing is stored).
        """
        core = self._require_core()
        spec = core.function(tenant, req.function)
        store = self._store(tenant)
        _check_directories(store, req.options)
        binding = create_binding(store, spec, name=req.name, reprocess=req.reprocess, **req.options)
        self._runner(tenant).reload_soon()
        return binding

    def bindings(self, tenant: Tenant) -> list[TriggerBinding]:
        """The tenant's bindings."""
        return Bindings(self._store(tenant)).list()


def _check_directories(store: ObjectStore, options: dict[str, Any]) -> None:
    """A tenant's directory buckets must lie inside its part of a file store (never the service's disk)."""
    store_kind = store.config()["kind"]
    if (options.get("storage") or store_kind) != "file":
        return
    if store_kind != "file":
        raise BindingError(
            "The service's store is not a directory, so it runs no directory bindings (storage='file'); "
            "bind an S3 bucket on the store's endpoint."
        )
    for field in ("bucket", "output_bucket"):
        value = options.get(field)
        path = PurePosixPath(value) if isinstance(value, str) else None
        if path is not None and (path.is_absolute() or ".." in path.parts):
            raise BindingError(
                f"The service runs directory bindings inside the tenant's part of its store: {field} "
                f"{value!r} must be a relative path without '..'."
            )
