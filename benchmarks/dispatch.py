"""Dispatch overhead: a no-op function through the pool and through the baselines.

Each substrate runs the same no-op (``noop(x) -> x``, no model call) and is
measured on its own (started, warmed up, measured, shut down) so the rows do
not compete for CPUs:

- sequential: ``--n`` round trips one after another (submit, wait for the
  result), after a warm-up; p50/p95 latency.
- burst: ``--n`` invocations submitted at once, then all results awaited;
  invocations per second, the median of ``--bursts`` runs. "settled" also
  waits for the row's background work (the pool's invocation records).

Rows (``--substrate``, repeatable; default: every available one):

- ``pool``: the embedded warm pool through the public API (``@faas.function``
  and ``faas.Client``): ``noop.remote(i)`` / ``noop.submit(i)``.
- ``pool-records-off``: as ``pool`` with ``faas.Client(records="off")``: what
  writing the durable invocation records (request and result, asynchronously)
  costs.
- ``pool-direct``: the same pool driven through ``warmpool.Pool.submit`` with a
  pre-registered spec (no decorator, no ``faas.Future``): what the public API
  layer costs on top of the pool.
- ``ProcessPoolExecutor``: ``concurrent.futures.ProcessPoolExecutor`` with the
  same number of worker processes; the floor for crossing a process boundary.
- ``GlobusComputeEngine``: a warm ``globus_compute_endpoint`` engine (Parsl
  HighThroughputExecutor, LocalProvider on 127.0.0.1, ``min_blocks=1``), fed
  Globus Compute task messages exactly as an endpoint's interchange feeds it.
- ``globus-compute-substrate``: the public API on ``faas.Client(substrate=
  "globus-compute")``: the pool dispatches every invocation as a Globus Compute
  task to a GlobusComputeEngine block (LocalProvider, 127.0.0.1).
- ``service``: ``faas serve`` in its own process, reached with
  ``faas.RemoteClient`` over HTTP: ``.remote`` is one POST that long-polls the
  result, a burst is ``.map`` (batches plus one event stream per batch).

Run: ``.venv/bin/python -m benchmarks.dispatch`` (``--n 200`` for a smoke run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    Goal,
    ensure_repo_importable,
    exit_cleanly_on_sigterm,
    latency_summary,
    median,
    print_ratio_table,
    print_table,
    ratio,
    write_result,
)

ensure_repo_importable()

# Goals from the acceptance criterion and the numbers measured before the pool existed.
GOAL_SEQUENTIAL_P50_MS = 1.0
GOAL_BURST_VS_GCE = 3.0
REFERENCE = {
    "ProcessPoolExecutor": {"sequential_p50_ms": 0.18, "burst_per_s": 13_600},
    "GlobusComputeEngine": {"sequential_p50_ms": 1.9, "burst_per_s": 860},
}


def noop(x: int) -> int:
    """The benchmarked function: no model call, returns its argument."""
    return x


class Substrate(Protocol):
    """What a row must provide; the runner does the timing."""

    name: str
    description: str

    def start(self) -> None:
        """Start processes; return once an invocation can be submitted."""

    def call(self, x: int) -> int:
        """One blocking round trip: submit ``noop(x)`` and wait for its result."""

    def burst(self, xs: list[int]) -> list[int]:
        """Submit ``noop(x)`` for every ``x`` before waiting; return results in order."""

    def settle(self) -> None:
        """Wait for work the row does in the background after results are back (records)."""

    def close(self) -> None:
        """Stop everything ``start`` started."""

    def settings(self) -> dict[str, Any]:
        """The configuration that was measured (goes into the JSON)."""


# -- rows -------------------------------------------------------------------------------


class _FutureRow:
    """A row driven through ``_submit(x) -> future`` and ``_value(future) -> int``."""

    def _submit(self, x: int) -> Any:
        raise NotImplementedError

    def _value(self, fut: Any) -> int:
        raise NotImplementedError

    def call(self, x: int) -> int:
        return self._value(self._submit(x))

    def burst(self, xs: list[int]) -> list[int]:
        futures = [self._submit(x) for x in xs]
        return [self._value(f) for f in futures]

    def settle(self) -> None:
        pass  # nothing is left running in the background after a result


class FaasPool:
    """The embedded pool through the public API: ``@faas.function`` and ``faas.Client``."""

    name = "pool"
    description = "faas.Client embedded pool, @faas.function noop .remote()/.submit()"
    records: str | None = None  # None: the client's default (durable records written asynchronously)

    def __init__(self, args: argparse.Namespace) -> None:
        self.workers = args.workers
        self.threads = args.threads_per_worker
        self._tmp = tempfile.mkdtemp(prefix="faas-bench-store-")
        self.client: Any = None
        self.fn: Any = None

    def start(self) -> None:
        import faas

        options: dict[str, Any] = {"records": self.records} if self.records else {}
        self.client = faas.Client(
            store=Path(self._tmp).as_uri(), workers=self.workers, threads_per_worker=self.threads, **options
        )
        self.fn = faas.function(name="bench.noop")(noop).with_client(self.client)
        self.client.pool  # noqa: B018 - start the workers now, not inside the first measurement

    def call(self, x: int) -> int:
        return int(self.fn.remote(x))

    def burst(self, xs: list[int]) -> list[int]:
        futures = [self.fn.submit(x) for x in xs]
        return [f.result(timeout=600) for f in futures]

    def settle(self) -> None:
        flush = getattr(self.client, "flush_records", None)  # records are written asynchronously
        if flush is not None:
            flush(600)

    def close(self) -> None:
        if self.client is not None:
            self.client.shutdown()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def settings(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "store": "local",
            "records": getattr(self.client, "_records_mode", self.records),
        }


class FaasPoolNoRecords(FaasPool):
    """The public API with invocation records switched off (``faas.Client(records="off")``)."""

    name = "pool-records-off"
    description = "as pool, with faas.Client(records='off'): no durable invocation records"
    records = "off"


class DirectPool(_FutureRow):
    """The same pool through ``warmpool.Pool.submit`` (no decorator, no faas.Future)."""

    name = "pool-direct"
    description = "warmpool.Pool.submit with a pre-registered FunctionSpec"

    def __init__(self, args: argparse.Namespace) -> None:
        self.workers = args.workers
        self.threads = args.threads_per_worker
        self._tmp = tempfile.mkdtemp(prefix="faas-bench-store-")
        self.pool: Any = None
        self.spec: Any = None

    def start(self) -> None:
        from registry import FunctionSpec, Registry
        from runtime import LocalStore, dumps
        from runtime._serde import digest_of
        from runtime._source import bundle_function
        from warmpool import Pool

        store = LocalStore(Path(self._tmp))
        blob = dumps(bundle_function(noop))
        self.spec = Registry(store).register_function(
            blob, FunctionSpec(name="bench.noop", digest=digest_of(blob))
        )
        self.pool = Pool(store, workers=self.workers, threads_per_worker=self.threads).start()

    def _submit(self, x: int) -> concurrent.futures.Future[Any]:
        from runtime import Invocation, dumps, new_id

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        inv = Invocation(
            id=new_id(),
            function_name=self.spec.name,
            function_digest=self.spec.digest,
            args=dumps(((x,), {})),
        )
        self.pool.submit(inv, self.spec, None, fut.set_result)
        return fut

    @staticmethod
    def _value(fut: concurrent.futures.Future[Any]) -> int:
        from runtime import loads

        result = fut.result(timeout=600)
        if not result.ok:
            raise RuntimeError(f"invocation failed: {result.error}")
        return int(loads(result.value))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def settings(self) -> dict[str, Any]:
        return {"workers": self.workers, "threads_per_worker": self.threads, "store": "local"}


class ProcessPool:
    """``concurrent.futures.ProcessPoolExecutor`` with the same number of processes."""

    name = "ProcessPoolExecutor"
    description = "concurrent.futures.ProcessPoolExecutor (fork), same process count"

    def __init__(self, args: argparse.Namespace) -> None:
        self.workers = args.workers
        self.ex: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers)
        # Make it spawn every worker before the measurement starts.
        list(self.ex.map(noop, range(self.workers * 4)))

    def call(self, x: int) -> int:
        assert self.ex is not None
        return self.ex.submit(noop, x).result()

    def burst(self, xs: list[int]) -> list[int]:
        assert self.ex is not None
        futures = [self.ex.submit(noop, x) for x in xs]
        return [f.result() for f in futures]

    def settle(self) -> None:
        pass

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)

    def settings(self) -> dict[str, Any]:
        import multiprocessing

        return {"max_workers": self.workers, "start_method": multiprocessing.get_start_method()}


class GlobusCompute(_FutureRow):
    """A warm GlobusComputeEngine on LocalProvider, fed task messages as an endpoint feeds it.

    Tasks are what the Globus Compute SDK sends: a messagepack ``Task`` whose
    buffer holds the function serialised once (as a registered function is) and
    the arguments serialised per task with the SDK's ``ComputeSerializer``.
    Results are the engine's packed ``Result`` messages, unpacked and
    deserialised here, as the SDK does with what the service hands back.
    """

    name = "GlobusComputeEngine"
    description = "globus-compute-endpoint GlobusComputeEngine, LocalProvider, 127.0.0.1, warm"

    def __init__(self, args: argparse.Namespace) -> None:
        self.workers = args.workers
        self.encrypted = args.gce_encrypted
        self.strategy_period = 0.5
        self.engine: Any = None
        self._run_dir = tempfile.mkdtemp(prefix="faas-bench-gce-")

    def start(self) -> None:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from globus_compute_sdk.serialize import ComputeSerializer
        from parsl.providers import LocalProvider

        self.engine = GlobusComputeEngine(
            address="127.0.0.1",
            max_workers_per_node=self.workers,
            encrypted=self.encrypted,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            job_status_kwargs={"strategy_period": self.strategy_period, "max_idletime": 3600.0},
        )
        self.engine.start(endpoint_id=uuid.uuid4(), run_dir=self._run_dir)
        self.serde = ComputeSerializer()
        self._code = self.serde.serialize(noop)  # a registered function is serialised once
        self._kwargs = self.serde.serialize({})
        # The first task waits for the scaler to start a block; wait for it here.
        if self.call(-1) != -1:
            raise RuntimeError("GlobusComputeEngine returned a wrong result")

    def _submit(self, x: int) -> Any:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        task_id = uuid.uuid4()
        buffer = self.serde.pack_buffers([self._code, self.serde.serialize((x,)), self._kwargs])
        body = messagepack.pack(Task(task_id=task_id, task_buffer=buffer))
        fut = GCFuture(task_id)
        self.engine.submit(fut, body, {})
        return fut

    def _value(self, fut: Any) -> int:
        from globus_compute_common import messagepack

        result = messagepack.unpack(fut.result(timeout=600))
        if result.is_error:
            raise RuntimeError(f"GlobusComputeEngine task failed: {result.data}")
        return int(self.serde.deserialize(result.data))

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception as exc:  # a half-started engine: still remove what it started
                print(f"[dispatch] GlobusComputeEngine shutdown failed: {exc!r}", file=sys.stderr)
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def settings(self) -> dict[str, Any]:
        return {
            "max_workers_per_node": self.workers,
            "provider": "LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1)",
            "address": "127.0.0.1",
            "encrypted": self.encrypted,
            "strategy_period": self.strategy_period,
        }


class FaasPoolGlobusCompute(FaasPool):
    """The public API on the ``globus-compute`` substrate: the pool drives a GlobusComputeEngine.

    One block (LocalProvider, 127.0.0.1) with ``--workers`` HTEX workers runs
    the invocations as Globus Compute tasks; the function travels by reference
    (its digest) and the workers load it from the store.
    """

    name = "globus-compute-substrate"
    description = "faas.Client(substrate='globus-compute'), GlobusComputeEngine on LocalProvider"

    def start(self) -> None:
        import faas

        self.client = faas.Client(
            store=Path(self._tmp).as_uri(),
            workers=self.workers,
            substrate="globus-compute",
            substrate_options={"address": "127.0.0.1", "run_dir": Path(self._tmp) / "gce-run"},
        )
        self.fn = faas.function(name="bench.noop")(noop).with_client(self.client)
        if self.fn.remote(-1) != -1:  # the first invocation waits for the scaler to start the block
            raise RuntimeError("globus-compute substrate returned a wrong result")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "substrate": "globus-compute", "provider": "LocalProvider"}


class FaasService(FaasPool):
    """The pool behind ``faas serve``, reached over HTTP with ``faas.RemoteClient``.

    The service runs in its own process (same worker count); the client
    registers ``noop`` once, ``.remote`` is one POST that long-polls its result,
    a burst is ``.map`` (batches of 1,000 and one event stream per batch).
    """

    name = "service"
    description = "faas serve (HTTP, SQLite index, records), faas.RemoteClient .remote()/.map()"

    def start(self) -> None:
        import faas
        from benchmarks._common import ServiceProcess

        self.service = ServiceProcess(Path(self._tmp), self.workers, self.threads)
        self.client = faas.RemoteClient(self.service.start())
        self.fn = faas.function(name="bench.noop")(noop).with_client(self.client)

    def burst(self, xs: list[int]) -> list[int]:
        return [int(v) for v in self.fn.map(xs, timeout=600)]

    def settle(self) -> None:
        pass  # the service commits each result record before it reports the result

    def close(self) -> None:
        if self.client is not None:
            self.client.shutdown()
        if getattr(self, "service", None) is not None:
            self.service.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def settings(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "store": "local",
            "transport": "HTTP/1.1 keep-alive on 127.0.0.1",
        }


SUBSTRATES: dict[str, Callable[[argparse.Namespace], Substrate]] = {
    "pool": FaasPool,
    "pool-records-off": FaasPoolNoRecords,
    "pool-direct": DirectPool,
    "ProcessPoolExecutor": ProcessPool,
    "GlobusComputeEngine": GlobusCompute,
    "service": FaasService,
    "globus-compute-substrate": FaasPoolGlobusCompute,
}
PLANNED: dict[str, str] = {}
OURS = "pool"


# -- measurement ------------------------------------------------------------------------


def measure(sub: Substrate, n: int, bursts: int, warmup: int) -> dict[str, Any]:
    """Start ``sub``, warm it up, measure sequential latency and burst throughput, close it."""
    row: dict[str, Any] = {"name": sub.name, "description": sub.description}
    try:
        t0 = time.perf_counter()
        sub.start()
        row["start_seconds"] = time.perf_counter() - t0
        row["settings"] = sub.settings()
        for i in range(warmup):
            if sub.call(i) != i:
                raise RuntimeError(f"{sub.name}: wrong result during warm-up")
        warm_burst = list(range(min(n, 200)))
        if sub.burst(warm_burst) != warm_burst:
            raise RuntimeError(f"{sub.name}: wrong results in the warm-up burst")

        sub.settle()
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            value = sub.call(i)
            latencies.append(time.perf_counter() - t)
            if value != i:
                raise RuntimeError(f"{sub.name}: call {i} returned {value}")
        row["sequential"] = latency_summary(latencies)

        runs, settled = [], []
        xs = list(range(n))
        for _ in range(bursts):
            sub.settle()  # start every burst with no background work left from the last phase
            t = time.perf_counter()
            out = sub.burst(xs)
            elapsed = time.perf_counter() - t
            sub.settle()
            elapsed_settled = time.perf_counter() - t
            if out != xs:
                raise RuntimeError(f"{sub.name}: a burst returned wrong results")
            runs.append(n / elapsed)
            settled.append(n / elapsed_settled)
        row["burst"] = {
            "n": n,
            "runs_per_s": runs,
            "median_per_s": median(runs),
            "settled_runs_per_s": settled,
            "settled_median_per_s": median(settled),
        }
    finally:
        t = time.perf_counter()
        sub.close()
        row["close_seconds"] = time.perf_counter() - t
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="invocations per sequential run and per burst")
    parser.add_argument("--bursts", type=int, default=3, help="burst runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=100, help="sequential warm-up calls per row")
    parser.add_argument(
        "--substrate",
        action="append",
        choices=[*SUBSTRATES, *PLANNED],
        help="row to measure (repeatable; default: all available)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes in every row")
    parser.add_argument("--threads-per-worker", type=int, default=64, help="pool threads per worker")
    parser.add_argument(
        "--gce-encrypted",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="CurveZMQ encryption in GlobusComputeEngine (off by default: the faster, stricter baseline)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--name", default="dispatch", help="result file name under benchmarks/results/")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    print(f"[dispatch] {os.cpu_count()} CPUs, load average {os.getloadavg()} (other work skews every row)")

    names = args.substrate or list(SUBSTRATES)
    for name in names:
        if name in PLANNED:
            parser.error(f"--substrate {name}: {PLANNED[name]} is not built yet")

    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"[dispatch] {name}: starting", flush=True)
        rows[name] = row = measure(SUBSTRATES[name](args), args.n, args.bursts, args.warmup)
        seq, burst = row["sequential"], row["burst"]
        print(
            f"[dispatch] {name}: start {row['start_seconds']:.2f} s, p50 {seq['p50_ms']:.3f} ms, "
            f"p95 {seq['p95_ms']:.3f} ms, burst {burst['median_per_s']:.0f}/s "
            f"(runs {', '.join(f'{r:.0f}' for r in burst['runs_per_s'])}; "
            f"settled {burst['settled_median_per_s']:.0f}/s)",
            flush=True,
        )

    print_table(
        f"dispatch: no-op function, {args.n} invocations, {args.workers} worker processes, "
        f"{os.cpu_count()} CPUs",
        ["row", "seq p50 ms", "seq p95 ms", "burst inv/s", "settled inv/s", "start s"],
        [
            [
                name,
                r["sequential"]["p50_ms"],
                r["sequential"]["p95_ms"],
                r["burst"]["median_per_s"],
                r["burst"]["settled_median_per_s"],
                r["start_seconds"],
            ]
            for name, r in rows.items()
        ],
    )
    ratios: dict[str, Any] = {}
    goals: list[Goal] = []
    if OURS in rows:
        ours = rows[OURS]
        ratios["sequential_p50"] = print_ratio_table(
            "sequential p50 latency",
            "p50 ms",
            OURS,
            {name: r["sequential"]["p50_ms"] for name, r in rows.items()},
            higher_is_better=False,
        )
        ratios["burst"] = print_ratio_table(
            "burst throughput",
            "inv/s",
            OURS,
            {name: r["burst"]["median_per_s"] for name, r in rows.items()},
            higher_is_better=True,
        )
        goals.append(
            Goal("pool sequential p50", ours["sequential"]["p50_ms"], "<=", GOAL_SEQUENTIAL_P50_MS, " ms")
        )
        if "GlobusComputeEngine" in rows:
            gce_burst = rows["GlobusComputeEngine"]["burst"]["median_per_s"]
            goals.append(
                Goal(
                    "pool burst / GlobusComputeEngine burst",
                    ratio(ours["burst"]["median_per_s"], gce_burst),
                    ">=",
                    GOAL_BURST_VS_GCE,
                    "x",
                )
            )
            goals.append(
                Goal(
                    "pool settled burst / GlobusComputeEngine burst (records durable; informational)",
                    ratio(ours["burst"]["settled_median_per_s"], gce_burst),
                    ">=",
                    GOAL_BURST_VS_GCE,
                    "x",
                )
            )
        print("\ngoals:")
        for g in goals:
            print(g.line())
    path = write_result(
        args.name,
        {
            "config": {
                "n": args.n,
                "bursts": args.bursts,
                "warmup": args.warmup,
                "workers": args.workers,
                "threads_per_worker": args.threads_per_worker,
                "substrates": names,
            },
            "rows": rows,
            "ratios_ours_over_row": ratios,
            "goals": [g.as_dict() for g in goals],
            "reference_before_pool": REFERENCE,
        },
    )
    print(f"\nwrote {path}")
    return 1 if args.check and not all(g.met for g in goals if "informational" not in g.name) else 0


if __name__ == "__main__":
    sys.exit(main())
