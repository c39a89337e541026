"""Multiplexing: many concurrent invocations share one batching engine.

64 invocations, each generating 32 tokens greedily (EOS ignored) from the tiny
offline Llama, measured three ways (each ``--repeats`` times, median reported):

- ``pool``: 64 concurrent invocations through the embedded pool (public API:
  ``@faas.function(model=...)`` + ``faas.Client``) of a function that calls
  ``model.generate(prompt, {"max_new_tokens": 32, "temperature": 0,
  "ignore_eos": True})``. The pool starts the one engine replica (the CPU
  engine, ``warmpool.cpu_engine._engine``) and keeps it warm.
- ``direct``: 64 concurrent HTTP requests (one thread each, one keep-alive httpx client) to
  the same engine's ``/generate``: the engine's own throughput, no pool.
- ``exclusive``: ``--exclusive-workers`` (2) processes, each holding the model
  in plain transformers (float32, one torch thread) and running one invocation
  at a time (``model.generate``, greedy, 32 new tokens, ``min_new_tokens=32``)
  over the same 64 prompts split between them: how a Globus Compute worker
  runs model calls when the model lives inside the worker.
- ``globus-compute substrate``: the same invocations through
  ``faas.Client(substrate="globus-compute")``: a GlobusComputeEngine block
  (LocalProvider) starts its own engine with the same arguments and
  ``--invocations`` HTEX workers run the invocations as tasks against it (run
  alone, after the other rows; ``--skip-globus-compute`` leaves it out).

The engine's mean batch size during the pool runs comes from ``/server_info``
stats deltas (tokens generated / forward steps).

Goals: pool/direct >= 0.9 and pool/exclusive >= 10.

Run: ``.venv/bin/python -m benchmarks.multiplex`` (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    Goal,
    ensure_repo_importable,
    exit_cleanly_on_sigterm,
    median,
    print_table,
    ratio,
    write_result,
)

ensure_repo_importable()

import faas  # noqa: E402

GOAL_VS_DIRECT = 0.9
GOAL_VS_EXCLUSIVE = 10.0
MODEL_NAME = "bench-tiny-llama"


def prompts_for(n: int) -> list[str]:
    """``n`` prompts cycling through the tiny model's known completions."""
    from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

    keys = list(KNOWN_COMPLETIONS)
    return [keys[i % len(keys)] for i in range(n)]


