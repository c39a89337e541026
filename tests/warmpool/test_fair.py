"""The fair queue (weighted VTC) on its own: deterministic, no engine, no clock, no sleeping."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from registry import FunctionSpec, ModelSpec
from runtime import Invocation, LocalStore, Result, error_info, new_id
from runtime._errors import InvocationTimeout
from warmpool import Pool
from warmpool._book import Entry
from warmpool._fair import FairQueue, engine_priority, invocation_cost

SPEC = FunctionSpec(name="f", digest="0" * 64)


def entry(tenant: str | None, *, weight: float | None = None, priority: str | None = None) -> Entry:
    inv = Invocation(
        id=new_id(),
        function_name="f",
        function_digest="0" * 64,
        args=b"",
        tenant=tenant,
        weight=weight,
        priority=priority,  # type: ignore[arg-type]
    )
    return Entry(inv, SPEC, None, lambda _r: None)


def result_for(work: Entry, prompt: int, completion: int, cached: int = 0) -> Result:
    call = {"path": "/generate", "prompt_tokens": prompt, "completion_tokens": completion}
    if cached:
        call["cached_tokens"] = cached
    return Result(invocation_id=work.invocation.id, engine_calls=[call])


def tenant_of(work: Entry | None) -> str | None:
    assert work is not None
    return work.invocation.tenant


def test_invocation_cost_weighs_generated_tokens_twice_and_cached_prompt_tokens_half() -> None:
    work = entry("a")
    assert invocation_cost(result_for(work, 10, 5)) == 10 + 2 * 5
    assert invocation_cost(result_for(work, 10, 5, cached=4)) == 6 + 0.5 * 4 + 2 * 5
    assert invocation_cost(Result(invocation_id="x")) is None


def test_smallest_counter_goes_next_and_finishing_charges_the_actual_cost() -> None:
    q: FairQueue[Entry] = FairQueue(prior=10.0)
    a1, a2, b1 = entry("a"), entry("a"), entry("b")
    for w in (a1, a2, b1):
        q.push(w)
    assert q.pop() is a1  # equal counters: the oldest waiting invocation
    assert q.counter("a") == 10.0  # charged the estimate at dispatch
    assert q.pop() is b1  # b's counter (0) is now the smallest
    q.complete(a1, result_for(a1, 100, 50))  # a's real cost: 200 token units
    assert q.counter("a") == 200.0
    q.complete(b1, result_for(b1, 2, 1))
    assert q.counter("b") == 4.0
    assert q.pop() is a2  # the only one waiting: work-conserving whatever the counters


def test_lift_rule_idle_time_banks_no_credit() -> None:
    q: FairQueue[Entry] = FairQueue(prior=1.0)
    flood = [entry("a") for _ in range(20)]
    for w in flood:
        q.push(w)
    for _ in range(10):  # a runs alone for a while, and is charged for it
        w = q.pop()
        assert w is not None
        q.complete(w, result_for(w, 10, 10))
    assert q.counter("a") == pytest.approx(300.0)
    running = [q.pop(), q.pop()]  # two of a's on the engine, charged their estimates
    assert q.counter("a") == pytest.approx(360.0)
    late = entry("b")
    q.push(late)
    assert q.counter("b") == q.counter("a")  # lifted to the backlogged minimum, not 0
    # The tie goes to b, which has nothing on the engine: b waits for no more of a's calls.
    assert q.pop() is late
    assert all(tenant_of(w) == "a" for w in running)
    # A tenant that comes back after everyone drained starts at the last one's counter.
    q2: FairQueue[Entry] = FairQueue(prior=5.0)
    first = entry("a")
    q2.push(first)
    assert q2.pop() is first
    q2.push(entry("b"))
    assert q2.counter("b") == 5.0


def test_a_tenant_that_was_served_more_keeps_its_higher_counter_when_it_returns() -> None:
    q: FairQueue[Entry] = FairQueue(prior=1.0)
    b_work = entry("b")
    q.push(b_work)
    assert q.pop() is b_work
    q.complete(b_work, result_for(b_work, 100, 100))  # b: 300
    q.push(entry("a"))
    q.push(entry("b"))
    assert q.counter("b") == 300.0 and q.counter("a") == pytest.approx(1.0)
    assert tenant_of(q.pop()) == "a"


def simulate(
    q: FairQueue[Entry], costs: dict[str, tuple[int, int]], slots: int, steps: int
) -> dict[str, float]:
    """A fake engine with ``slots`` in flight, finishing the oldest each step; both tenants stay backlogged.

    Returns the token units served per tenant; checks the VTC bound at every step.
    """
    served = dict.fromkeys(costs, 0.0)
    inflight: deque[Entry] = deque()
    weights = {t: q._tenant(t).weight for t in costs}
    c_max = max(p + 2 * c for p, c in costs.values())
    for _ in range(steps):
        for tenant, weight in weights.items():
            while sum(1 for w in q if w.invocation.tenant == tenant) < 3 * slots:
                q.push(entry(tenant, weight=weight))
        while len(inflight) < slots:
            w = q.pop()
            assert w is not None
            inflight.append(w)
        done = inflight.popleft()
        prompt, completion = costs[done.invocation.tenant or ""]
        q.complete(done, result_for(done, prompt, completion))
        served[done.invocation.tenant or ""] += prompt + 2 * completion
        a, b = (served[t] / weights[t] for t in costs)
        assert abs(a - b) <= 2 * slots * c_max  # the paper's bound, with a batch of `slots`
    return served


def test_equal_weights_give_equal_tokens_not_equal_requests() -> None:
    q: FairQueue[Entry] = FairQueue()
    for t in ("a", "b"):
        q.push(entry(t, weight=1.0))
    served = simulate(q, {"a": (10, 64), "b": (10, 4)}, slots=8, steps=3000)
    assert served["a"] == pytest.approx(served["b"], rel=0.05)
    described = q.describe()["tenants"]
    assert described["b"]["admitted"] > 5 * described["a"]["admitted"]  # many more of b's short ones


def test_weights_three_to_one() -> None:
    q: FairQueue[Entry] = FairQueue()
    q.push(entry("a", weight=3.0))
    q.push(entry("b", weight=1.0))
    served = simulate(q, {"a": (10, 20), "b": (10, 20)}, slots=8, steps=4000)
    assert served["a"] / served["b"] == pytest.approx(3.0, rel=0.05)


def test_interactive_goes_before_batch_within_a_tenant_but_not_across_tenants() -> None:
    q: FairQueue[Entry] = FairQueue(prior=10.0)
    a_batch, a_inter = entry("a", priority="batch"), entry("a", priority="interactive")
    a_plain = entry("a")  # no priority: interactive
    q.push(a_batch)
    q.push(a_inter)
    q.push(a_plain)
    assert q.pop() is a_inter
    assert q.pop() is a_plain
    b_batch = entry("b", priority="batch")
    q.push(b_batch)  # lifted to a's counter (20)
    assert q.counter("b") == q.counter("a")
    assert q.pop() is b_batch  # tie: a has two on the engine, b none
    assert q.pop() is a_batch


def test_fcfs_admits_in_arrival_order_across_tenants_and_priorities() -> None:
    q: FairQueue[Entry] = FairQueue("fcfs")
    works = [entry("a", priority="batch"), entry("b"), entry("a", priority="interactive"), entry("b")]
    for w in works:
        q.push(w)
    assert [q.pop() for _ in works] == works
    assert q.pop() is None


def test_retries_go_first_within_their_tenant_and_are_charged_once() -> None:
    q: FairQueue[Entry] = FairQueue(prior=10.0)
    first, second = entry("a"), entry("a")
    q.push(first)
    q.push(second)
    assert q.pop() is first
    assert q.counter("a") == 10.0
    q.push(first, front=True)  # its worker died: run it again, ahead of the tenant's others
    assert q.pop() is first
    assert q.counter("a") == 10.0  # not charged a second estimate
    q.complete(first, result_for(first, 5, 0))
    assert q.counter("a") == 5.0
    assert q.pop() is second


def test_finished_entries_are_skipped_and_not_counted_as_backlog() -> None:
    q: FairQueue[Entry] = FairQueue()
    gone, kept = entry("a"), entry("a")
    q.push(gone)
    q.push(kept)
    gone.finished = True  # cancelled while queued
    assert list(q) == [kept]
    assert q.pop() is kept
    assert not q.waiting() and q.pop() is None
    assert q.clear() == []


def test_a_timed_out_invocation_keeps_its_estimate_and_a_failed_one_without_calls_costs_nothing() -> None:
    q: FairQueue[Entry] = FairQueue(prior=10.0)
    slow, broken = entry("a"), entry("a")
    q.push(slow)
    q.push(broken)
    assert q.pop() is slow and q.pop() is broken
    timeout = Result(invocation_id=slow.invocation.id, error=error_info(InvocationTimeout("late"), "timeout"))
    q.complete(slow, timeout)
    assert q.counter("a") == 20.0
    failed = Result(invocation_id=broken.invocation.id, error=error_info(ValueError("bad"), "user"))
    q.complete(broken, failed)
    assert q.counter("a") == 10.0
    q.complete(broken, failed)  # a second answer changes nothing
    assert q.counter("a") == 10.0


def test_the_engine_gets_the_priority_only_where_it_schedules_by_it() -> None:
    inter = entry("a", priority="interactive").invocation
    batch = entry("a", priority="batch").invocation
    cpu = ModelSpec(name="m")
    plain = ModelSpec(name="m", engine="sglang")
    prio = ModelSpec(name="m", engine="sglang", engine_args={"enable_priority_scheduling": True})
    low_first = ModelSpec(
        name="m",
        engine="sglang",
        engine_args={"enable_priority_scheduling": True, "schedule_low_priority_values_first": True},
    )
    assert engine_priority(inter, cpu) == 1 and engine_priority(batch, cpu) == 0
    assert engine_priority(entry("a").invocation, cpu) is None
    assert engine_priority(inter, plain) is None
    assert engine_priority(inter, prio) == 1 and engine_priority(batch, prio) == 0
    assert engine_priority(inter, low_first) == -1 and engine_priority(batch, low_first) == 0
    assert engine_priority(inter, None) is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown fairness policy"):
        FairQueue("lottery")  # type: ignore[arg-type]


def test_a_pool_switches_every_models_policy(tmp_path: Path) -> None:
    pool = Pool(LocalStore(tmp_path / "store"), tick_interval=None, status_interval=None)
    try:
        mp = pool._model_pool(ModelSpec(name="m"))
        assert mp.queue.fairness == "vtc"
        pool.set_fairness("fcfs")
        assert mp.queue.fairness == "fcfs"
        assert pool._model_pool(ModelSpec(name="n")).queue.fairness == "fcfs"  # and models added later
        with pytest.raises(ValueError, match="Unknown fairness policy"):
            pool.set_fairness("lottery")  # type: ignore[arg-type]
    finally:
        pool.shutdown()
