"""The service's usage ledger: token budgets, per-tenant totals and usage reports.

Usage rows are committed to the index with their results (see
:mod:`faas.service._commit`); :class:`Ledger` keeps what admission and
``/metrics`` need in memory, rebuilt from the index at start:

- **budgets**: per tenant, the tokens (prompt + completion) of its finished
  invocations in two sliding windows, a minute (``Limits.tokens_per_minute``)
  and 30 days (``Limits.tokens_per_30d``). A window sums buckets (1 s for the
  minute, 1 h for 30 days); a bucket leaves the window once its end is a
  window's length ago, so tokens count for up to one bucket longer than the
  window, never shorter. A tenant whose window holds its budget or more is
  refused (:class:`~runtime.BudgetExceededError`, HTTP 429) with the seconds
  until enough buckets have left; what is already accepted runs on. Tokens are
  known only when an invocation finishes, so a tenant under its budget is
  admitted and may end above it: the budget bounds what a tenant can start.
- **totals** for the Prometheus counters ``faas_tenant_tokens_total`` and
  ``faas_tenant_engine_seconds_total``.

Reports (``GET /v1/usage``) show a tenant its own rows. A tenant marked
``admin`` in the token file (an operator) may also ask for another tenant's
rows or every tenant's (:meth:`Ledger.scope`); anyone else asking for that
gets :class:`~runtime.ForbiddenError` (HTTP 403).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable

from faas._usage import GroupBy, UsageReport, UsageRow, report
from faas.service._index import Index
from faas.service._tenant import Tenant
from runtime import BudgetExceededError, ForbiddenError, NotFoundError, SubmitError

MINUTE = 60.0
THIRTY_DAYS = 30 * 86400.0
_BUCKETS = {"minute": 60, "30d": 720}  # buckets per window: 1 s per minute window, 1 h per 30 days


class Window:
    """Tokens in a sliding window, summed in buckets.

    Args:
        length: The window's length in seconds.
        buckets: How many buckets cover it.
    """

    def __init__(self, length: float, buckets: int) -> None:
        self.length = length
        self.bucket = length / buckets
        self._slots: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._total = 0

    def add(self, when: float, tokens: int) -> None:
        """Charge ``tokens`` at time ``when`` (epoch seconds)."""
        slot = int(when // self.bucket)
        late = bool(self._slots) and slot not in self._slots and slot < next(reversed(self._slots))
        self._slots[slot] = self._slots.get(slot, 0) + tokens
        self._total += tokens
        if late:  # committed after a later finisher: keep the buckets in time order
            self._slots = collections.OrderedDict(sorted(self._slots.items()))
        self._expire(when)  # a tenant without budgets is never checked: expire here too

    def _expire(self, now: float) -> None:
        while self._slots:
            slot, tokens = next(iter(self._slots.items()))
            if (slot + 1) * self.bucket + self.length > now:
                return
            self._slots.popitem(last=False)
            self._total -= tokens

    def total(self, now: float) -> int:
        """Tokens in the window ending at ``now``."""
        self._expire(now)
        return self._total

    def retry_after(self, now: float, limit: int) -> float:
        """Seconds until the window holds fewer than ``limit`` tokens (0 when it does now)."""
        self._expire(now)
        left = self._total
        if left < limit:
            return 0.0
        for slot, tokens in self._slots.items():
            left -= tokens
            if left < limit:
                return max(0.0, (slot + 1) * self.bucket + self.length - now)
        return self.length  # a zero budget: no wait helps


class Ledger:
    """Token budgets and usage totals of every tenant, fed by committed usage rows.

    Args:
        index: The service's index (rows are read from it; the committer writes them).
        minute_seconds: Length of the "per minute" window (shorter in tests).
        clock: Wall clock (epoch seconds), as the rows' ``finished_at``.
    """

    def __init__(
        self, index: Index, *, minute_seconds: float = MINUTE, clock: Callable[[], float] = time.time
    ):
        self.index = index
        self.minute_seconds = minute_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, dict[str, Window]] = {}
        self._totals: dict[str, list[float]] = {}
        now = clock()
        for name, length in (("minute", minute_seconds), ("30d", THIRTY_DAYS)):
            bucket = length / _BUCKETS[name]
            for tenant, start, tokens in index.usage_buckets(now - length - bucket, bucket):
                self._windows_of(tenant)[name].add(start + bucket / 2, tokens)
        for tenant, sums in index.usage_totals().items():
            self._totals[tenant] = [float(v) for v in sums]

    def _windows_of(self, tenant: str) -> dict[str, Window]:
        found = self._windows.get(tenant)
        if found is None:
            found = self._windows[tenant] = {
                "minute": Window(self.minute_seconds, _BUCKETS["minute"]),
                "30d": Window(THIRTY_DAYS, _BUCKETS["30d"]),
            }
        return found

    def charge(self, rows: list[UsageRow]) -> None:
        """Add committed rows to their tenants' windows and totals."""
        with self._lock:
            for row in rows:
                for window in self._windows_of(row.tenant).values():
                    window.add(row.finished_at, row.tokens)
                sums = self._totals.setdefault(row.tenant, [0.0, 0.0, 0.0, 0.0])
                sums[0] += row.prompt_tokens
                sums[1] += row.cached_tokens
                sums[2] += row.completion_tokens
                sums[3] += row.engine_share_seconds

    def check(self, tenant: Tenant) -> None:
        """Refuse a tenant that has used a window's budget.

        Raises:
            BudgetExceededError: The tenant is at or over a budget (``retry_after`` says how long to wait).
        """
        limits = tenant.limits
        budgets = {"minute": limits.tokens_per_minute, "30d": limits.tokens_per_30d}
        if all(b is None for b in budgets.values()):
            return
        now = self.clock()
        with self._lock:
            windows = self._windows_of(tenant.name)
            for name, budget in budgets.items():
                used = windows[name].total(now)
                if budget is None or used < budget:
                    continue
                wait = windows[name].retry_after(now, budget)
                span = "minute" if name == "minute" else "30 days"
                raise BudgetExceededError(
                    f"Tenant {tenant.name!r} has used {used} tokens in the last {span}, and its budget is "
                    f"{budget}; nothing was accepted. Retry in {math.ceil(wait)} s.",
                    retry_after=wait,
                )

    def totals(self) -> dict[str, tuple[int, int, int, float]]:
        """Per tenant: prompt, cached and completion tokens and engine share seconds, ever."""
        with self._lock:
            return {t: (int(s[0]), int(s[1]), int(s[2]), s[3]) for t, s in self._totals.items()}

    def scope(
        self, who: Tenant, known: Iterable[str], *, tenant: str | None = None, all_tenants: bool = False
    ) -> str | None:
        """Whose usage ``who`` may read when asking for ``tenant`` or ``all_tenants``.

        Args:
            who: The asking tenant.
            known: The configured tenants' names.
            tenant: Another tenant's name (None: ``who`` itself, unless ``all_tenants``).
            all_tenants: Every tenant's rows.

        Returns:
            The tenant whose rows to report, or None for every tenant.

        Raises:
            SubmitError: Both ``tenant`` and ``all_tenants`` were given (HTTP 400).
            ForbiddenError: ``who`` is not an admin and asked for more than its own rows (HTTP 403).
            NotFoundError: An admin asked for a tenant that is neither configured nor in the ledger.
        """
        if tenant is not None and all_tenants:
            raise SubmitError("Give either a tenant or all_tenants, not both: they ask for different rows.")
        others = all_tenants or (tenant is not None and tenant != who.name)
        if others and not who.may("admin"):
            wanted = "every tenant's usage" if all_tenants else f"the usage of tenant {tenant!r}"
            raise ForbiddenError(
                f"Tenant {who.name!r} may read only its own usage; reading {wanted} needs an admin "
                "token (a tenant with admin = true in the token file).",
                403,
            )
        if all_tenants:
            return None
        if tenant is None or tenant == who.name:
            return who.name
        if tenant not in set(known) and not self.index.usage(tenant, limit=1):  # a removed tenant's history
            raise NotFoundError(f"No tenant {tenant!r} is configured or has usage in the ledger.", 404)
        return tenant

    def report(
        self,
        tenant: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
        by: GroupBy | None = None,
        limit: int = 1000,
    ) -> UsageReport:
        """A tenant's (None: every tenant's) rows (newest first, at most ``limit``) or their sums ``by``."""
        rows = self.index.usage(tenant, since, until, None if by is not None else limit)
        return report(rows, since=since, until=until, by=by, limit=limit)
