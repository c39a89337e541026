"""A hostile tenant against per-tenant workers: a real local pool, real workers, the real CPU engine.

Tenant A's function tries to (c) find B's prompts in its own process, (d) kill
its own worker while B has 20 invocations in flight, (e) allocate memory
without bound and (f) fork without bound (under identity mapping, as users this
test creates and removes). B's p50 latency during (e) and (f) is compared with
its solo p50 measured in the same test, round by round.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import FunctionSpec, ModelSpec, Registry
from runtime import Invocation, LocalStore, Result, dumps, loads, new_id
from tests.warmpool._pool_helpers import FakeClock, generate, register, wait_for
from warmpool import Pool, TenantWorkers
from warmpool.local._pool import pid_alive

# One torch thread: on a 2-core machine a 2-thread engine waits, every step, for its thread
# on the core a tenant's function keeps busy (an engine host keeps cores for its workers).
MODEL = ModelSpec(name="tiny-llama", version="1", engine_args={"threads": 1})
LIMIT_TYPE = "runtime._errors.ResourceLimitError"


def run(
    pool: Pool, spec: FunctionSpec, tenant: str | None, *args: Any, retries: int = 0
) -> concurrent.futures.Future[Result]:
    fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
    inv = Invocation(
        id=new_id(), function_name=spec.name, function_digest=spec.digest, model=MODEL.ref,
        args=dumps((args, {})), retries=retries, tenant=tenant,
    )  # fmt: skip
    pool.submit(inv, spec, MODEL, fut.set_result)
    fut.invocation_id = inv.id  # type: ignore[attr-defined]
    return fut


def dispatched(pool: Pool, fut: concurrent.futures.Future[Result]) -> bool:
    return fut.done() or pool.state(fut.invocation_id) == "running"  # type: ignore[attr-defined]


# -- what the tenants run --------------------------------------------------------
def scan_memory(model: Any, pairs: list[tuple[bytes, bytes]], own: str) -> list[bool]:
    """Whether each needle (given in two halves, so it never exists whole here) is in this process."""
    assert own  # the caller's own marker, whole, in this process's memory
    found = [False] * len(pairs)
    with open("/proc/self/maps") as f:
        regions = f.read().splitlines()
    with open("/proc/self/mem", "rb", 0) as mem:
        for line in regions:
            addr, perms = line.split()[:2]
            start, end = (int(x, 16) for x in addr.split("-"))
            if not perms.startswith("r") or end - start > 1 << 30 or "[v" in line:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for i, (head, tail) in enumerate(pairs):
                j = -1 if found[i] else chunk.find(head)
                while j != -1:
                    if chunk[j + len(head) : j + len(head) + len(tail)] == tail:
                        found[i] = True
                        break
                    j = chunk.find(head, j + 1)
    return found


def kill_self(model: Any) -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def hog_memory(model: Any) -> int:
    blocks = []
    while True:
        blocks.append(b"\x01" * (64 << 20))


def fork_bomb(model: Any) -> int:
    children = 0
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1


def hello(model: Any) -> int:
    return os.getuid()


def spin() -> None:
    while True:
        pass


def open_files() -> int:
    files = []
    while True:
        files.append(open("/dev/null"))  # noqa: SIM115


def secret_env() -> str | None:
    return os.environ.get("FAAS_TEST_SECRET")


# -- fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tiny_model_path: Path) -> Iterator[LocalStore]:
    root = tempfile.mkdtemp(prefix="faas-tenants-")
    os.chmod(root, 0o755)  # the mapped users' workers read function artifacts here
    yield LocalStore(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(store: LocalStore) -> Iterator[Pool]:
    isolation = TenantWorkers(
        workers=1, threads=8, memory_bytes=640 << 20, open_files=256, nice=10, idle_timeout=30
    )
    with Pool(store, workers=1, threads_per_worker=8, tenant_workers=isolation) as p:
        p.engine_url(MODEL)
        yield p


def b_times(pool: Pool, fn: FunctionSpec, n: int) -> list[float]:
    """B's latencies over ``n`` invocations one after another."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        result = run(pool, fn, "b", f"Once upon a time {i}", 8).result(60)
        times.append(time.perf_counter() - t0)
        assert result.ok, result.error
    return times


