"""Fairness: two tenants share one batching engine; FCFS and weighted VTC side by side.

One CPU engine (the tiny offline Llama, ``--batch`` sequences per step) serves
one model version with ``max_inflight = --batch`` in the embedded local pool.
Invocations go straight to ``Pool.submit`` with their tenant set, the way the
service core sends them. Every phase runs for ``--seconds`` under
``fairness="fcfs"`` and under ``fairness="vtc"`` (``Pool.set_fairness``), the
two interleaved phase by phase on the same pool and engine (the order swapped
every repeat, so drifting machine load falls on both), ``--repeats`` times;
figures are medians over the repeats. Every phase uses fresh tenant names:

- ``baseline``: tenant A keeps exactly ``--batch`` long invocations
  (``--long-tokens`` generated) in the pool (closed loop: a new one when one
  finishes), so the engine is as busy as under the flood but nothing of A's
  waits; tenant B sends short invocations (``--short-tokens``) at
  ``--rate`` per second (open loop). B's latencies: submit to result.
- ``flood``: the same, but A keeps ``(--backlog + 1) x --batch`` in the pool:
  a backlog of ``--backlog`` times the engine's batch waits at all times.
- ``share 1:1``: A (long) and B (short) each keep ``--backlog/2 x --batch``
  waiting (closed loop), weights 1 and 1: both backlogged throughout.
- ``share 3:1``: the same with A's weight 3.

B's p50 counts a call still waiting when a phase ends with the time it had
waited then (a lower bound; FCFS leaves some); the finished-only p50 is
printed beside it. Service is counted from the tokens each finished
invocation's engine calls report, in VTC units (prompt tokens 1, generated tokens 2; the CPU engine has
no prefix cache), for invocations that finished inside the phase.

Goals (VTC): B's p50 in the flood <= 1.5x its p50 in the baseline; in
``share 1:1`` the service A and B received differs by no more than the VTC
bound ``2 x max_inflight x c_max`` (the paper's ``2 x (w_p L_in + w_q M)``
with a batch of ``max_inflight`` invocations of at most ``c_max`` units each,
``c_max`` measured); in ``share 3:1`` A/B comes out 3 within 10 %; the
engine's generated tokens per second in the flood >= 0.95x FCFS's. FCFS's
figures are printed beside each.

Run: ``.venv/bin/python -m benchmarks.fairness`` (about 3.5 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    Goal,
    ensure_repo_importable,
    exit_cleanly_on_sigterm,
    latency_summary,
    median,
    print_table,
    ratio,
    write_result,
)

ensure_repo_importable()

import httpx  # noqa: E402

import faas  # noqa: E402
from registry import FunctionSpec, ModelSpec, Registry  # noqa: E402
from runtime import LocalStore, Result, dumps  # noqa: E402
from warmpool import Pool  # noqa: E402

MODEL_NAME = "bench-fair-llama"
GOAL_LATENCY = 1.5
GOAL_SHARE = 0.10
GOAL_THROUGHPUT = 0.95
POLICIES = ("fcfs", "vtc")


def generate(model: faas.Model, prompt: str, n: int) -> int:
    """The benchmarked function: one greedy generate call of exactly ``n`` tokens."""
    out = model.generate(prompt, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    return int(out.completion_tokens)  # type: ignore[union-attr]


@dataclass
class Done:
    """One finished invocation."""

    tenant: str
    submitted: float
    finished: float
    prompt_tokens: int
    completion_tokens: int
    ok: bool

    @property
    def cost(self) -> float:
        return self.prompt_tokens + 2.0 * self.completion_tokens


@dataclass
class Load:
    """What one tenant sends in a phase: ``outstanding`` kept in the pool, or ``rate`` per second."""

    tenant: str
    tokens: int
    outstanding: int = 0
    rate: float = 0.0
    weight: float = 1.0
    prompt: str = "The quick brown fox"


@dataclass
class Phase:
    """A running phase: loads, what finished, what is still out."""

    pool: Pool
    spec: FunctionSpec
    model: ModelSpec
    loads: list[Load]
    done: list[Done] = field(default_factory=list)
    open_ids: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (tenant, submitted)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refill: queue.Queue[Load] = field(default_factory=queue.Queue)
    running: bool = True
    submitted: dict[str, int] = field(default_factory=dict)

    def submit(self, load: Load) -> None:
        inv = self.spec.invocation(
            dumps(((load.prompt, load.tokens), {})),
            model=self.model.ref,
            store=None,
            stage_threshold=None,
            tenant=load.tenant,
            weight=load.weight,
        )
        t0 = time.perf_counter()
        with self.lock:
            self.open_ids[inv.id] = (load.tenant, t0)
            self.submitted[load.tenant] = self.submitted.get(load.tenant, 0) + 1
        self.pool.submit(inv, self.spec, self.model, lambda r: self._finished(load, inv.id, t0, r))

    def _finished(self, load: Load, inv_id: str, t0: float, result: Result) -> None:
        t1 = time.perf_counter()
        prompt = sum(int(c.get("prompt_tokens") or 0) for c in result.engine_calls)
        completion = sum(int(c.get("completion_tokens") or 0) for c in result.engine_calls)
        with self.lock:
            self.open_ids.pop(inv_id, None)
            if self.running:
                self.done.append(Done(load.tenant, t0, t1, prompt, completion, result.ok))
        if self.running and load.outstanding:
            self.refill.put(load)  # closed loop: the driver thread sends the next one


def engine_stats(url: str | None) -> dict[str, float]:
    """The engine's own counters (``/server_info``): generated tokens, steps, busy seconds."""
    if url is None:
        return {}
    stats = httpx.get(url + "/server_info", timeout=10).json()["stats"]
    return {k: float(stats[k]) for k in ("tokens_generated", "steps", "busy_seconds")}


