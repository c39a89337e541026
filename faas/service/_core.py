"""The pool service's core: tenants, admission, durable invocation state, results.

The HTTP layer (:mod:`faas.service._app`) is a thin skin over this class (no web code here).

One shared substrate (the local :class:`warmpool.Pool`, or a Globus Compute pool whose
engines live on cluster blocks) runs every tenant's invocations; each tenant has its own view of the
store (``tenants/<name>/``: functions, records, staged values), its own queue
in front of the pool and its quotas: at most ``max_inflight`` of its
invocations are in the pool at once, at most ``max_queued`` wait behind them.

Durability, in order: an accepted invocation is committed to the SQLite index
before ``submit`` answers; its request record goes to the store in the
background; its result record is committed (commit-once) before the index
marks it finished and before anyone is told. A restart replays the index: an
unfinished invocation whose result record exists is marked finished, the
others run again under the same id. Because the result record is commit-once,
a rerun can never produce a second result.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from faas.openai import RESERVED_PREFIX
from faas.service._api import (
    FINAL_STATES,
    BatchView,
    CancelView,
    InvocationView,
    Item,
    RegisterFunction,
    ResultView,
    SessionInfo,
)
from faas.service._audit import AuditedModels, AuditLog
from faas.service._auth import Authenticator
from faas.service._commit import ResultCommitter
from faas.service._index import Index, Row
from faas.service._ledger import MINUTE, Ledger
from faas.service._shares import Shares, SharingRegistry
from faas.service._state import (
    Pending,
    RecentResults,
    TenantState,
    check_refs,
    digest,
    plausible_id,
    row_view,
    stub_spec,
    view_of,
)
from faas.service._tenant import Tenant
from faas.service._triggers import TriggerHost, trigger_fields
from registry import FunctionSpec, ModelSpec
from runtime import (
    BackPressureError,
    InvocationCancelled,
    NotFoundError,
    ObjectStore,
    PoolClosedError,
    QuotaExceededError,
    RecordStore,
    RecordWriter,
    Result,
    ResultRecord,
    StoreError,
    SubmitError,
    error_info,
    new_id,
)
from runtime import staging_threshold as parse_threshold
from warmpool import Substrate, SubstrateConfig

log = logging.getLogger("faas.service")

Listener = Callable[[ResultView], None]


class ServiceCore:
    """Tenants, admission, durable state and result delivery of ``faas serve``.

    Args:
        store: The service's object store (tenants get ``tenants/<name>/`` in it;
            models are registered at its root by the operator).
        auth: Maps tokens to tenants.
        state_dir: Where the SQLite index lives.
        pool: The substrate that runs invocations (built from ``substrate`` when None).
        substrate: Which substrate to build, and its options (default: the local pool).
        staging_threshold: Bytes above which values travel by reference.
        result_threads: Threads writing result records to the store.
        triggers: Runs the tenants' trigger bindings once the core has started (None: none run).
        budget_minute_seconds: Length of the token budgets' "minute" window (shorter in tests).
        pool_options: Defaults for the substrate's constructor (``options`` in
            ``substrate`` override them).
    """

    SPEC_CACHE_SECONDS = 0.5
    DONE_CACHE = 10_000  # recent results, for the reads that follow a done event
    DONE_CACHE_BYTES = 32 * 2**20  # each value may be as large as the staging threshold

    def __init__(
        self,
        store: ObjectStore,
        auth: Authenticator,
        *,
        state_dir: Path,
        pool: Substrate | None = None,
        substrate: SubstrateConfig | None = None,
        staging_threshold: int | str | None = None,
        result_threads: int = 4,
        triggers: TriggerHost | None = None,
        budget_minute_seconds: float = MINUTE,
        **pool_options: Any,
    ) -> None:
        self.store = store
        self.auth = auth
        self.audit = AuditLog(Path(state_dir) / "audit.jsonl", auth=auth)  # see faas.service._audit
        self.models = AuditedModels(store, self.audit)
        self.threshold = parse_threshold(staging_threshold)
        self.index = Index(Path(state_dir) / "index.sqlite")
        self.pool: Substrate = (
            pool if pool is not None else (substrate or SubstrateConfig()).build(store, **pool_options)
        )
        self._lock = threading.RLock()
        self._tenants: dict[str, TenantState] = {}
        self._where: dict[str, tuple[TenantState, Pending]] = {}  # accepted and not finished
        self._listeners: dict[str, list[Listener]] = {}
        self._done = RecentResults(self.DONE_CACHE, self.DONE_CACHE_BYTES)
        self._models: dict[str, tuple[ModelSpec, float]] = {}
        self.ledger = Ledger(self.index, minute_seconds=budget_minute_seconds)  # budgets, usage totals
        self.shares = Shares(store, self.audit)  # functions shared between tenants, as owner/name
        usage = self.audit.charging(self.ledger)
        self._committer = ResultCommitter(
            self.index, self._committed, record_threads=result_threads, on_usage=usage
        )
        self._closed = False
        self.triggers = triggers
        self.started_at = time.time()
        self.counters: dict[str, int] = collections.defaultdict(int)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> ServiceCore:
        """Start the pool (warm models first) and run what a previous life left unfinished."""
        warm = [m for m in self.models.list_models() if m.min_replicas >= 1]
        self.pool.start(models=warm)
        self.recover()
        if self.triggers is not None:  # after the replay: runners re-attach to what it requeued
            self.triggers.start(self)
        return self

    def recover(self) -> int:
        """Requeue the index's unfinished invocations; returns how many were requeued."""
        requeued = 0
        for row in self.index.unfinished():
            try:
                if self._recover_one(row):
                    requeued += 1
            except Exception as exc:  # one bad row must not keep the service down
                log.exception("Could not recover invocation %s", row.id)
                inv = row.invocation()
                result = Result(invocation_id=row.id, error=error_info(exc, "system", with_traceback=False))
                ts = self._tenant_state(self._tenant_named(row.tenant))
                self._committer.put(ts, Pending(inv, stub_spec(inv), None), result)
        for row in self.index.unrecorded():  # committed here, but the store record was not written
            ts = self._tenant_state(self._tenant_named(row.tenant))
            self._committer.record_later(ts, ResultRecord.model_validate_json(row.result or "{}"))
        if requeued:
            log.info("Requeued %d invocations accepted before the last stop.", requeued)
        return requeued

    def _recover_one(self, row: Row) -> bool:
        ts = self._tenant_state(self._tenant_named(row.tenant))
        existing = ts.records.result(row.id)
        if existing is not None:  # it finished; only the index did not hear of it
            self.index.finish_many([(row.id, existing.status, existing.model_dump_json(exclude_none=True))])
            self.index.mark_recorded([row.id])
            return False
        inv = row.invocation()
        inv = inv.model_copy(update={"attempt": inv.attempt + 1})
        spec = ts.registry.get_function(inv.function_digest)
        model = self.models.get_model(inv.model) if inv.model else None
        pending = Pending(inv, spec, model)
        with self._lock:
            self._where[inv.id] = (ts, pending)
            ts.queue.append(pending)
        if ts.records.request(inv.id) is None:
            ts.writer.request(inv)
        self.counters["recovered"] += 1
        self._pump(ts)
        return True

    def shutdown(self) -> None:
        """Stop accepting work, stop the pool, flush records, close the index."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.triggers is not None:
            self.triggers.stop()
        self.pool.shutdown()
        self._committer.close()
        for ts in list(self._tenants.values()):
            try:
                ts.writer.close()
            except StoreError as exc:
                log.error("Request records of tenant %s not written: %s", ts.tenant.name, exc)
        self.index.close()

    # -- tenants ------------------------------------------------------------------------
    def _tenant_named(self, name: str) -> Tenant:
        # A tenant removed from the token file gets defaults: its accepted work still finishes.
        return next((t for t in self.auth.tenants() if t.name == name), Tenant(name))

    def _tenant_state(self, tenant: Tenant) -> TenantState:
        with self._lock:
            ts = self._tenants.get(tenant.name)
            if ts is None:
                store = tenant.scoped(self.store)  # on a file store, owned by its unix_user
                records = RecordStore(store)
                registry = SharingRegistry(store, tenant.name, self.shares)
                ts = TenantState(tenant, store, registry, records, RecordWriter(records))
                self._tenants[tenant.name] = ts
            return ts

    def session(self, tenant: Tenant) -> SessionInfo:
        """What a client of ``tenant`` needs to know."""
        from faas import __version__

        ts = self._tenant_state(tenant)
        return SessionInfo(
            tenant=tenant.name,
            store=ts.store.config(),
            staging_threshold=self.threshold,
            limits=tenant.limits,
            version=__version__,
            admin=tenant.may("admin"),
            internals=tenant.may("internals"),
        )

    # -- functions and models ----------------------------------------------------------
    def register(self, tenant: Tenant, req: RegisterFunction) -> FunctionSpec:
        """Store a function artifact under the tenant and return its spec.

        Raises:
            SubmitError: The artifact's model is not registered.
        """
        if req.name.startswith(RESERVED_PREFIX):
            why = f"names starting with {RESERVED_PREFIX!r} are reserved for the service's built-in functions"
            raise SubmitError(f"Cannot register {req.name!r}: {why}; choose another name.")
        if req.model:
            self.resolve_model(req.model)  # refuse a function whose model does not exist
        spec = FunctionSpec(
            name=req.name,
            digest=digest(req.artifact),
            model=req.model,
            model_param=req.model_param,
            model_param_index=req.model_param_index,
            timeout=req.timeout,
            retries=req.retries,
            priority=req.priority,
            module=req.module,
            qualname=req.qualname,
        )
        return self._tenant_state(tenant).registry.register_function(req.artifact, spec)

    def builtin(self, tenant: Tenant, name: str) -> FunctionSpec:
        """A built-in function (``openai.chat``, ...) in the tenant's registry (``TenantState.builtin``)."""
        return self._tenant_state(tenant).builtin(name)

    def function(self, tenant: Tenant, ref: str) -> FunctionSpec:
        """Resolve a function reference of ``tenant`` (cached briefly; digests for good).

        Raises:
            NotFoundError: The tenant has no such function.
        """
        ts = self._tenant_state(tenant)
        now = time.monotonic()
        hit = ts.specs.get(ref)
        if hit is not None and (hit[0].digest == ref or now - hit[1] < self.SPEC_CACHE_SECONDS):
            return hit[0]
        try:
            spec = ts.registry.get_function(ref)
        except (LookupError, ValueError) as exc:
            raise NotFoundError(str(exc), 404) from None
        ts.specs[ref] = (spec, now)
        return spec

    def list_functions(self, tenant: Tenant) -> list[FunctionSpec]:
        """The latest version of each of the tenant's functions."""
        return self._tenant_state(tenant).registry.list_functions()

    def resolve_model(self, ref: str) -> ModelSpec:
        """Resolve a model reference (cached for ``SPEC_CACHE_SECONDS``).

        Raises:
            UnknownModelError: No such model.
        """
        now = time.monotonic()
        hit = self._models.get(ref)
        if hit is not None and now - hit[1] < self.SPEC_CACHE_SECONDS:
            return hit[0]
        spec = self.models.get_model(ref)
        self._models[ref] = (spec, now)
        return spec

    # -- submit ---------------------------------------------------------------------------
    def submit(
        self,
        tenant: Tenant,
        function: str,
        items: list[Item],
        *,
        batch: bool = False,
        model: ModelSpec | None = None,
        on_partial: Callable[[str, int, Any], None] | None = None,
        listener: Listener | None = None,
        batch_id: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> BatchView:
        """Accept invocations of one function; they are durable when this returns.

        ``model`` (resolved) replaces the function's own: the built-in functions serve
        whichever model a request names. ``on_partial(id, attempt, value)`` gets their
        partial outputs where the substrate has a channel (a stream's chunks); ``listener``
        is told when each finishes, as :meth:`listen` would (no index read, no race).
        ``batch_id`` names the batch (implies ``batch``) and ``ids`` the invocations,
        one per item: a caller that must find its invocations again after a crash
        (an OpenAI batch) chooses them.

        Raises:
            NotFoundError: The tenant has no such function.
            SubmitError: A staged argument is missing from the tenant's store.
            QuotaExceededError: A queue quota, or (BudgetExceededError) a token budget, is used up.
            BackPressureError: The model's queue in the pool is full.
            PoolClosedError: The service is shutting down.
        """
        self.ledger.check(tenant)
        ts = self._tenant_state(tenant)
        spec = self.function(tenant, function)
        if model is None and spec.model:
            model = self.resolve_model(spec.model)
            if "@" not in spec.model:
                model = self.pool.prefer_warm(model)
        policy = tenant.invocation_policy(model.ref if model else None)  # refuses an ungranted model
        policy["adapters"] = self.models.adapters.snapshot(model.ref) if model else None  # as at submit
        for item in items:
            check_refs(ts, item)
        if ids is not None and (len(ids) != len(items) or not all(plausible_id(i) for i in ids)):
            raise SubmitError("Pass one plain alphanumeric invocation id (at most 64 characters) per item.")
        batch_id = batch_id or (new_id() if batch else None)
        store_config = ts.store.config()  # once per request, not per item
        invocations = [
            spec.invocation(
                item.args,
                model=model.ref if model else None,
                store=store_config,
                stage_threshold=self.threshold,
                refs=tuple(item.refs),
                priority=item.priority,
                tenant=tenant.name,
                weight=tenant.limits.weight,
                **policy,
                **trigger_fields(item, ids[n] if ids is not None else None),
            )
            for n, item in enumerate(items)
        ]
        with self._lock:
            if self._closed:
                raise PoolClosedError("The service is shutting down and accepts no new invocations.")
            limits = tenant.limits
            free = max(0, limits.max_inflight - ts.running)
            waiting = len(ts.queue) + max(0, len(items) - free)
            if waiting > limits.max_queued:
                self.counters["rejected_quota"] += len(items)
                raise QuotaExceededError(
                    f"Tenant {tenant.name!r} may have {limits.max_inflight} invocations running and "
                    f"{limits.max_queued} queued; it has {ts.running} running and {len(ts.queue)} queued, "
                    f"so {len(items)} more do not fit. Wait for some to finish."
                )
            self.index.add(tenant.name, invocations, batch_id)  # durable before we answer
            for inv in invocations:
                pending = Pending(inv, spec, model, on_partial)
                self._where[inv.id] = (ts, pending)
                if listener is not None:
                    self._listeners.setdefault(inv.id, []).append(listener)
                ts.queue.append(pending)
            self.counters["submitted"] += len(invocations)
        for inv in invocations:
            ts.writer.request(inv)
        self._pump(ts)
        return BatchView(batch_id=batch_id or "", ids=[inv.id for inv in invocations])

    def _pump(self, ts: TenantState) -> None:
        """Move the tenant's queued invocations into the pool while its in-flight quota allows."""
        while True:
            with self._lock:
                if self._closed or not ts.queue or ts.running >= ts.tenant.limits.max_inflight:
                    return
                pending = ts.queue.popleft()
                ts.running += 1
            try:
                done, partial = functools.partial(self._on_done, ts, pending), pending.on_partial
                extra = {"on_partial": functools.partial(partial, pending.invocation.id)} if partial else {}
                self.pool.submit(pending.invocation, pending.spec, pending.model, done, **extra)
            except BackPressureError:
                with self._lock:  # the model's queue is full: keep it at the head and try again soon
                    ts.queue.appendleft(pending)
                    ts.running -= 1
                threading.Timer(0.05, self._pump, (ts,)).start()
                return
            except Exception as exc:
                result = Result(
                    invocation_id=pending.invocation.id,
                    error=error_info(exc, "system", with_traceback=False),
                    finished_at=time.time(),
                )
                self._on_done(ts, pending, result)

    def _on_done(self, ts: TenantState, pending: Pending, result: Result) -> None:
        with self._lock:
            ts.running -= 1
            closing = self._closed
        if closing and result.error is not None and result.error.type_name.endswith("PoolClosedError"):
            return  # cut short by our own shutdown: it stays unfinished in the index and reruns on restart
        self._committer.put(ts, pending, result)
        self._pump(ts)

    def _committed(self, batch: list[tuple[TenantState, Pending, ResultView, bool]]) -> None:
        """Results are durable in the index: forget them as live and tell the listeners."""
        told: list[tuple[list[Listener], ResultView]] = []
        with self._lock:
            for _ts, _pending, view, won in batch:
                self._where.pop(view.id, None)
                self._done.put(view)
                told.append((self._listeners.pop(view.id, []), view))
                self.counters[f"finished_{view.status}" if won else "duplicate_results"] += 1
        for listeners, view in told:
            for listener in listeners:
                try:
                    listener(view)
                except Exception:
                    log.exception("A result listener failed for invocation %s", view.id)

    # -- queries --------------------------------------------------------------------------
    def _row(self, tenant: Tenant, invocation_id: str) -> Row:
        row = self.index.get(invocation_id) if plausible_id(invocation_id) else None
        if row is None or row.tenant != tenant.name:  # another tenant's id looks exactly like a missing one
            raise NotFoundError(f"No invocation {invocation_id!r} is known to this service.", 404)
        return row

    def view(self, tenant: Tenant, invocation_id: str) -> InvocationView:
        """What is known about one of the tenant's invocations.

        Raises:
            NotFoundError: Unknown id, or another tenant's.
        """
        row = self._row(tenant, invocation_id)
        result = self.result(tenant, invocation_id, row=row)
        status = result.status if result is not None else self._live_state(invocation_id)
        return row_view(row, status, result)

    def _live_state(self, invocation_id: str) -> str:
        phase = self.pool.state(invocation_id)
        return "running" if phase == "running" else "queued"

    def result(self, tenant: Tenant, invocation_id: str, *, row: Row | None = None) -> ResultView | None:
        """The final result of one of the tenant's invocations, or None while it runs.

        Raises:
            NotFoundError: Unknown id, or another tenant's.
        """
        row = row or self._row(tenant, invocation_id)
        with self._lock:
            hit = self._done.get(invocation_id)
            if hit is not None:
                return hit
            if invocation_id in self._where:
                return None
        if row.result:  # committed, store record not written yet
            return view_of(ResultRecord.model_validate_json(row.result))
        record = self._tenant_state(tenant).records.result(invocation_id)
        if record is None:
            if row.state in FINAL_STATES:
                raise StoreError(
                    f"The result record of invocation {invocation_id} is missing from the store."
                )
            return None
        return view_of(record)

    def logs(self, tenant: Tenant, invocation_id: str) -> str:
        """Captured stdout and stderr of a finished invocation ('' while it runs).

        Raises:
            NotFoundError: Unknown id, or another tenant's.
        """
        row = self._row(tenant, invocation_id)
        if row.result:
            return ResultRecord.model_validate_json(row.result).logs
        record = self._tenant_state(tenant).records.result(invocation_id)
        return str(getattr(record, "logs", "") or "") if record is not None else ""

    def listen(self, tenant: Tenant, ids: list[str], listener: Listener) -> list[ResultView]:
        """Call ``listener`` once per id when it finishes; returns those already finished.

        Raises:
            NotFoundError: One of the ids is unknown or another tenant's (nothing is registered).
        """
        rows = [self._row(tenant, i) for i in ids]
        finished: list[ResultView] = []
        for row in rows:
            with self._lock:
                live = row.id in self._where
                if live:
                    self._listeners.setdefault(row.id, []).append(listener)
            if not live:
                view = self.result(tenant, row.id, row=row)
                if view is not None:
                    finished.append(view)
                else:  # accepted but not finished and not live: only during a recovery race
                    with self._lock:
                        self._listeners.setdefault(row.id, []).append(listener)
        return finished

    def unlisten(self, ids: list[str], listener: Listener) -> None:
        """Forget ``listener`` (its stream closed)."""
        with self._lock:
            for i in ids:
                entries = self._listeners.get(i)
                if entries and listener in entries:
                    entries.remove(listener)
                    if not entries:
                        del self._listeners[i]

    def batch_ids(self, tenant: Tenant, batch_id: str) -> list[str]:
        """The ids of one of the tenant's batches, in input order.

        Raises:
            NotFoundError: Unknown batch, or another tenant's.
        """
        rows = self.index.batch(batch_id) if plausible_id(batch_id) else []
        if not rows or rows[0].tenant != tenant.name:
            raise NotFoundError(f"No batch {batch_id!r} is known to this service.", 404)
        return [r.id for r in rows]

    def list(self, tenant: Tenant, limit: int, state: str | None) -> list[InvocationView]:
        """The tenant's invocations, newest first (results not included)."""
        out = []
        for row in self.index.list(tenant.name, limit, state):
            status = row.state if row.state in FINAL_STATES else self._live_state(row.id)
            out.append(row_view(row, status))
        return out

    def cancel(self, tenant: Tenant, invocation_id: str) -> CancelView:
        """Cancel one of the tenant's invocations, queued or running.

        Raises:
            NotFoundError: Unknown id, or another tenant's.
        """
        self._row(tenant, invocation_id)
        with self._lock:
            where = self._where.get(invocation_id)
            queued = where is not None and where[1] in where[0].queue
            if queued:
                assert where is not None
                where[0].queue.remove(where[1])
        if queued:
            assert where is not None
            exc = InvocationCancelled("The invocation was cancelled before it started.")
            result = Result(
                invocation_id=invocation_id, error=error_info(exc, "cancelled", with_traceback=False)
            )
            self._committer.put(where[0], where[1], result)
            cancelled = True
        else:
            cancelled = self.pool.cancel(invocation_id)
        if cancelled:
            self._wait_final(tenant, invocation_id)
        view = self.view(tenant, invocation_id)
        return CancelView(id=invocation_id, cancelled=cancelled, status=view.status)

    def _wait_final(self, tenant: Tenant, invocation_id: str, timeout: float = 10.0) -> None:
        done = threading.Event()
        self.listen(tenant, [invocation_id], lambda _view: done.set())
        if self.result(tenant, invocation_id) is None:
            done.wait(timeout)

    def live_counts(self) -> dict[str, dict[str, int]]:
        """Per tenant: invocations in the pool (running) and waiting in its queue."""
        with self._lock:
            return {
                name: {"running": ts.running, "queued": len(ts.queue)} for name, ts in self._tenants.items()
            }