@dataclasses.dataclass
class Contest:
    """B's latencies alone and during A's attack, window by window, and A's results."""

    rounds: list[tuple[list[float], list[float]]]  # (solo, during) latencies per round
    results: list[Result]

    @property
    def ratio(self) -> float:
        """The median over rounds of B's p50 during the attack over its p50 alone just before.

        Each round compares two adjacent windows, so a neighbour's burst on a shared
        machine (the suite's other process) spoils at most the rounds it overlaps,
        where pooling every window's samples lets it move the whole comparison.
        """
        return statistics.median(
            statistics.median(during) / statistics.median(solo) for solo, during in self.rounds
        )

    def describe(self, attack: str) -> str:
        """One line: the pooled p50s, the ratio and each round's pair, for the log and failures."""
        solo = statistics.median(t for r in self.rounds for t in r[0])
        during = statistics.median(t for r in self.rounds for t in r[1])
        pairs = ", ".join(
            f"{statistics.median(s) * 1000:.1f}/{statistics.median(d) * 1000:.1f}" for s, d in self.rounds
        )
        return (
            f"B p50 solo {solo * 1000:.1f} ms, during {attack} {during * 1000:.1f} ms; median round ratio "
            f"{self.ratio:.2f} (rounds' solo/during ms: {pairs}); A hit the limit {len(self.results)} times"
        )


def solo_and_hostile(
    pool: Pool, gen: FunctionSpec, hostile: FunctionSpec, rounds: int = 5, n: int = 6
) -> Contest:
    """B's latencies alone and while tenant A runs ``hostile`` again and again, in alternating rounds."""
    contest = Contest([], [])
    for _ in range(rounds):
        solo = b_times(pool, gen, n)
        done = threading.Event()
        first = len(contest.results)

        def attack(done: threading.Event = done) -> None:
            while not done.is_set():
                contest.results.append(run(pool, hostile, "a").result(120))

        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        wait_for(lambda: len(contest.results) > first, 60, "A's first hostile result")  # noqa: B023
        try:
            contest.rounds.append((solo, b_times(pool, gen, n)))
        finally:
            done.set()
            thread.join(120)
    return contest


# -- the suite ---------------------------------------------------------------------
def test_c_a_cannot_find_bs_prompts_in_its_process(pool: Pool, store: LocalStore) -> None:
    registry = Registry(store)
    gen = register(registry, generate, model=True)
    scan = register(registry, scan_memory, model=True)
    own, theirs = f"mine-{uuid.uuid4().hex}", f"zebra-{uuid.uuid4().hex}"
    pairs = [(own[:10].encode(), own[10:].encode()), (theirs[:10].encode(), theirs[10:].encode())]
    b_futs = [run(pool, gen, "b", f"The {theirs} said {i}", 24) for i in range(8)]
    wait_for(lambda: all(dispatched(pool, f) for f in b_futs), 60, "B's invocations dispatched")
    found = run(pool, scan, "a", pairs, own).result(120)
    assert found.ok, found.error
    assert loads(found.value) == [True, False]  # its own marker yes (the control), B's no
    assert all(f.result(120).ok for f in b_futs)
    assert pool.worker_pids("a") and pool.worker_pids("b")
    assert not set(pool.worker_pids("a")) & set(pool.worker_pids("b"))


def test_c_control_shared_workers_do_leak(store: LocalStore) -> None:
    """Without per-tenant workers the same scan finds B's prompt: the check above is real."""
    registry = Registry(store)
    gen = register(registry, generate, model=True)
    scan = register(registry, scan_memory, model=True)
    own, theirs = f"mine-{uuid.uuid4().hex}", f"zebra-{uuid.uuid4().hex}"
    pairs = [(own[:10].encode(), own[10:].encode()), (theirs[:10].encode(), theirs[10:].encode())]
    with Pool(store, workers=1, threads_per_worker=16) as shared:
        b_futs = [run(shared, gen, "b", f"The {theirs} said {i}", 24) for i in range(8)]
        wait_for(lambda: all(dispatched(shared, f) for f in b_futs), 60, "B's invocations dispatched")
        found = run(shared, scan, "a", pairs, own).result(120)
        assert all(f.result(120).ok for f in b_futs)
    assert found.ok, found.error
    assert loads(found.value) == [True, True]


