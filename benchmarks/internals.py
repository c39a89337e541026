"""Model internals inside a shared batch, against NDIF's one-request-at-a-time model.

NDIF (nnsight's remote backend) runs one user's request at a time per model. The CPU engine
reads and writes named hook points per request inside its iteration-level batch. Four rows,
each ``--repeats`` times (medians), on one CPU engine process (the tiny offline Llama, one
torch thread, ``--max-batch-size`` 64), through the ``Model`` handle over HTTP:

- ``reads, concurrent``: 64 requests at once (one thread each), each reading one hook point
  (cycling over every hook point of the model, positions ``"all"``, no reduction) while
  generating ``--tokens`` tokens greedily (EOS ignored).
- ``reads, one at a time``: the same 64 requests sent one after another (NDIF's model:
  each request has the model to itself).
- ``plain batch``: 64 concurrent requests with no internals.
- ``quarter writing``: 64 concurrent requests, 16 of them adding a steering vector at
  ``blocks.1.hook_resid_post`` (every position), 48 plain.

Goals: concurrent reads >= 5x faster than one at a time (time ratio one-at-a-time /
concurrent); quarter-writing throughput >= 0.8x the plain batch's.

Run: ``.venv/bin/python -m benchmarks.internals``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
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

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from runtime import Internals, Model, Read, Write  # noqa: E402
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS, ensure_tiny_model  # noqa: E402

N = 64


def start_engine(tmp: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start the CPU engine on the tiny model; return the process and its URL once it is ready."""
    port_file = tmp / "port"
    argv = [sys.executable, "-m", "warmpool.cpu_engine", "--model-path", str(ensure_tiny_model())]
    argv += ["--port", "0", "--port-file", str(port_file), "--threads", str(threads)]
    argv += ["--max-batch-size", str(max_batch)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The CPU engine exited with {proc.returncode} while starting.")
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)  # polling a starting process, not synchronising work
    proc.kill()
    raise RuntimeError("The CPU engine did not become ready in 180 s.")


def stats(url: str) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{url}/server_info", timeout=10).json()["stats"]
    return out


def run_calls(model: Model, calls: list[dict[str, Any]], tokens: int, at_once: bool) -> float:
    """Seconds to finish ``calls`` (generate kwargs), all at once or one after another."""
    params = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}

    def one(kw: dict[str, Any]) -> int:
        out = model.generate(kw["prompt"], params, internals=kw.get("internals"))
        return out.completion_tokens  # type: ignore[union-attr]

    t0 = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(N) as pool:
            done = list(pool.map(one, calls))
    else:
        done = [one(kw) for kw in calls]
    seconds = time.perf_counter() - t0
    assert all(n == tokens for n in done), done
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every row (medians)")
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()

    prompts = [list(KNOWN_COMPLETIONS)[i % len(KNOWN_COMPLETIONS)] for i in range(N)]
    with tempfile.TemporaryDirectory(prefix="bench-internals-") as tmp:
        proc, url = start_engine(Path(tmp), args.threads, N)
        model = Model(url, "tiny@1", timeout=600)
        try:
            hooks = sorted(model.hook_points())
            hidden = model.hook_points()[hooks[0]][0]
            vector = np.random.default_rng(0).normal(size=hidden).astype(np.float32)
            steer = Internals(write=[Write("blocks.1.hook_resid_post", vector=vector, alpha=0.5)])
            reads = [
                {"prompt": p, "internals": Internals(read=[Read(hooks[i % len(hooks)])])}
                for i, p in enumerate(prompts)
            ]
            plain = [{"prompt": p} for p in prompts]
            quarter = [
                {"prompt": p, "internals": steer} if i % 4 == 0 else {"prompt": p}
                for i, p in enumerate(prompts)
            ]
            run_calls(model, plain[:8], args.tokens, at_once=True)  # warm up
            rows: dict[str, list[float]] = {
                k: [] for k in ("reads_concurrent", "reads_one_at_a_time", "plain", "quarter")
            }
            batch_sizes: dict[str, list[float]] = {k: [] for k in rows}
            for _ in range(args.repeats):
                for name, calls, conc in (
                    ("reads_concurrent", reads, True),
                    ("reads_one_at_a_time", reads, False),
                    ("plain", plain, True),
                    ("quarter", quarter, True),
                ):
                    before = stats(url)
                    rows[name].append(run_calls(model, calls, args.tokens, at_once=conc))
                    after = stats(url)
                    steps = after["steps"] - before["steps"]
                    batch_sizes[name].append(
                        (after["tokens_generated"] - before["tokens_generated"]) / max(steps, 1)
                    )
        finally:
            model.close()
            proc.terminate()
            proc.wait(30)

    med = {k: median(v) for k, v in rows.items()}
    tokens_total = N * args.tokens
    table = [
        [name, med[name], tokens_total / med[name], median(batch_sizes[name])]
        for name in ("reads_concurrent", "reads_one_at_a_time", "plain", "quarter")
    ]
    print_table(
        f"{N} requests x {args.tokens} tokens, medians of {args.repeats} (CPU engine, {args.threads} thread)",
        ["row", "seconds", "tokens/s", "mean batch"],
        table,
    )
    speedup = ratio(med["reads_one_at_a_time"], med["reads_concurrent"])
    writing = ratio(med["plain"], med["quarter"])  # throughput ratio = inverse time ratio
    goals = [
        Goal("concurrent reads / one at a time (speed-up)", speedup, ">=", 5.0, "x"),
        Goal("quarter writing / plain batch (throughput)", writing, ">=", 0.8, "x"),
    ]
    print("\nGoals:")
    for goal in goals:
        print(goal.line())
    path = write_result(
        "internals",
        {
            "config": vars(args) | {"requests": N, "hook_points": len(hooks)},
            "seconds": rows,
            "medians_s": med,
            "mean_batch": {k: median(v) for k, v in batch_sizes.items()},
            "goals": [g.as_dict() for g in goals],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
