"""The pool service's in-memory state: tenants' queues and helpers shared by the core."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faas.openai import BUILTINS
from faas.service._api import InvocationView, Item, ResultView
from faas.service._index import Row
from faas.service._tenant import Tenant
from registry import FunctionSpec, ModelSpec, Registry
from runtime import (
    Invocation,
    NotFoundError,
    ObjectStore,
    RecordStore,
    RecordWriter,
    ResultRecord,
    StagedRef,
    SubmitError,
    dumps,
    is_marker,
    parse_marker,
)

PartialListener = Callable[[str, int, Any], None]
"""Receives ``(invocation_id, attempt, value)`` for each partial output of an invocation."""


@dataclass(eq=False)
class Pending:
    """An accepted invocation with what the pool needs to run it (and who hears its partial outputs)."""

    invocation: Invocation
    spec: FunctionSpec
    model: ModelSpec | None
    on_partial: PartialListener | None = None


@dataclass(eq=False)
class TenantState:
    """One tenant: its store view, registry, records, queue and in-flight count."""

    tenant: Tenant
    store: ObjectStore
    registry: Registry
    records: RecordStore
    writer: RecordWriter
    queue: collections.deque[Pending] = field(default_factory=collections.deque)
    running: int = 0
    specs: dict[str, tuple[FunctionSpec, float]] = field(default_factory=dict)
    builtins: dict[str, FunctionSpec] = field(default_factory=dict)
    _builtin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def builtin(self, name: str) -> FunctionSpec:
        """A built-in function's spec in this tenant's registry, registered there on first use.

        Built-in functions are the service's code run as the tenant's invocations: they
        live in the tenant's store like its own functions, under reserved names, so
        workers load them by digest the same way.

        Raises:
            NotFoundError: No built-in function has that name.
        """
        spec = self.builtins.get(name)
        if spec is not None:
            return spec
        fn = BUILTINS.get(name)
        if fn is None:
            raise NotFoundError(f"No built-in function {name!r}.", 404)
        with self._builtin_lock:  # a burst of first requests registers it once, not once each
            spec = self.builtins.get(name)
            return spec if spec is not None else self._register_builtin(name, fn)

    def _register_builtin(self, name: str, fn: Callable[..., Any]) -> FunctionSpec:
        artifact = dumps(fn, what=f"built-in function {name}")
        spec = FunctionSpec(  # retried when a worker or engine dies under it: a request has no side effects
            name=name,
            digest=digest(artifact),
            model_param="model",
            retries=2,
            module=fn.__module__,
            qualname=name,
        )
        spec = self.registry.register_function(artifact, spec)  # a no-op once stored with this digest
        self.builtins[name] = spec
        return spec


def view_of(record: ResultRecord) -> ResultView:
    value = record.value.to_wire() if record.value is not None and record.status == "succeeded" else None
    return ResultView(id=record.invocation_id, status=record.status, value=value, error=record.error)


def digest(artifact: bytes) -> str:
    from runtime import digest_of

    return digest_of(artifact)


def plausible_id(value: str) -> bool:
    return 0 < len(value) <= 64 and value.isalnum()


def stub_spec(inv: Invocation) -> FunctionSpec:
    return FunctionSpec(name=inv.function_name, digest=inv.function_digest)


def row_view(row: Row, status: str, result: ResultView | None = None) -> InvocationView:
    """The API's view of an indexed invocation."""
    return InvocationView(
        id=row.id,
        status=status,  # type: ignore[arg-type]
        function_name=row.function_name,
        function_digest=row.function_digest,
        model=row.model,
        batch=row.batch,
        submitted_at=row.submitted_at,
        finished_at=row.finished_at,
        result=result,
    )


def check_refs(ts: TenantState, item: Item) -> None:
    """Every staged object an item names is in the tenant's store (before anything is accepted).

    Raises:
        SubmitError: The arguments' staging marker is malformed.
        NotFoundError: A staged object is not in the tenant's store.
    """
    refs: list[StagedRef] = list(item.refs)
    if is_marker(item.args):
        try:
            refs.append(parse_marker(item.args))
        except Exception as exc:
            raise SubmitError(f"The staged arguments' marker is malformed: {exc}") from None
    for ref in {r.key: r for r in refs}.values():
        try:
            present = ts.store.exists(ref.key)
        except ValueError:
            present = False
        if not present:
            raise NotFoundError(
                f"Staged object {ref.key!r} ({ref.what}) is not in tenant {ts.tenant.name!r}'s store; "
                "stage it with this tenant's session before submitting.",
                404,
            )


class RecentResults:
    """Finished results kept in memory for the reads that follow a done event.

    Bounded by count and by bytes (a value may be as large as the staging threshold), oldest
    first out; a miss falls back to the index and the store, so eviction never loses a result.

    Args:
        max_items: Results kept at most.
        max_bytes: Value and error bytes kept at most.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.bytes = 0
        self._views: collections.OrderedDict[str, ResultView] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def get(self, invocation_id: str) -> ResultView | None:
        """The kept result of an invocation, or None."""
        return self._views.get(invocation_id)

    def put(self, view: ResultView) -> None:
        """Keep ``view`` (replacing an earlier one of the same id), evicting the oldest."""
        old = self._views.pop(view.id, None)
        if old is not None:
            self.bytes -= _weight(old)
        self._views[view.id] = view
        self.bytes += _weight(view)
        while self._views and (len(self._views) > self.max_items or self.bytes > self.max_bytes):
            self.bytes -= _weight(self._views.popitem(last=False)[1])


def _weight(view: ResultView) -> int:
    # The value's bytes, the error's text, and about 200 bytes of the objects around them.
    size = 200 + len(view.value or b"")
    if view.error is not None:
        size += len(view.error.message) + len(view.error.traceback) + len(view.error.exception or b"")
    return size