def test_d_a_kills_its_worker_while_b_has_20_in_flight(pool: Pool, store: LocalStore) -> None:
    registry = Registry(store)
    gen = register(registry, generate, model=True)
    killer = register(registry, kill_self, model=True)
    b_futs = [run(pool, gen, "b", f"Tale number {i}", 32) for i in range(20)]
    wait_for(lambda: all(dispatched(pool, f) for f in b_futs), 60, "B's 20 invocations dispatched")
    a_result = run(pool, killer, "a").result(120)
    assert a_result.error is not None and a_result.error.kind == "worker_lost"
    still_running = sum(not f.done() for f in b_futs)
    results = [f.result(120) for f in b_futs]
    assert all(r.ok for r in results), [r.error for r in results if r.error]
    assert [r.attempt for r in results] == [0] * 20  # no retry used
    assert still_running > 0  # B's work was in flight when A's worker died
    hello_fn = register(registry, hello, model=True)
    assert run(pool, hello_fn, "a").result(60).ok  # A got a new worker


@pytest.mark.quiet
def test_e_unbounded_memory_is_a_typed_error_and_b_keeps_its_latency(pool: Pool, store: LocalStore) -> None:
    registry = Registry(store)
    gen = register(registry, generate, model=True)
    hog = register(registry, hog_memory, model=True)
    run(pool, gen, "b", "warm up", 8).result(60)
    contest = solo_and_hostile(pool, gen, hog)
    a_results = contest.results
    print("\n(e)", contest.describe("A's memory hog"))
    assert a_results and all(r.error is not None and r.error.type_name == LIMIT_TYPE for r in a_results)
    exc = loads(a_results[0].error.exception)  # type: ignore[union-attr,arg-type]
    assert exc.limit == "memory" and a_results[0].attempt == 0
    assert contest.ratio <= 2, contest.describe("A's memory hog")


def test_cpu_and_open_files_limits_and_a_clean_env(store: LocalStore) -> None:
    """Without a model: a spinning function and a file-descriptor leak end typed; env per tenant."""
    registry = Registry(store)
    fns = [register(registry, f) for f in (spin, open_files, secret_env)]
    isolation = TenantWorkers(
        cpu_seconds=1.0, open_files=64, env={"a": {"LAB": "a"}}, env_for=lambda t: {"WHO": t}
    )
    os.environ["FAAS_TEST_SECRET"] = "service-credential"
    try:
        with Pool(store, workers=1, threads_per_worker=2, tenant_workers=isolation) as pool:
            got = {}
            for fn in reversed(fns):  # one at a time: a worker past its CPU limit exits
                fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
                inv = Invocation(id=new_id(), function_name=fn.name, function_digest=fn.digest,
                                 args=dumps(((), {})), tenant="a")  # fmt: skip
                pool.submit(inv, fn, None, fut.set_result)
                got[fn.name] = fut.result(60)
            cpu, files, env = (got[n] for n in ("spin", "open_files", "secret_env"))
    finally:
        os.environ.pop("FAAS_TEST_SECRET", None)
    assert env.ok and loads(env.value) is None  # type: ignore[arg-type]  # a clean environment
    for result, limit in ((cpu, "cpu"), (files, "open_files")):
        assert result.error is not None and result.error.type_name == LIMIT_TYPE, result.error
        assert loads(result.error.exception).limit == limit  # type: ignore[arg-type]


def test_a_tenants_workers_start_on_demand_and_retire_when_idle(store: LocalStore) -> None:
    registry = Registry(store)
    fn = register(registry, secret_env)
    clock = FakeClock()
    isolation = TenantWorkers(workers=2, idle_timeout=5.0)

    def call(pool: Pool, tenant: str) -> Result:
        fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
        inv = Invocation(id=new_id(), function_name=fn.name, function_digest=fn.digest,
                         args=dumps(((), {})), tenant=tenant)  # fmt: skip
        pool.submit(inv, fn, None, fut.set_result)
        return fut.result(60)

    with Pool(store, workers=1, clock=clock, tick_interval=None, tenant_workers=isolation) as pool:
        assert pool.worker_pids() == []  # nothing until a tenant's first invocation
        assert call(pool, "a").ok and len(pool.worker_pids("a")) == 2 and pool.worker_pids("b") == []
        first = pool.worker_pids("a")
        clock.advance(3.0)
        assert call(pool, "b").ok
        clock.advance(3.0)
        pool.tick()  # a idle for 6 s: retired; b idle for 3 s: kept
        wait_for(lambda: pool.worker_pids("a") == [], 10, "a's workers retired")
        wait_for(lambda: not any(pid_alive(p) for p in first), 10, "a's workers gone")
        assert len(pool.worker_pids("b")) == 2
        assert call(pool, "a").ok and not set(pool.worker_pids("a")) & set(first)  # started again


