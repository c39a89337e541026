"""The usage ledger: one row per finished invocation, and sums of rows.

A :class:`UsageRow` is built in one place, :func:`usage_row`, from what the
pool reports with a result (its engine calls' tokens and engine seconds,
queue wait, cold start, execution time) and the invocation's function and
model. The service commits it in its index in the same transaction as the
result (``faas serve``: ``GET /v1/usage``, per-tenant budgets and Prometheus
counters read it); the embedded and Globus Compute cloud clients write it to
their store as one commit-once object per invocation under
``usage/<YYYY-MM-DD>/<HH>/<invocation id>.json`` (UTC hour it finished), so a
listing by day reads only the days asked for. The service also writes that
object to the tenant's part of its store (``tenants/<tenant>/usage/...``);
:func:`read_store_usage` reads those parts too, for an operator on the machine.

Columns worth a word:

- ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``: the engine's own
  counts, summed over the invocation's engine calls (``cached_tokens`` is part
  of ``prompt_tokens``, as SGLang counts it).
- ``engine_seconds``: the engine's latency, summed over the calls (each call's
  longest sequence). Concurrent calls overlap, so these do not add up to the
  engine's busy time.
- ``engine_share_seconds``: the invocation's part of the engine's busy time:
  the CPU engine splits each forward step's time over the rows in it by the
  tokens each row fed that step, so the shares of all invocations sum to its
  busy time. An engine that does not report shares (SGLang) gets the latency
  as an upper-bound estimate, and ``share_estimated`` is set.
- ``ttft_seconds``: time to the first text of the first streamed call.
- ``privileged``: the modes that expose model internals (``logprobs``,
  ``hidden_states``, ``internals_read``, ``internals_write``) its calls used; the
  service writes an ``internals.use`` entry to its audit log for each such row.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime import INTERNALS_MODES, EngineCall, Invocation, ObjectExists, Result, scoped_store

if TYPE_CHECKING:
    from registry import FunctionSpec, ModelSpec
    from runtime import ObjectStore

Outcome = Literal["succeeded", "failed", "cancelled"]
GroupBy = Literal["model", "function", "tenant", "hour", "day"]
USAGE_PREFIX = "usage/"
TENANTS_PREFIX = "tenants/"  # a service tenant's part of the store


class UsageRow(BaseModel):
    """What one finished invocation used (see the module docstring for the columns)."""

    model_config = ConfigDict(extra="ignore")

    invocation_id: str
    tenant: str
    function: str
    function_version: int = 0
    function_digest: str = ""
    model: str | None = None
    outcome: Outcome
    error_kind: str | None = None
    attempt: int = 0
    engine_calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float | None = None
    cold_start_seconds: float | None = None
    ttft_seconds: float | None = None
    execution_seconds: float | None = None
    engine_seconds: float = 0.0
    engine_share_seconds: float = 0.0
    share_estimated: bool = False
    privileged: list[str] = Field(default_factory=list)
    submitted_at: float
    finished_at: float

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens: what a token budget is charged."""
        return self.prompt_tokens + self.completion_tokens


def usage_row(
    invocation: Invocation, spec: FunctionSpec, model: ModelSpec | None, result: Result, tenant: str
) -> UsageRow:
    """The usage row of one finished invocation (the one place rows are built)."""
    calls = [EngineCall.model_validate(c) for c in result.engine_calls]
    if result.error is None:
        outcome: Outcome = "succeeded"
    else:
        outcome = "cancelled" if result.error.kind == "cancelled" else "failed"
    ttfts = [c.ttft_seconds for c in calls if c.ttft_seconds is not None]
    executed = result.finished_at - result.started_at if result.started_at and result.finished_at else None
    return UsageRow(
        invocation_id=invocation.id,
        tenant=tenant,
        function=spec.name,
        function_version=spec.version,
        function_digest=spec.digest,
        model=model.ref if model is not None else invocation.model,
        outcome=outcome,
        error_kind=result.error.kind if result.error is not None else None,
        attempt=result.attempt,
        engine_calls=len(calls),
        prompt_tokens=sum(c.prompt_tokens for c in calls),
        cached_tokens=sum(c.cached_tokens for c in calls),
        completion_tokens=sum(c.completion_tokens for c in calls),
        queue_seconds=result.queue_seconds,
        cold_start_seconds=result.cold_start_seconds,
        ttft_seconds=ttfts[0] if ttfts else None,
        execution_seconds=executed,
        engine_seconds=sum(c.engine_seconds for c in calls),
        engine_share_seconds=sum(
            c.engine_share_seconds if c.engine_share_seconds is not None else c.engine_seconds for c in calls
        ),
        share_estimated=any(c.engine_share_seconds is None for c in calls),
        privileged=sorted({m for c in calls for m in c.modes} & INTERNALS_MODES),
        submitted_at=invocation.submitted_at,
        finished_at=result.finished_at or time.time(),
    )


