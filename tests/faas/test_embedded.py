"""End-to-end: decorated functions on the embedded pool, real CPU engine, real workers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import faas
from faas.cli._quickstart import child_pids
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS
from warmpool.local._pool import pid_alive

PROMPT = "The quick brown"
EXPECTED = KNOWN_COMPLETIONS[PROMPT]


@faas.function(model="tiny-llama", timeout=60, retries=1)
def complete(model: faas.Model, prompt: str, n: int = 16) -> str:
    return model.generate(prompt, sampling_params={"max_new_tokens": n, "temperature": 0}).text


@faas.function(timeout=30)
def fail(message: str) -> None:
    raise ValueError(message)


@faas.function(timeout=1)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@faas.function()
def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture(scope="module", params=["local", "globus-compute"])
def client(
    request: pytest.FixtureRequest, module_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[faas.Client]:
    """The suite's client, once per substrate: the in-process pool, and Globus Compute engines.

    The globus-compute substrate runs on a real GlobusComputeEngine (LocalProvider,
    127.0.0.1) over the same store; it runs on the file store only, to keep the suite short.
    """
    if request.param == "local":
        yield module_client
        return
    if module_client.store.config()["kind"] != "file":
        pytest.skip("the globus-compute substrate runs this suite on the file store only")
    pytest.importorskip("globus_compute_endpoint")
    gce = faas.Client(
        store=module_client.store,
        workers=2,
        substrate="globus-compute",
        substrate_options={
            "address": "127.0.0.1",
            "workers_per_node": 8,
            "run_dir": tmp_path_factory.mktemp("gce-run"),
        },
    )
    yield gce
    gce.shutdown()


@pytest.fixture(scope="module")
def fn(client: faas.Client) -> faas.Function[str]:
    return complete.with_client(client)


def cold_starts(client: faas.Client) -> int:
    return int(client.status()["models"]["tiny-llama@1"]["metrics"]["cold_starts"])


def submitted(client: faas.Client) -> int:
    return int(client.status()["counters"].get("submitted", 0))


def engine_stats(client: faas.Client) -> dict[str, Any]:
    [replica] = client.pool.replicas()
    return dict(replica.host.server_info()["stats"])


def test_remote(fn: faas.Function[str]) -> None:
    assert fn.remote(PROMPT) == EXPECTED


def test_submit_returns_faas_future(fn: faas.Function[str]) -> None:
    fut = fn.submit(PROMPT)
    assert isinstance(fut, faas.Future)
    assert len(fut.invocation_id) == 32
    assert fut.result(timeout=30) == EXPECTED


def test_map_keeps_order(fn: faas.Function[str]) -> None:
    prompts = list(KNOWN_COMPLETIONS) * 8
    assert list(fn.map(prompts)) == [KNOWN_COMPLETIONS[p] for p in prompts]


def test_aio(fn: faas.Function[str]) -> None:
    async def main() -> list[str]:
        return await asyncio.gather(*(fn.aio(p) for p in KNOWN_COMPLETIONS))

    assert asyncio.run(main()) == list(KNOWN_COMPLETIONS.values())


def test_local_uses_the_pool_engine(fn: faas.Function[str], client: faas.Client) -> None:
    assert fn.local(PROMPT) == EXPECTED
    assert cold_starts(client) == 1, [r.describe() for r in client.pool.replicas()]


def test_200_concurrent_submits_share_one_engine(fn: faas.Function[str], client: faas.Client) -> None:
    fn.remote(PROMPT)  # warm
    [replica] = client.pool.replicas()
    pid = replica.host.pid
    futures = [fn.submit(PROMPT) for _ in range(200)]
    assert [f.result(timeout=120) for f in futures] == [EXPECTED] * 200
    assert cold_starts(client) == 1
    assert [r.host.pid for r in client.pool.replicas()] == [pid]


def test_16_concurrent_invocations_are_batched(fn: faas.Function[str], client: faas.Client) -> None:
    fn.remote(PROMPT)
    before = engine_stats(client)
    barrier = threading.Barrier(16)

    def one() -> str:
        barrier.wait()
        return fn.remote(PROMPT, 24)

    threads_out: list[str] = []
    threads = [threading.Thread(target=lambda: threads_out.append(one())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = engine_stats(client)
    assert len(threads_out) == 16
    steps = after["steps"] - before["steps"]
    rows = after["mean_batch_size"] * after["steps"] - before["mean_batch_size"] * before["steps"]
    assert steps > 0
    assert rows / steps > 1.0, f"mean batch size over these 16 invocations was {rows / steps:.2f}"


def test_remote_exception_names_type_and_carries_traceback(client: faas.Client) -> None:
    with pytest.raises(ValueError, match="no such sample") as info:
        fail.with_client(client).remote("no such sample")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes and "ValueError: no such sample" in notes
    assert "raise ValueError(message)" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_timeout_then_next_call_succeeds(client: faas.Client) -> None:
    t0 = time.monotonic()
    with pytest.raises(faas.InvocationTimeout):
        sleepy.with_client(client).remote(5.0)
    assert time.monotonic() - t0 < 4.5  # the 1 s timeout fired before the 5 s sleep ended
    assert add.with_client(client).remote(2, 3) == 5


def test_unknown_model_runs_nothing(client: faas.Client) -> None:
    @faas.function(model="no-such-model")
    def f(model: faas.Model) -> None:
        pass

    before = submitted(client)
    with pytest.raises(faas.UnknownModelError, match="no-such-model"):
        f.with_client(client).submit()
    assert submitted(client) == before


def test_unpicklable_argument_runs_nothing(client: faas.Client) -> None:
    before = submitted(client)
    with pytest.raises(faas.SerializationError, match="arguments"):
        add.with_client(client).submit(threading.Lock(), 1)
    assert submitted(client) == before


def test_wrong_arguments_are_rejected_at_submit(client: faas.Client) -> None:
    with pytest.raises(faas.SubmitError, match="Bad arguments"):
        add.with_client(client).submit(1, 2, 3)
    with pytest.raises(faas.SubmitError, match="model handle"):
        complete.with_client(client).submit(PROMPT, model=None)


def test_decorator_errors() -> None:
    with pytest.raises(faas.FunctionDefinitionError, match="parentheses"):
        faas.function(add.fn)  # type: ignore[call-overload]
    with pytest.raises(faas.FunctionDefinitionError, match="decorates functions"):
        faas.function()(42)  # type: ignore[arg-type]
    with pytest.raises(faas.FunctionDefinitionError, match=r"no parameter annotated\s+faas.Model"):

        @faas.function(model="tiny-llama")
        def g(prompt: str) -> str:
            return prompt

    with pytest.raises(faas.FunctionDefinitionError, match="names no model"):

        @faas.function()
        def h(model: faas.Model) -> None:
            pass

    with pytest.raises(faas.FunctionDefinitionError, match="timeout"):
        faas.function(timeout=0)(add.fn)


def test_shutdown_leaves_no_child_process(tiny_model_path: Any, tmp_path: Any) -> None:
    client = faas.Client(store=(tmp_path / "store").as_uri(), workers=2)
    fn = complete.with_client(client)
    assert fn.remote(PROMPT) == EXPECTED
    pids = client.pool.worker_pids() + [r.host.pid for r in client.pool.replicas() if r.host.pid]
    assert len(pids) == 3
    client.shutdown()
    assert not [p for p in pids if pid_alive(p)]
    assert not (set(child_pids()) & set(pids))
    with pytest.raises(faas.PoolClosedError):
        fn.submit(PROMPT)
    assert os.getpid() not in pids


def test_gather_with_progress_and_status(fn: faas.Function[str]) -> None:
    futures = [fn.submit(p) for p in KNOWN_COMPLETIONS]
    assert {f.status() for f in futures} <= {"queued", "running", "finished", "waiting_for_engine"}
    assert faas.gather(futures, progress=True, timeout=60) == list(KNOWN_COMPLETIONS.values())
    assert {f.status() for f in futures} == {"finished"}


def test_pool_status_cli_reads_the_store(client: faas.Client) -> None:
    import json

    from typer.testing import CliRunner

    from faas.cli._main import app

    def report() -> dict[str, Any] | None:
        out = CliRunner().invoke(app, ["pool", "status", "--json", "--store", client.store.url()])
        statuses = json.loads(out.stdout) if out.exit_code == 0 else []
        mine = [s for s in statuses if s["pool"] == client.pool.id and "tiny-llama@1" in s["models"]]
        return mine[0] if mine else None

    deadline = time.monotonic() + 15
    status = report()
    while status is None and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the store for the next snapshot
        status = report()
    assert status is not None
    model = status["models"]["tiny-llama@1"]
    assert model["metrics"]["cold_starts"] == 1
    assert model["replicas"][0]["state"] == "ready"