# -- (f): identity mapping, as users this test creates -------------------------------
@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("identity mapping needs root and useradd (CI runs as root)")
    names = {t: f"faas-t{t}-{uuid.uuid4().hex[:6]}" for t in ("a", "b")}
    made = []
    try:
        for name in names.values():
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            name], check=True, capture_output=True)  # fmt: skip
            made.append(name)
        entry = pwd.getpwnam(names["a"])
        env = {"PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path), "PATH": "/usr/bin:/bin"}
        if "LD_LIBRARY_PATH" in os.environ:  # kept by the workers' clean environment too
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        # Ours, or the system's of the same version: pyenv's under /root is private to root.
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        why = ""
        for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
            try:
                probe = subprocess.run(
                    [python, "-P", "-c", "import warmpool.local.worker"], user=entry.pw_uid,
                    group=entry.pw_gid, extra_groups=[], capture_output=True, cwd="/", env=env,
                )  # fmt: skip
                why = probe.stderr[-300:].decode(errors="replace") if probe.returncode else ""
            except OSError as exc:
                why = str(exc)
            if not why:
                names["python"] = python
                break
        if why:
            pytest.skip(f"a created user cannot run this project's Python: {why}")
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)


@pytest.mark.quiet
def test_f_fork_bomb_is_a_typed_error_as_the_tenants_user(users: dict[str, str], store: LocalStore) -> None:
    registry = Registry(store)
    gen = register(registry, generate, model=True)
    bomb = register(registry, fork_bomb, model=True)
    hello_fn = register(registry, hello, model=True)
    # The operator's part on a local store: the tenants' users may read it (the store
    # writes files 0600). Scoping store credentials per tenant is the next step.
    subprocess.run(["chmod", "-R", "a+rX", str(store.root)], check=True)
    python = users.pop("python")
    isolation = TenantWorkers(
        workers=1, threads=4, processes=48, nice=10, users=users, idle_timeout=30, python=python
    )
    os.environ["FAAS_TEST_SECRET"] = "service-credential"
    try:
        with Pool(store, workers=1, threads_per_worker=4, tenant_workers=isolation) as pool:
            pool.engine_url(MODEL)
            first = run(pool, hello_fn, "a").result(60)
            assert first.ok, first.error
            assert loads(first.value) == pwd.getpwnam(users["a"]).pw_uid  # type: ignore[arg-type]
            run(pool, gen, "b", "warm up", 8).result(60)
            contest = solo_and_hostile(pool, gen, bomb)
            a_results = contest.results
            print("\n(f)", contest.describe("A's fork bomb"))
            assert a_results and all(
                r.error is not None and r.error.type_name == LIMIT_TYPE for r in a_results
            )
            assert loads(a_results[0].error.exception).limit == "processes"  # type: ignore[union-attr,arg-type]
            assert contest.ratio <= 2, contest.describe("A's fork bomb")
            # Its children died with the invocation: A runs again; only A's worker runs as A.
            assert run(pool, hello_fn, "a").result(60).ok
            uid = pwd.getpwnam(users["a"]).pw_uid
            wait_for(lambda: _tasks_of(uid) <= 12, 30, "A's forked children killed")
            cgroups = pool._workers.cgroups  # type: ignore[attr-defined]
            if cgroups is not None and cgroups.enabled:  # one CPU share for all of A's processes
                assert set(pool.worker_pids("a")) <= set(cgroups.pids("a"))
            env_of = _env_of(pool, "a")
            assert "FAAS_TEST_SECRET" not in env_of and env_of.get("HOME")
    finally:
        os.environ.pop("FAAS_TEST_SECRET", None)


def _tasks_of(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


def _env_of(pool: Pool, tenant: str) -> dict[str, str]:
    [pid] = pool.worker_pids(tenant)
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