def engine_window(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """What the engine itself did in a phase's window: a profile beside the finished-call counts."""
    if not before or not after:
        return {}
    gen, steps, busy = (after[k] - before[k] for k in ("tokens_generated", "steps", "busy_seconds"))
    return {
        "engine_generated_tokens_per_s": gen / seconds,
        "engine_busy_fraction": busy / seconds,
        "engine_rows_per_step": gen / steps if steps else 0.0,
        "engine_generated_tokens_per_busy_s": gen / busy if busy else 0.0,
    }


def run_phase(
    pool: Pool,
    spec: FunctionSpec,
    model: ModelSpec,
    loads: list[Load],
    seconds: float,
    engine_url: str | None = None,
) -> dict[str, Any]:
    """Run ``loads`` for ``seconds``; cancel what is left; summarise per tenant."""
    phase = Phase(pool, spec, model, loads)
    before = engine_stats(engine_url)
    start = time.perf_counter()
    end = start + seconds
    for load in loads:
        for _ in range(load.outstanding):
            phase.submit(load)
    next_at = {load.tenant: start for load in loads if load.rate}
    while (now := time.perf_counter()) < end:
        for load in loads:
            if load.rate and now >= next_at[load.tenant]:
                phase.submit(load)
                next_at[load.tenant] += 1 / load.rate
        wake = min([end, *next_at.values()])
        with contextlib.suppress(queue.Empty):
            phase.submit(phase.refill.get(timeout=max(0.0, wake - time.perf_counter())))
    with phase.lock:
        phase.running = False
        left = dict(phase.open_ids)
        ended = time.perf_counter()
    window = engine_window(before, engine_stats(engine_url), ended - start)
    # A call still waiting at the end has waited at least this long (a lower bound on its latency).
    waited = {t: [ended - t0 for tenant, t0 in left.values() if tenant == t] for t in phase.submitted}
    for inv_id in left:
        pool.cancel(inv_id)
    deadline = time.monotonic() + 120
    while True:  # the next phase starts on an idle engine
        m = pool.status()["models"][model.ref]
        if m["inflight"] == 0 and m["queue_depth"] == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not drain after the phase")
        time.sleep(0.05)
    fairness = pool.status()["models"][model.ref]["fairness"]
    out = summarise(phase.done, loads, seconds, model.max_inflight, fairness, phase.submitted, waited)
    out.update(window)
    return out


def summarise(
    done: list[Done],
    loads: list[Load],
    seconds: float,
    max_inflight: int,
    fairness: dict[str, Any],
    submitted: dict[str, int],
    waited: dict[str, list[float]],
) -> dict[str, Any]:
    """Per tenant: calls finished, service in VTC units, tokens, latencies; the VTC bound."""
    failed = [d for d in done if not d.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} invocations failed during the phase")
    out: dict[str, Any] = {"seconds": seconds, "tenants": {}, "fairness": fairness}
    for load in loads:
        mine = [d for d in done if d.tenant == load.tenant]
        out["tenants"][load.tenant] = {
            "weight": load.weight,
            "tokens_per_call": load.tokens,
            "finished": len(mine),
            "service": sum(d.cost for d in mine),
            "prompt_tokens": sum(d.prompt_tokens for d in mine),
            "generated_tokens": sum(d.completion_tokens for d in mine),
            "latency": latency_summary([d.finished - d.submitted for d in mine]),
            # Unfinished calls counted with the time they had waited when the phase ended.
            "latency_with_unfinished": latency_summary(
                [d.finished - d.submitted for d in mine] + waited.get(load.tenant, [])
            ),
            "unfinished": len(waited.get(load.tenant, [])),
        }
    out["generated_tokens_per_s"] = sum(d.completion_tokens for d in done) / seconds
    out["submitted"] = dict(submitted)
    c_max = max((d.cost for d in done), default=0.0)
    out["c_max"] = c_max
    out["vtc_bound"] = 2 * max_inflight * c_max
    return out


def plan(args: argparse.Namespace, tag: str) -> dict[str, list[Load]]:
    """The phases' loads; tenant names carry ``tag`` so every phase starts with fresh counters."""
    b, half = args.batch, args.backlog * args.batch // 2
    short = "Once upon a time"
    return {
        "baseline": [
            Load(f"a-base-{tag}", args.long_tokens, outstanding=b),
            Load(f"b-base-{tag}", args.short_tokens, rate=args.rate, prompt=short),
        ],
        "flood": [
            Load(f"a-flood-{tag}", args.long_tokens, outstanding=(args.backlog + 1) * b),
            Load(f"b-flood-{tag}", args.short_tokens, rate=args.rate, prompt=short),
        ],
        "share 1:1": [
            Load(f"a-1to1-{tag}", args.long_tokens, outstanding=half),
            Load(f"b-1to1-{tag}", args.short_tokens, outstanding=half, prompt=short),
        ],
        "share 3:1": [
            Load(f"a-3to1-{tag}", args.long_tokens, outstanding=half, weight=3.0),
            Load(f"b-3to1-{tag}", args.short_tokens, outstanding=half, prompt=short),
        ],
    }


def run_all(args: argparse.Namespace, store: Path, spec: FunctionSpec, model: ModelSpec) -> dict[str, Any]:
    """Every phase under both policies, interleaved on one pool and engine, ``--repeats`` times.

    The policies alternate phase by phase (FCFS first in even repeats, VTC first in
    odd ones), so drifting load on the machine falls on both alike.
    """
    t0 = time.perf_counter()
    pool = Pool(LocalStore(store), workers=args.workers)
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in POLICIES}
    try:
        pool.start(models=[model])
        url = pool.engine_url(model)
        print(f"[fairness] engine ready in {time.perf_counter() - t0:.1f} s")
        # Warm-up: the engine's first batches and the workers' imports.
        run_phase(pool, spec, model, [Load("warm", args.long_tokens, outstanding=2 * args.batch)], 3.0)
        for rep in range(args.repeats):
            order = POLICIES if rep % 2 == 0 else tuple(reversed(POLICIES))
            phases: dict[str, dict[str, Any]] = {policy: {} for policy in POLICIES}
            for name in ("baseline", "flood", "share 1:1", "share 3:1"):
                for policy in order:
                    pool.set_fairness(policy)  # type: ignore[arg-type]
                    loads = plan(args, f"{policy}{rep}")[name]
                    phases[policy][name] = out = run_phase(pool, spec, model, loads, args.seconds, url)
                    a, b = (out["tenants"][load.tenant] for load in loads)
                    print(
                        f"[fairness] #{rep} {policy} {name}: A {a['finished']} calls / {a['service']:.0f} "
                        f"units, B {b['finished']} calls / {b['service']:.0f} units, "
                        f"B p50 {b['latency_with_unfinished']['p50_ms']:.0f} ms, "
                        f"{out['generated_tokens_per_s']:.0f} generated tok/s "
                        f"(engine: {out['engine_generated_tokens_per_s']:.0f} tok/s, busy "
                        f"{out['engine_busy_fraction']:.0%}, {out['engine_rows_per_step']:.2f} rows/step)"
                    )
            for policy in POLICIES:
                runs[policy].append(phases[policy])
    finally:
        pool.shutdown()
    return runs


