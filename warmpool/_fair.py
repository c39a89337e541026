"""Fair admission at a shared engine: a weighted Virtual Token Counter (VTC).

One :class:`FairQueue` holds the invocations waiting for one model version's
engine slots, in every substrate (the local pool's :class:`~warmpool.ModelPool`
and the Globus Compute pool both take their next invocation from it). It
follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI '24):

- **Counters.** Each tenant has a virtual counter of the service it received,
  in token units divided by its weight: prompt tokens count 1, generated tokens
  2, prompt tokens the engine served from its prefix cache 0.5
  (:class:`TokenWeights`). The engine's own counts (``Result.engine_calls``)
  are charged when an invocation finishes. Because the pool sees an
  invocation's tokens only then (the paper charges as tokens are produced), an
  estimate (the tenant's recent mean cost) is charged when it is dispatched,
  and the difference when it finishes; an invocation that ends without
  reporting its calls (timed out, cancelled, lost) keeps the estimate.
- **Next.** The backlogged tenant (one with invocations waiting) with the
  smallest counter is admitted next (ties: the tenant with fewer invocations
  on the engine, then the oldest waiting invocation);
  within a tenant, interactive invocations go before batch ones, each in
  arrival order. Whenever anything waits and a slot is free, something is
  admitted: the scheduler is work-conserving.
- **Lift.** A tenant that becomes backlogged starts at no less than the
  smallest counter among the backlogged tenants (or, when none is, the counter
  of the last tenant to leave the backlog), so idle time banks no credit.

With ``fairness="fcfs"`` the same queue admits in arrival order only (the
baseline the fairness benchmark compares against). Retried invocations go
first, and are not charged twice. The caller holds the substrate's lock; the
queue keeps no lock and no clock of its own.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from registry import ModelSpec
from runtime import Invocation, Result
from warmpool._book import Entry

Fairness = Literal["vtc", "fcfs"]
DEFAULT_TENANT = "default"
"""The tenant of invocations that name none (an embedded client's)."""

# Engine-side priority values: SGLang schedules larger values first unless it runs with
# --schedule-low-priority-values-first, when the pool sends them negated.
ENGINE_PRIORITY = {"interactive": 1, "batch": 0}

W = TypeVar("W", bound=Entry)


@dataclass(frozen=True)
class TokenWeights:
    """What one token costs a tenant's counter.

    Attributes:
        prompt: A prompt token computed by the engine.
        cached: A prompt token served from the engine's prefix cache.
        completion: A generated token.
    """

    prompt: float = 1.0
    cached: float = 0.5
    completion: float = 2.0


DEFAULT_WEIGHTS = TokenWeights()


def invocation_cost(result: Result, weights: TokenWeights = DEFAULT_WEIGHTS) -> float | None:
    """The service an invocation received, in token units; None when it reported no engine calls."""
    if not result.engine_calls:
        return None
    cost = 0.0
    for call in result.engine_calls:
        prompt = float(call.get("prompt_tokens") or 0)
        cached = min(prompt, float(call.get("cached_tokens") or 0))
        completion = float(call.get("completion_tokens") or 0)
        cost += weights.prompt * (prompt - cached) + weights.cached * cached + weights.completion * completion
    return cost


def engine_priority(invocation: Invocation, model: ModelSpec | None) -> int | None:
    """The ``priority`` to send with the invocation's engine requests, or None to send none.

    SGLang honours it only when launched with ``enable_priority_scheduling``, so it
    is sent to an SGLang engine only then (negated when the engine schedules low
    values first); the CPU engine accepts any priority and ignores it, so it
    always gets one.
    """
    if invocation.priority is None or model is None:
        return None
    value = ENGINE_PRIORITY[invocation.priority]
    if model.engine == "sglang":
        args = model.engine_args
        if not args.get("enable_priority_scheduling"):
            return None
        if args.get("schedule_low_priority_values_first"):
            value = -value
    return value


@dataclass
class _Tenant(Generic[W]):
    name: str
    weight: float = 1.0
    counter: float = 0.0
    served: float = 0.0  # token units actually charged from finished invocations
    admitted: int = 0
    inflight: int = 0  # dispatched and not finished
    estimate: float | None = None  # recent mean cost of one invocation
    # (arrival sequence, entry) per class: interactive first, then batch.
    queues: tuple[deque[tuple[int, W]], deque[tuple[int, W]]] = field(
        default_factory=lambda: (deque(), deque())
    )

    def trim(self) -> bool:
        """Drop finished entries at the heads; return whether anything waits."""
        for q in self.queues:
            while q and q[0][1].finished:
                q.popleft()
        return bool(self.queues[0] or self.queues[1])

    def head_seq(self) -> int:
        return min(q[0][0] for q in self.queues if q)


class FairQueue(Generic[W]):
    """The invocations waiting for one model version's engine slots (see the module docstring).

    Args:
        fairness: ``vtc`` (weighted Virtual Token Counter) or ``fcfs`` (arrival order).
        weights: What tokens cost.
        prior: The estimated cost of an invocation before any has finished.
        smoothing: Weight of the newest cost in a tenant's running estimate.
    """

    def __init__(
        self,
        fairness: Fairness = "vtc",
        *,
        weights: TokenWeights = DEFAULT_WEIGHTS,
        prior: float = 100.0,
        smoothing: float = 0.2,
    ) -> None:
        if fairness not in ("vtc", "fcfs"):
            raise ValueError(f"Unknown fairness policy {fairness!r}; expected 'vtc' or 'fcfs'.")
        self.fairness: Fairness = fairness
        self.weights = weights
        self._prior = prior
        self._smoothing = smoothing
        self._tenants: dict[str, _Tenant[W]] = {}
        self._seq = itertools.count()
        self._front = itertools.count(-1, -1)  # retries: before everything that arrived
        self._charged: dict[str, tuple[str, float]] = {}  # dispatched id -> (tenant, estimate)
        self._last_left = 0.0  # counter of the last tenant to leave the backlog

    # -- the queue ---------------------------------------------------------------------------
    def push(self, work: W, *, front: bool = False) -> None:
        """Queue ``work`` (``front``: a retry, ahead of everything else)."""
        inv = work.invocation
        tenant = self._tenant(inv.tenant)
        if inv.weight is not None:
            tenant.weight = inv.weight  # the latest admission carries the operator's current weight
        if not tenant.trim():
            self._lift(tenant)
        seq = next(self._front) if front else next(self._seq)
        q = tenant.queues[1 if inv.priority == "batch" else 0]
        if front:
            q.appendleft((seq, work))
        else:
            q.append((seq, work))

    def pop(self) -> W | None:
        """Take the next invocation to admit, charging its tenant's estimate; None when none waits."""
        backlogged = [t for t in self._tenants.values() if t.trim()]
        if not backlogged:
            return None
        if self.fairness == "fcfs":
            tenant = min(backlogged, key=lambda t: t.head_seq())
            q = min((q for q in tenant.queues if q), key=lambda q: q[0][0])
        else:
            # Ties (a tenant just lifted to another's counter) go to the one with less on the
            # engine: the counters already hold the estimates of what is in flight.
            tenant = min(backlogged, key=lambda t: (t.counter, t.inflight, t.head_seq()))
            q = tenant.queues[0] or tenant.queues[1]
        _, work = q.popleft()
        inv_id = work.invocation.id
        if inv_id not in self._charged:  # a retry was charged on its first dispatch
            estimate = self._estimate(tenant)
            self._charged[inv_id] = (tenant.name, estimate)
            tenant.counter += estimate / tenant.weight
            tenant.admitted += 1
            tenant.inflight += 1
        if not tenant.trim():
            self._last_left = tenant.counter
        return work

    def complete(self, work: W, result: Result) -> None:
        """Charge a finished invocation's actual cost in place of its estimate."""
        charged = self._charged.pop(work.invocation.id, None)
        if charged is None:
            return  # never dispatched from this queue
        tenant = self._tenant(charged[0])
        tenant.inflight -= 1
        cost = invocation_cost(result, self.weights)
        if cost is None:
            kind = result.error.kind if result.error is not None else None
            if kind in ("timeout", "cancelled", "worker_lost", "engine_lost"):
                return  # it may have used the engine without telling us how much: keep the estimate
            cost = 0.0
        else:
            tenant.estimate = (
                cost
                if tenant.estimate is None
                else (1 - self._smoothing) * tenant.estimate + self._smoothing * cost
            )
        tenant.served += cost
        tenant.counter += (cost - charged[1]) / tenant.weight

    def clear(self) -> list[W]:
        """Empty the queue; return the unfinished entries it held."""
        waiting = list(self)
        for tenant in self._tenants.values():
            for q in tenant.queues:
                q.clear()
        return waiting

    def __len__(self) -> int:
        """Entries queued (finished ones are dropped lazily, so this may count a few)."""
        return sum(len(q) for t in self._tenants.values() for q in t.queues)

    def __iter__(self) -> Iterator[W]:
        """The unfinished entries, tenant by tenant."""
        for tenant in list(self._tenants.values()):
            for q in tenant.queues:
                yield from (w for _, w in list(q) if not w.finished)

    def waiting(self) -> bool:
        """Whether an unfinished entry waits."""
        return any(t.trim() for t in self._tenants.values())

    def counter(self, tenant: str | None) -> float:
        """A tenant's virtual counter."""
        return self._tenant(tenant).counter

    def describe(self) -> dict[str, Any]:
        """The policy and, per tenant, weight, counter, waiting, admitted and served token units."""
        return {
            "policy": self.fairness,
            "tenants": {
                t.name: {
                    "weight": t.weight,
                    "counter": round(t.counter, 3),
                    "waiting": sum(1 for q in t.queues for _, w in q if not w.finished),
                    "admitted": t.admitted,
                    "inflight": t.inflight,
                    "served": round(t.served, 3),
                }
                for t in self._tenants.values()
            },
        }

    # -- counters ----------------------------------------------------------------------------
    def _tenant(self, name: str | None) -> _Tenant[W]:
        key = name or DEFAULT_TENANT
        tenant = self._tenants.get(key)
        if tenant is None:
            tenant = self._tenants[key] = _Tenant(key)
        return tenant

    def _lift(self, tenant: _Tenant[W]) -> None:
        """The lift rule: a tenant joining the backlog banks no credit from its idle time."""
        others = [t.counter for t in self._tenants.values() if t is not tenant and t.trim()]
        floor = min(others) if others else self._last_left
        tenant.counter = max(tenant.counter, floor)

    def _estimate(self, tenant: _Tenant[W]) -> float:
        if tenant.estimate is not None:
            return tenant.estimate
        known = [t.estimate for t in self._tenants.values() if t.estimate is not None]
        return sum(known) / len(known) if known else self._prior