class UsageGroup(BaseModel):
    """The sums of the usage rows that share a key (a model, a function, a tenant, an hour or a day)."""

    key: str
    invocations: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    engine_share_seconds: float = 0.0
    queue_seconds: float = 0.0
    execution_seconds: float = 0.0
    cold_start_seconds: float = 0.0


class UsageReport(BaseModel):
    """What ``GET /v1/usage`` answers: rows (newest first), or their sums by ``by``.

    Attributes:
        since: Rows that finished at or after this time (epoch seconds), if given.
        until: Rows that finished before this time, if given.
        by: How ``groups`` are keyed; None lists ``rows`` instead.
        rows: The rows, newest first (empty when ``by`` is set).
        groups: The sums, ordered by key (empty when ``by`` is None).
        total: The sums of every matching row (key ``"total"``).
    """

    since: float | None = None
    until: float | None = None
    by: GroupBy | None = None
    rows: list[UsageRow] = Field(default_factory=list)
    groups: list[UsageGroup] = Field(default_factory=list)
    total: UsageGroup = Field(default_factory=lambda: UsageGroup(key="total"))


def _key(row: UsageRow, by: GroupBy) -> str:
    if by == "model":
        return row.model or "(no model)"
    if by == "function":
        return f"{row.function}@{row.function_version}"
    if by == "tenant":
        return row.tenant
    when = dt.datetime.fromtimestamp(row.finished_at, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:00Z" if by == "hour" else "%Y-%m-%d")


def _add(group: UsageGroup, row: UsageRow) -> None:
    group.invocations += 1
    group.failed += row.outcome != "succeeded"
    group.prompt_tokens += row.prompt_tokens
    group.cached_tokens += row.cached_tokens
    group.completion_tokens += row.completion_tokens
    group.engine_seconds += row.engine_seconds
    group.engine_share_seconds += row.engine_share_seconds
    group.queue_seconds += row.queue_seconds or 0.0
    group.execution_seconds += row.execution_seconds or 0.0
    group.cold_start_seconds += row.cold_start_seconds or 0.0


def report(
    rows: Iterable[UsageRow],
    *,
    since: float | None = None,
    until: float | None = None,
    by: GroupBy | None = None,
    limit: int | None = None,
) -> UsageReport:
    """Filter rows by finish time and list them (newest first, at most ``limit``) or sum them by ``by``."""
    chosen = sorted(
        (
            r
            for r in rows
            if (since is None or r.finished_at >= since) and (until is None or r.finished_at < until)
        ),
        key=lambda r: r.finished_at,
        reverse=True,
    )
    out = UsageReport(since=since, until=until, by=by)
    groups: dict[str, UsageGroup] = {}
    for row in chosen:
        _add(out.total, row)
        if by is not None:
            key = _key(row, by)
            _add(groups.setdefault(key, UsageGroup(key=key)), row)
    out.groups = [groups[k] for k in sorted(groups)]
    out.rows = [] if by is not None else chosen[:limit]
    return out


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float | None = None) -> float:
    """A point in time: ``30m``/``2h``/``7d`` ago, an ISO date or time (UTC unless it says), or epoch seconds.

    Raises:
        ValueError: The text is none of those.
    """
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _UNIT[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use e.g. '2h' or '7d' (ago), '2026-12-01', '2026-12-01T08:00' "
            "or epoch seconds."
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


# -- usage objects in a store ---------------------------------------------------------------


def usage_key(row: UsageRow) -> str:
    """Where a row lives in a store: ``usage/<YYYY-MM-DD>/<HH>/<invocation id>.json`` (UTC)."""
    when = dt.datetime.fromtimestamp(row.finished_at, dt.UTC)
    return f"{USAGE_PREFIX}{when:%Y-%m-%d}/{when:%H}/{row.invocation_id}.json"


def write_usage(store: ObjectStore, row: UsageRow) -> bool:
    """Write a row commit-once; False when the invocation's row was already there.

    Raises:
        StoreError: The store failed.
    """
    try:
        store.put(usage_key(row), row.model_dump_json().encode(), if_absent=True)
    except ObjectExists:
        return False
    return True


def _days(since: float, until: float) -> Iterator[str]:
    day = dt.datetime.fromtimestamp(since, dt.UTC).date()
    last = dt.datetime.fromtimestamp(until, dt.UTC).date()
    while day <= last:
        yield f"{USAGE_PREFIX}{day:%Y-%m-%d}/"
        day += dt.timedelta(days=1)


def read_usage(
    store: ObjectStore, *, since: float | None = None, until: float | None = None
) -> list[UsageRow]:
    """The usage rows in a store that finished in ``[since, until)`` (every row when neither is given).

    With ``since`` at most 31 days before ``until`` (or now), only those days are
    listed; otherwise all of ``usage/``. Unreadable objects are skipped.
    """
    if since is not None and (until if until is not None else time.time()) - since <= 31 * 86400:
        prefixes: Iterable[str] = _days(since, until if until is not None else time.time())
    else:
        prefixes = [USAGE_PREFIX]
    rows = []
    for prefix in prefixes:
        for key in store.list(prefix):
            try:
                row = UsageRow.model_validate(json.loads(store.get(key)))
            except (ValueError, KeyError):
                continue
            if (since is None or row.finished_at >= since) and (until is None or row.finished_at < until):
                rows.append(row)
    return rows


def store_tenants(store: ObjectStore) -> list[str]:
    """The service tenants that have usage objects in a store (``tenants/<name>/usage/``), sorted.

    It lists everything under ``tenants/`` once (the store protocol has no
    delimiter listing), so it costs one listing of the service's tenants' objects.
    """
    names: set[str] = set()
    for key in store.list(TENANTS_PREFIX):
        name, _, rest = key[len(TENANTS_PREFIX) :].partition("/")
        if rest.startswith(USAGE_PREFIX):
            names.add(name)
    return sorted(names)


def read_store_usage(
    store: ObjectStore,
    *,
    tenant: str | None = None,
    all_tenants: bool = False,
    since: float | None = None,
    until: float | None = None,
) -> list[UsageRow]:
    """Usage rows of a store: its own ``usage/`` and, when asked, its service tenants' parts.

    Args:
        store: The store (an embedded client's, or a ``faas serve`` store).
        tenant: Only this tenant's rows: those in ``usage/`` that name it and
            those under ``tenants/<tenant>/usage/``.
        all_tenants: Every row: ``usage/`` and every ``tenants/<name>/usage/``.
        since: Rows that finished at or after this time.
        until: Rows that finished before this time.

    Raises:
        ValueError: Both ``tenant`` and ``all_tenants`` were given.
    """
    if tenant is not None and all_tenants:
        raise ValueError("Give either a tenant or all tenants, not both: they ask for different rows.")
    rows = read_usage(store, since=since, until=until)
    if tenant is not None:
        rows = [r for r in rows if r.tenant == tenant]
    names = store_tenants(store) if all_tenants else [tenant] if tenant is not None else []
    seen = {r.invocation_id for r in rows}
    for name in names:
        for row in read_usage(scoped_store(store, TENANTS_PREFIX + name), since=since, until=until):
            if row.invocation_id not in seen:  # a row is one object; never count it twice
                seen.add(row.invocation_id)
                rows.append(row)
    return rows