def figures(phases: dict[str, Any]) -> dict[str, float]:
    """The acceptance figures of one policy's phases."""

    def tenants(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        a, b = phases[name]["tenants"].values()
        return a, b

    _, b_base = tenants("baseline")
    _, b_flood = tenants("flood")
    a11, b11 = tenants("share 1:1")
    a31, b31 = tenants("share 3:1")
    share31 = ratio(a31["service"], b31["service"])
    base = b_base["latency_with_unfinished"]["p50_ms"]
    flood = b_flood["latency_with_unfinished"]["p50_ms"]
    return {
        "b_p50_baseline_ms": base,
        "b_p50_flood_ms": flood,
        "b_p50_flood_over_baseline": ratio(flood, base),
        "b_p50_flood_finished_only_ms": b_flood["latency"]["p50_ms"],
        "b_flood_unfinished": float(b_flood["unfinished"]),
        "share11_difference": abs(a11["service"] - b11["service"]),
        "share11_bound": phases["share 1:1"]["vtc_bound"],
        "share11_a_over_b": ratio(a11["service"], b11["service"]),
        "share31_a_over_b": share31,
        "share31_error": abs(share31 / 3.0 - 1.0),
        "flood_generated_tokens_per_s": phases["flood"]["generated_tokens_per_s"],
        # The profile: what the engine itself did in the flood's window.
        "flood_engine_generated_tokens_per_s": phases["flood"]["engine_generated_tokens_per_s"],
        "flood_engine_busy_fraction": phases["flood"]["engine_busy_fraction"],
        "flood_engine_rows_per_step": phases["flood"]["engine_rows_per_step"],
        "flood_engine_tokens_per_busy_s": phases["flood"]["engine_generated_tokens_per_busy_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="engine batch = the model's max_inflight")
    parser.add_argument("--backlog", type=int, default=10, help="A's waiting backlog, in engine batches")
    parser.add_argument("--long-tokens", type=int, default=64, help="tokens each of A's calls generates")
    parser.add_argument("--short-tokens", type=int, default=4, help="tokens each of B's calls generates")
    parser.add_argument("--rate", type=float, default=3.0, help="B's calls per second in baseline and flood")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every phase and policy (medians)")
    parser.add_argument("--workers", type=int, default=2, help="pool worker processes")
    parser.add_argument("--engine-threads", type=int, default=1, help="torch threads of the engine")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--name", default="fairness", help="result name")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    print(f"[fairness] {os.cpu_count()} CPUs, load average {os.getloadavg()} (other work skews every row)")

    from runtime import bundle_function, digest_of
    from warmpool.cpu_engine._tiny_model import ensure_tiny_model

    model_path = str(ensure_tiny_model())
    root = Path(tempfile.mkdtemp(prefix="faas-bench-fair-"))
    try:
        store = root / "store"
        registry = Registry(LocalStore(store))
        artifact = dumps(bundle_function(generate))
        spec = registry.register_function(
            artifact,
            FunctionSpec(name="bench.fair", digest=digest_of(artifact), model_param="model", timeout=600),
        )
        model = ModelSpec(
            name=MODEL_NAME,
            engine="cpu",
            model_path=model_path,
            engine_args={"max_batch_size": args.batch, "threads": args.engine_threads},
            min_replicas=1,
            max_inflight=args.batch,
            max_queue=100_000,
            idle_timeout=None,
        )
        registry.register_model(model)
        runs = run_all(args, store, spec, model)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    per_run = {policy: [figures(phases) for phases in runs[policy]] for policy in POLICIES}
    figs = {
        policy: {k: median([f[k] for f in per_run[policy]]) for k in per_run[policy][0]}
        for policy in POLICIES
    }
    rows = [
        [
            name,
            figs["fcfs"][key],
            figs["vtc"][key],
        ]
        for name, key in (
            ("B p50 baseline (ms)", "b_p50_baseline_ms"),
            ("B p50 under A's flood (ms)", "b_p50_flood_ms"),
            ("B p50 flood / baseline", "b_p50_flood_over_baseline"),
            ("B p50 under flood, finished only (ms)", "b_p50_flood_finished_only_ms"),
            ("B calls unfinished at flood's end", "b_flood_unfinished"),
            ("1:1 |A - B| service (units)", "share11_difference"),
            ("1:1 VTC bound (units)", "share11_bound"),
            ("1:1 A / B service", "share11_a_over_b"),
            ("3:1 A / B service", "share31_a_over_b"),
            ("flood generated tok/s", "flood_generated_tokens_per_s"),
            ("flood: engine's own generated tok/s", "flood_engine_generated_tokens_per_s"),
            ("flood: engine busy fraction", "flood_engine_busy_fraction"),
            ("flood: engine rows per step", "flood_engine_rows_per_step"),
            ("flood: engine tok/s while busy", "flood_engine_tokens_per_busy_s"),
        )
    ]
    print_table(
        f"fairness: engine batch {args.batch}, A {args.long_tokens} tokens/call with a backlog of "
        f"{args.backlog} batches, B {args.short_tokens} tokens/call at {args.rate}/s, "
        f"{args.seconds} s phases",
        ["figure", "fcfs", "vtc"],
        rows,
    )
    v = figs["vtc"]
    goals = [
        Goal("VTC: B p50 flood / baseline", v["b_p50_flood_over_baseline"], "<=", GOAL_LATENCY, "x"),
        Goal("VTC 1:1: |A - B| service", v["share11_difference"], "<=", v["share11_bound"], " units"),
        Goal("VTC 3:1: |(A/B) / 3 - 1|", v["share31_error"], "<=", GOAL_SHARE),
        Goal(
            "VTC / FCFS generated tok/s (flood)",
            ratio(v["flood_generated_tokens_per_s"], figs["fcfs"]["flood_generated_tokens_per_s"]),
            ">=",
            GOAL_THROUGHPUT,
            "x",
        ),
    ]
    # Each repeat ran its two flood phases back to back: their ratio shows the spread.
    paired = [
        ratio(v_run["flood_generated_tokens_per_s"], f_run["flood_generated_tokens_per_s"])
        for f_run, v_run in zip(per_run["fcfs"], per_run["vtc"], strict=True)
    ]
    print("\nVTC / FCFS flood tok/s per repeat: " + ", ".join(f"{r:.2f}x" for r in paired))
    print("\ngoals:")
    for g in goals:
        print(g.line())
    path = write_result(
        args.name,
        {
            "config": {k: getattr(args, k) for k in vars(args)},
            "figures": figs,
            "figures_per_repeat": per_run,
            "flood_throughput_ratio_per_repeat": paired,
            "phases": runs,
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 1 if args.check and not all(g.met for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
