"""Shared helpers for the benchmarks: timing, percentiles, tables and JSON results."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("FAAS_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def ensure_repo_importable() -> None:
    """Put the repository root on ``sys.path`` and ``PYTHONPATH`` (for ``python benchmarks/x.py``)."""
    root = str(ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    # Console scripts of this interpreter's environment (globus-compute-endpoint) must be on PATH
    # even when the venv is not activated.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a CI cancel) into SystemExit so ``finally`` blocks stop children.

    Without it a killed benchmark leaves its pools, engines and Parsl
    interchanges running.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min/max of latencies given in seconds, reported in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else math.nan,
        "min_ms": min(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, its return value)."""
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def ratio(ours: float, baseline: float) -> float:
    """``ours / baseline``; NaN when either side is missing or the baseline is zero."""
    if baseline is None or ours is None or not baseline or math.isnan(baseline) or math.isnan(ours):
        return math.nan
    return ours / baseline


# -- goals ------------------------------------------------------------------------------


@dataclass
class Goal:
    """One acceptance goal: ``value <op> target``."""

    name: str
    value: float
    op: str  # "<=" or ">="
    target: float
    unit: str = ""

    @property
    def met(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def line(self) -> str:
        verdict = "MET" if self.met else "MISSED"
        goal = f"goal {self.op} {self.target}{self.unit}"
        return f"  [{verdict:6}] {self.name}: {_fmt(self.value)}{self.unit} ({goal})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "target": self.target,
            "unit": self.unit,
            "met": self.met,
        }


# -- output -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain-text table (floats formatted for reading)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    print(line(columns))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def print_ratio_table(
    title: str,
    metric: str,
    ours_name: str,
    values: dict[str, float],
    *,
    higher_is_better: bool,
) -> dict[str, float]:
    """Print each row's ``metric`` and the ratio ours/baseline; return the ratios by baseline."""
    ours = values.get(ours_name, math.nan)
    ratios: dict[str, float] = {}
    rows = []
    for name, value in values.items():
        r = ratio(ours, value) if name != ours_name else 1.0
        ratios[name] = r
        better = "" if name == ours_name else (_fmt(1 / r if not higher_is_better and r else r) + "x")
        rows.append([name, value, r, better])
    direction = "higher" if higher_is_better else "lower"
    print_table(
        f"{title} ({direction} is better)",
        ["row", metric, f"{ours_name}/row", f"{ours_name} advantage"],
        rows,
    )
    return ratios


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether the working tree differs from it."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU count, platform, Python and library versions, and the git commit."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "git": git_commit(),
        # Other work on the machine skews every row; the 1/5/15-minute load averages say how much.
        "loadavg_at_start": _LOAD_AT_START,
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("torch", "transformers", "globus_compute_endpoint", "parsl", "httpx"):
        try:
            module = __import__(mod)
            info[f"{mod}_version"] = getattr(module, "__version__", None)
        except Exception:
            info[f"{mod}_version"] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    info.update(extra or {})
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus machine info and a timestamp) to ``benchmarks/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=2, default=_json_default, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _clean(obj: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


# -- the pool service -----------------------------------------------------------------------


class ServiceProcess:
    """``faas serve`` as a subprocess on 127.0.0.1 (open access, a fresh store and state).

    Args:
        root: Directory for the store, state and log.
        workers: Worker processes of its pool.
        threads_per_worker: Invocations per worker at once.
    """

    def __init__(self, root: Path, workers: int, threads_per_worker: int) -> None:
        self.root = root
        self.workers = workers
        self.threads = threads_per_worker
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> str:
        """Start it and return its URL once ``/health`` answers."""
        import httpx

        port_file = self.root / "port"
        command = [sys.executable, "-m", "faas.cli", "serve", "--port", "0", "--port-file", str(port_file)]
        command += ["--store", str(self.root / "store"), "--state-dir", str(self.root / "state")]
        command += ["--workers", str(self.workers), "--threads-per-worker", str(self.threads)]
        command += ["--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if k not in ("FAAS_URL", "FAAS_TOKENS")}
        with open(self.root / "service.log", "ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"faas serve did not start; see {self.root / 'service.log'}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("faas serve does not answer /health")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The service's process id (after :meth:`start`)."""
        if self.proc is None:
            raise RuntimeError("The service has not been started.")
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    if not os.path.isdir("/proc"):
        return children
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and its descendants (from /proc)."""
    children = children_by_parent()
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class CpuMeter:
    """CPU seconds per call by process role: a process tree on Linux (``/proc``), and this process.

    Roles are ``service`` (the root), ``engine`` and ``workers`` (its children, by
    command line) and ``client`` (this process, every thread). Elsewhere it
    measures nothing and reports an empty dict.

    Args:
        root_pid: The service process.
    """

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: dict[str, float] = {}

    def _roles(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {"service": [self.root_pid], "engine": [], "workers": []}
        for pid in children_by_parent().get(self.root_pid, []):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue  # gone meanwhile
            roles["engine" if b"cpu_engine" in command else "workers"].append(pid)
        return roles

    def _cpu(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self._tick

    def snapshot(self) -> dict[str, float]:
        """CPU seconds used so far by each role."""
        if not os.path.isdir("/proc"):
            return {}
        out = {role: sum(self._cpu(pid) for pid in pids) for role, pids in self._roles().items()}
        times = os.times()
        out["client"] = times.user + times.system
        return out

    def start(self) -> None:
        """Begin a measured interval."""
        self._start = self.snapshot()

    def per_call_ms(self, calls: int) -> dict[str, float]:
        """Milliseconds of CPU per call by role since :meth:`start`."""
        end = self.snapshot()
        return {role: (end[role] - self._start.get(role, 0.0)) / calls * 1000 for role in end}