def sampling(max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User+system CPU seconds so far of each group of processes (Linux ``/proc``; all threads)."""
    out: dict[str, float] = {}
    for group, members in pids.items():
        total = 0.0
        for pid in members:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _TICK
            except (OSError, IndexError, ValueError):
                pass
        out[group] = total
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    delta["total"] = sum(delta.values())
    return delta


# -- exclusive-worker baseline -----------------------------------------------------------


def _exclusive_worker(
    conn: Any, model_path: str, device: str, threads: int, max_new_tokens: int, index: int
) -> None:
    """One worker that holds the model and runs one invocation at a time (spawned)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def invoke(prompt: str) -> int:
        ids = tok(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # ignore EOS, as the engine runs do
                do_sample=False,
                pad_token_id=pad,
            )
        return int(out.shape[1] - ids["input_ids"].shape[1])

    invoke("The quick brown")  # warm-up
    conn.send({"ready": True, "load_seconds": time.perf_counter() - t0, "pid": os.getpid()})
    while True:
        prompts = conn.recv()
        if prompts is None:
            break
        t = time.perf_counter()
        tokens = sum(invoke(p) for p in prompts)
        if device == "cuda":
            torch.cuda.synchronize()
        conn.send({"tokens": tokens, "seconds": time.perf_counter() - t, "worker": index})
    conn.close()


def run_exclusive(args: argparse.Namespace, model_path: str, prompts: list[str]) -> dict[str, Any]:
    """Tokens/s of ``--exclusive-workers`` processes each running one invocation at a time."""
    ctx = multiprocessing.get_context("spawn")
    workers = []
    t0 = time.perf_counter()
    for i in range(args.exclusive_workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_exclusive_worker,
            args=(child, model_path, args.device, 1, args.max_new_tokens, i),
            daemon=True,
        )
        proc.start()
        child.close()
        workers.append((proc, parent))
    try:
        ready = [conn.recv() for _, conn in workers]
        load_seconds = time.perf_counter() - t0
        pids = {"workers": [int(r["pid"]) for r in ready]}
        runs = []
        for _ in range(args.repeats):
            shares = [prompts[i :: len(workers)] for i in range(len(workers))]
            cpu0 = cpu_seconds(pids)
            t = time.perf_counter()
            for (_, conn), share in zip(workers, shares, strict=True):
                conn.send(share)
            answers = [conn.recv() for _, conn in workers]
            elapsed = time.perf_counter() - t
            cpu = cpu_delta(cpu0, cpu_seconds(pids))
            tokens = sum(a["tokens"] for a in answers)
            rate = tokens / elapsed
            runs.append({"tokens": tokens, "seconds": elapsed, "tokens_per_s": rate, "cpu_s": cpu})
            print(
                f"[multiplex] exclusive: {tokens} tokens in {elapsed:.2f} s = {rate:.0f} tok/s, "
                f"CPU s: workers {cpu['workers']:.2f}"
            )
    finally:
        for _, conn in workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _ in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return {
        "workers": args.exclusive_workers,
        "torch_threads_per_worker": 1,
        "start_seconds": load_seconds,
        "worker_load_seconds": [r["load_seconds"] for r in ready],
        "runs": runs,
        "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
        "cpu_s_per_run": median([r["cpu_s"]["total"] for r in runs]),
    }


# -- pool and direct ---------------------------------------------------------------------


def server_stats(url: str) -> dict[str, Any]:
    import httpx

    return dict(httpx.get(f"{url}/server_info", timeout=30).json().get("stats") or {})


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Forward steps, rows stepped and the mean batch size between two ``/server_info`` stats."""

    def rows(s: dict[str, Any]) -> float:
        if "tokens_generated" in s:  # one token per row per step
            return float(s["tokens_generated"])
        return float(s.get("mean_batch_size", 0.0)) * float(s.get("steps", 0))

    steps = int(after.get("steps", 0)) - int(before.get("steps", 0))
    stepped = rows(after) - rows(before)
    return {
        "steps": steps,
        "rows_stepped": round(stepped),
        "mean_batch_size": stepped / steps if steps else float("nan"),
        "max_batch_size_seen": after.get("max_batch_size_seen"),
        # HTTP requests that reached the engine's work routes (the pool's workers batch theirs).
        "requests": int(after.get("generate_requests", 0)) - int(before.get("generate_requests", 0)),
    }


class Direct:
    """Concurrent requests straight to the engine: one thread per request, shared keep-alive client.

    Threads rather than asyncio: with ``httpx.AsyncClient`` on reused keep-alive
    connections the requests left the client about 15 ms apart here (measured
    with httpx's trace hooks), so the engine saw a mean batch of 5-8 instead of
    ~60; one thread per request with a sync ``httpx.Client`` (what the pool's
    ``Model`` handle uses) is the stronger baseline.
    """

    def __init__(self, url: str, concurrency: int) -> None:
        import concurrent.futures

        import httpx

        self.url = url
        self.client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.threads = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="direct")

    def run(self, prompts: list[str], params: dict[str, Any]) -> int:
        def one(prompt: str) -> int:
            r = self.client.post("/generate", json={"text": prompt, "sampling_params": params})
            r.raise_for_status()
            return int(r.json()["meta_info"]["completion_tokens"])

        return sum(self.threads.map(one, prompts))

    def close(self) -> None:
        self.threads.shutdown()
        self.client.close()


def generate(model: faas.Model, prompt: str, params: dict[str, Any]) -> int:
    """The benchmarked function: one generate call; returns the tokens it produced."""
    return int(model.generate(prompt, params).completion_tokens)


def bench_model(args: argparse.Namespace, model_path: str) -> tuple[faas.ModelSpec, dict[str, Any]]:
    """The benchmarked model version (one replica, kept warm) and its engine arguments."""
    engine_args: dict[str, Any] = {"device": args.device, "max_batch_size": args.max_batch_size}
    if args.engine_threads:
        engine_args["threads"] = args.engine_threads
    spec = faas.ModelSpec(
        name=MODEL_NAME,
        version="1",
        engine="cpu",
        model_path=model_path,
        engine_args=engine_args,
        min_replicas=1,
        max_replicas=1,
        max_inflight=max(64, args.invocations),
        idle_timeout=None,
    )
    return spec, engine_args


def run_pool_and_direct(args: argparse.Namespace, model_path: str, prompts: list[str]) -> dict[str, Any]:
    """Start the pool (and its one engine replica); alternate pool and direct runs on that engine."""

    params = sampling(args.max_new_tokens)
    spec, engine_args = bench_model(args, model_path)

    store = tempfile.mkdtemp(prefix="faas-bench-store-")
    client = faas.Client(store=Path(store).as_uri(), workers=args.workers)
    fn = faas.function(model=f"{MODEL_NAME}@1", name="bench.generate", timeout=600)(generate).with_client(
        client
    )
    direct: Direct | None = None
    try:
        client.registry.register_model(spec)
        t0 = time.perf_counter()
        url = client.pool.engine_url(spec)
        engine_start = time.perf_counter() - t0
        print(f"[multiplex] engine ready at {url} in {engine_start:.1f} s ({engine_args})")
        direct = Direct(url, args.invocations)
        [replica] = client.pool.replicas()

        def pool_run() -> int:
            futures = [fn.submit(p, params) for p in prompts]
            return sum(f.result(timeout=600) for f in futures)

        def direct_run() -> int:
            assert direct is not None
            return direct.run(prompts, params)

        # Warm-up: connections, worker imports, the engine's first batches.
        pool_run()
        direct_run()
        out: dict[str, list[dict[str, Any]]] = {"pool": [], "direct": []}
        for _ in range(args.repeats):
            for name, run in (("pool", pool_run), ("direct", direct_run)):
                settle = getattr(client, "flush_records", None)
                if settle is not None:
                    settle(600)  # records of the last run must not compete with this one
                pids = {
                    "client": [os.getpid()],
                    "workers": client.pool.worker_pids(),
                    "engine": [replica.host.pid] if replica.host.pid else [],
                }
                before = server_stats(url)
                cpu0 = cpu_seconds(pids)
                t = time.perf_counter()
                tokens = run()
                elapsed = time.perf_counter() - t
                delta = stats_delta(before, server_stats(url))
                if settle is not None:
                    settle(600)  # the CPU this run's records cost counts, their write time does not
                cpu = cpu_delta(cpu0, cpu_seconds(pids))
                expected = len(prompts) * args.max_new_tokens
                if tokens != expected:
                    raise RuntimeError(f"{name}: {tokens} tokens generated, expected {expected}")
                out[name].append(
                    {
                        "tokens": tokens,
                        "seconds": elapsed,
                        "tokens_per_s": tokens / elapsed,
                        "engine": delta,
                        "cpu_s": cpu,
                    }
                )
                print(
                    f"[multiplex] {name}: {tokens} tokens in {elapsed:.3f} s = {tokens / elapsed:.0f} tok/s, "
                    f"engine mean batch {delta['mean_batch_size']:.1f} over {delta['steps']} steps, "
                    f"{delta['requests']} engine requests, "
                    f"CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                )
        server_info: dict[str, Any] = {}
        try:
            import httpx

            server_info = httpx.get(f"{url}/server_info", timeout=30).json()
        except Exception:
            pass
    finally:
        if direct is not None:
            direct.close()
        client.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    result: dict[str, Any] = {"engine_start_seconds": engine_start, "engine_args": engine_args}
    for name, runs in out.items():
        result[name] = {
            "runs": runs,
            "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
            "mean_batch_size": median([r["engine"]["mean_batch_size"] for r in runs]),
            "cpu_s_per_run": {k: median([r["cpu_s"][k] for r in runs]) for k in runs[0]["cpu_s"]},
        }
    result["pool"]["workers"] = args.workers
    keys = ("version", "device", "threads", "startup", "stats")
    result["server_info"] = {k: server_info.get(k) for k in keys}
    return result


def run_globus_compute(args: argparse.Namespace, model_path: str, prompts: list[str]) -> dict[str, Any]:
    """The same invocations on the ``globus-compute`` substrate: a GlobusComputeEngine block runs the engine.

    The block (LocalProvider, 127.0.0.1) starts its node-local CPU engine with
    the same arguments; ``--invocations`` HTEX workers run the invocations as
    Globus Compute tasks against it.
    """

    params = sampling(args.max_new_tokens)
    spec, _ = bench_model(args, model_path)

    store = tempfile.mkdtemp(prefix="faas-bench-store-")
    client = faas.Client(
        store=Path(store).as_uri(),
        substrate="globus-compute",
        substrate_options={
            "address": "127.0.0.1",
            "workers_per_node": args.invocations,
            "run_dir": Path(store) / "gce-run",
        },
    )
    fn = faas.function(model=f"{MODEL_NAME}@1", name="bench.generate", timeout=600)(generate).with_client(
        client
    )
    runs: list[dict[str, Any]] = []
    try:
        client.registry.register_model(spec)
        t0 = time.perf_counter()
        fn.remote(prompts[0], params)  # the block, its engine and its workers start here
        cold = time.perf_counter() - t0
        url = client.pool.engine_url(spec)
        print(f"[multiplex] globus-compute block ready, engine {url}, first result after {cold:.1f} s")

        def run() -> int:
            futures = [fn.submit(p, params) for p in prompts]
            return sum(f.result(timeout=600) for f in futures)

        run()  # warm-up: every HTEX worker's imports and connections
        for _ in range(args.repeats):
            client.flush_records(600)
            before = server_stats(url)
            t = time.perf_counter()
            tokens = run()
            elapsed = time.perf_counter() - t
            delta = stats_delta(before, server_stats(url))
            if tokens != len(prompts) * args.max_new_tokens:
                raise RuntimeError(f"globus-compute: {tokens} tokens generated")
            rate = tokens / elapsed
            runs.append({"tokens": tokens, "seconds": elapsed, "tokens_per_s": rate, "engine": delta})
            print(
                f"[multiplex] globus-compute: {tokens} tokens in {elapsed:.3f} s = {rate:.0f} tok/s, "
                f"engine mean batch {delta['mean_batch_size']:.1f}"
            )
    finally:
        client.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    return {
        "runs": runs,
        "first_result_seconds": cold,
        "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
        "mean_batch_size": median([r["engine"]["mean_batch_size"] for r in runs]),
        "workers_per_node": args.invocations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--invocations", type=int, default=64, help="concurrent invocations per run")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per invocation")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="engine and baseline device")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch intra-op threads of the engine (default 1: on 2 cores the other core serves HTTP "
        "and the pool's workers; 0 leaves torch's default)",
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="engine's most sequences per step")
    parser.add_argument("--workers", type=int, default=2, help="pool worker processes")
    parser.add_argument("--exclusive-workers", type=int, default=2, help="processes in the exclusive row")
    parser.add_argument("--skip-exclusive", action="store_true", help="do not run the exclusive baseline")
    parser.add_argument(
        "--skip-globus-compute", action="store_true", help="do not run the globus-compute substrate row"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--name", default=None, help="result name (default multiplex or multiplex-cuda)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    print(f"[multiplex] {os.cpu_count()} CPUs, load average {os.getloadavg()} (other work skews every row)")
    name = args.name or ("multiplex" if args.device == "cpu" else f"multiplex-{args.device}")

    from warmpool.cpu_engine._tiny_model import ensure_tiny_model

    t0 = time.perf_counter()
    model_path = str(ensure_tiny_model())
    print(f"[multiplex] tiny model at {model_path} ({time.perf_counter() - t0:.1f} s)")
    prompts = prompts_for(args.invocations)

    # The exclusive baseline runs first, alone, so the engine's processes do not share its CPUs.
    exclusive = None if args.skip_exclusive else run_exclusive(args, model_path, prompts)
    shared = run_pool_and_direct(args, model_path, prompts)
    gce = None if args.skip_globus_compute else run_globus_compute(args, model_path, prompts)

    rows = [
        [
            "pool",
            shared["pool"]["tokens_per_s"],
            1.0,
            shared["pool"]["mean_batch_size"],
            shared["pool"]["cpu_s_per_run"]["total"],
        ],
        [
            "direct HTTP",
            shared["direct"]["tokens_per_s"],
            ratio(shared["pool"]["tokens_per_s"], shared["direct"]["tokens_per_s"]),
            shared["direct"]["mean_batch_size"],
            shared["direct"]["cpu_s_per_run"]["total"],
        ],
    ]
    if gce is not None:
        rows.append(
            [
                "globus-compute substrate",
                gce["tokens_per_s"],
                ratio(shared["pool"]["tokens_per_s"], gce["tokens_per_s"]),
                gce["mean_batch_size"],
                None,
            ]
        )
    if exclusive is not None:
        rows.append(
            [
                f"exclusive x{exclusive['workers']}",
                exclusive["tokens_per_s"],
                ratio(shared["pool"]["tokens_per_s"], exclusive["tokens_per_s"]),
                1.0,
                exclusive["cpu_s_per_run"],
            ]
        )
    print_table(
        f"multiplex: {args.invocations} invocations x {args.max_new_tokens} tokens, device {args.device}, "
        f"engine threads {args.engine_threads or 'default'}, {os.cpu_count()} CPUs "
        f"(median of {args.repeats})",
        ["row", "tokens/s", "pool/row", "engine mean batch", "CPU s/run"],
        rows,
    )
    goals = [
        Goal(
            "pool / direct",
            ratio(shared["pool"]["tokens_per_s"], shared["direct"]["tokens_per_s"]),
            ">=",
            GOAL_VS_DIRECT,
            "x",
        )
    ]
    if exclusive is not None:
        goals.append(
            Goal(
                "pool / exclusive",
                ratio(shared["pool"]["tokens_per_s"], exclusive["tokens_per_s"]),
                ">=",
                GOAL_VS_EXCLUSIVE,
                "x",
            )
        )
    print("\ngoals:")
    for g in goals:
        print(g.line())
    path = write_result(
        name,
        {
            "config": {
                "invocations": args.invocations,
                "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats,
                "device": args.device,
                "engine_threads": args.engine_threads,
                "max_batch_size": args.max_batch_size,
                "pool_workers": args.workers,
                "exclusive_workers": args.exclusive_workers,
                "sampling_params": sampling(args.max_new_tokens),
                "prompts": sorted(set(prompts)),
            },
            "pool": shared["pool"],
            "direct": shared["direct"],
            "exclusive": exclusive,
            "globus_compute": gce,
            "engine": {k: shared[k] for k in ("engine_start_seconds", "engine_args", "server_info")},
            "ratios": {
                "pool_over_direct": goals[0].value,
                "pool_over_exclusive": goals[1].value if len(goals) > 1 else None,
            },
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 1 if args.check and not all(g.met for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
