"""One contract, four clients: the same user code against every implementation of ``faas.FaasClient``.

- ``embedded-local``: ``faas.Client`` with its pool in this process (engines and workers as children).
- ``embedded-globus-compute``: ``faas.Client`` on a real GlobusComputeEngine (LocalProvider, 127.0.0.1).
- ``remote``: ``faas.RemoteClient`` of a real ``faas serve`` subprocess.
- ``cloud``: ``faas.GlobusComputeCloudClient`` through the real Globus Compute SDK, with only its
  network edge faked (``tests/faas/_gc_cloud_helpers.py``), a real endpoint-side runtime, a CPU
  engine and SeaweedFS for the store.

Every backend is a module-scoped fixture, so each starts once; the functions are cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import faas
from tests.faas._service_proc import TOKENS, ServiceProc
from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

PROMPT = "The quick brown"


# -- the functions users write ------------------------------------------------------------------
@faas.function(timeout=60)
def add(a: int, b: int) -> int:
    return a + b


@faas.function(timeout=60)
def half(n: int) -> int:
    if n % 2:
        raise ValueError(f"{n} is odd")
    return n // 2


@faas.function(timeout=60)
def chatty(n: int) -> int:
    print(f"working on {n}")
    return n


@faas.function(timeout=60)
def size_of(data: bytes) -> int:
    return len(data)


@faas.function(model="tiny-llama", timeout=120)
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 16, "temperature": 0}).text


@faas.function(model="no-such-model", timeout=60)
def unknown_model(model: faas.Model) -> str:
    return "never runs"


# -- the backends -------------------------------------------------------------------------------
@dataclass
class Backend:
    """One client under test, and how to open a second one on the same store, service or endpoint."""

    client: faas.FaasClient
    another: Callable[[], faas.FaasClient]
    engine_here: bool  # whether Function.local() can reach an engine from this process


Builder = Callable[
    [pytest.FixtureRequest, pytest.TempPathFactory], contextlib.AbstractContextManager[Backend]
]


@contextlib.contextmanager
def embedded_local(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Iterator[Backend]:
    store = tmp.mktemp("contract-local").as_uri()
    with faas.Client(store=store, workers=1, threads_per_worker=8) as client:
        yield Backend(client, lambda: faas.Client(store=store), engine_here=True)


@contextlib.contextmanager
def embedded_globus_compute(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Iterator[Backend]:
    pytest.importorskip("globus_compute_endpoint")
    store = tmp.mktemp("contract-gce").as_uri()
    options = {"address": "127.0.0.1", "workers_per_node": 4, "run_dir": tmp.mktemp("contract-gce-run")}
    with faas.Client(store=store, workers=1, substrate="globus-compute", substrate_options=options) as client:
        yield Backend(client, lambda: faas.Client(store=store), engine_here=True)


@contextlib.contextmanager
def remote(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Iterator[Backend]:
    service = ServiceProc(tmp.mktemp("contract-svc")).start()
    try:
        with faas.RemoteClient(service.url, token=TOKENS["alice"]) as client:
            yield Backend(
                client, lambda: faas.RemoteClient(service.url, token=TOKENS["alice"]), engine_here=False
            )
    finally:
        service.stop()


@contextlib.contextmanager
def cloud(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Iterator[Backend]:
    pytest.importorskip("globus_compute_sdk")
    pytest.importorskip("globus_compute_endpoint")
    from faas.clients._gc_cloud import GlobusComputeCloudClient
    from tests._s3_servers import aws_env
    from tests.faas._gc_cloud_helpers import (
        ENDPOINT,
        cloud_client,
        cloud_store_url,
        endpoint_engine,
        loopback_service,
        never,
    )

    s3 = request.getfixturevalue("seaweedfs_server")
    model_path: Path = request.getfixturevalue("tiny_model_path")
    with contextlib.ExitStack() as stack:
        stack.enter_context(aws_env(s3, tmp.mktemp("contract-aws")))  # the endpoint's workers inherit it
        engine = stack.enter_context(endpoint_engine(model_path, tmp.mktemp("contract-engine")))
        service = stack.enter_context(loopback_service(engine, tmp.mktemp("contract-gc-run")))
        store_url = cloud_store_url(s3, model_path)
        client = stack.enter_context(cloud_client(service, store_url, []))
        yield Backend(
            client,
            lambda: GlobusComputeCloudClient(ENDPOINT, store=store_url, executor_factory=never),
            engine_here=False,
        )


BACKENDS: dict[str, Builder] = {
    "embedded-local": embedded_local,
    "embedded-globus-compute": embedded_globus_compute,
    "remote": remote,
    "cloud": cloud,
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with BACKENDS[request.param](request, tmp_path_factory) as built:
        yield built


@pytest.fixture(scope="module")
def client(backend: Backend) -> faas.FaasClient:
    return backend.client


def submitted(client: faas.FaasClient) -> int:
    return int(client.status()["counters"].get("submitted", 0))


# -- the contract -------------------------------------------------------------------------------
def test_it_is_a_faas_client(client: faas.FaasClient) -> None:
    assert isinstance(client, faas.FaasClient)
    assert not isinstance(object(), faas.FaasClient)


def test_register_then_remote(client: faas.FaasClient) -> None:
    spec = client.register(add)
    assert spec.name == "add" and spec.version >= 1 and len(spec.digest) == 64
    assert client.register(add) == spec  # once per client
    assert add.with_client(client).remote(2, 3) == 5
    assert "add" in [f.name for f in client.list_functions()]
    assert "tiny-llama" in [m.name for m in client.list_models()]


def test_submit_returns_a_future_with_its_id_and_result(client: faas.FaasClient) -> None:
    future = add.with_client(client).submit(20, 22)
    assert isinstance(future, faas.Future)
    assert len(future.invocation_id) == 32
    assert future.result(timeout=120) == 42
    assert future.status() == "finished"
    assert asyncio.run(add.with_client(client).aio(1, 1)) == 2


def test_map_keeps_order_and_can_return_exceptions(client: faas.FaasClient) -> None:
    fn = half.with_client(client)
    assert list(fn.map([0, 2, 4, 6, 8, 10], timeout=120)) == [0, 1, 2, 3, 4, 5]
    out = list(fn.map(range(6), return_exceptions=True, timeout=120))
    assert [x if isinstance(x, int) else type(x) for x in out] == [
        0,
        ValueError,
        1,
        ValueError,
        2,
        ValueError,
    ]
    assert [str(x) for x in out[1::2]] == ["1 is odd", "3 is odd", "5 is odd"]
    with pytest.raises(ValueError, match="1 is odd"):
        list(fn.map([0, 1], timeout=120))


def test_a_user_exception_is_rebuilt_with_its_remote_traceback(client: faas.FaasClient) -> None:
    with pytest.raises(ValueError, match="7 is odd") as info:
        half.with_client(client).remote(7)
    remote_tb = getattr(info.value, "remote_traceback", "")
    assert "in half" in remote_tb and "ValueError: 7 is odd" in remote_tb
    assert any("Remote traceback" in note for note in getattr(info.value, "__notes__", []))


def test_from_id_reattaches_to_a_finished_invocation(backend: Backend) -> None:
    client = backend.client
    future = add.with_client(client).submit(40, 2)
    assert future.result(timeout=120) == 42
    # The submitting client's own attach also writes out what it has queued for the store,
    # so a second client (a later script, say) finds the invocation recorded.
    assert faas.Future.from_id(future.invocation_id, client=client).result(timeout=60) == 42
    with backend.another() as other:
        again = faas.Future.from_id(future.invocation_id, client=other)
        assert again.invocation_id == future.invocation_id
        assert again.result(timeout=60) == 42
        with pytest.raises(faas.NotFoundError, match="No invocation"):
            faas.Future.from_id("0" * 32, client=other)


def test_put_then_pass_the_ref(client: faas.FaasClient) -> None:
    data = b"contract" * 32_768  # 256 KiB
    ref = client.put(data)
    assert isinstance(ref, faas.Ref) and ref.size >= len(data)
    assert client.put(data).key == ref.key  # content-addressed: the same value is stored once
    assert size_of.with_client(client).remote(ref) == len(data)


def test_logs_hold_what_the_function_printed(client: faas.FaasClient) -> None:
    future = chatty.with_client(client).submit(7)
    assert future.result(timeout=120) == 7
    assert client.logs(future.invocation_id) == "working on 7\n"


def test_status_and_cancel_answer(client: faas.FaasClient) -> None:
    future = add.with_client(client).submit(1, 2)
    assert future.result(timeout=120) == 3
    status = client.status()
    assert isinstance(status["counters"], dict) and submitted(client) >= 1
    assert client.cancel(future.invocation_id) is False  # it had finished
    assert future.cancel() is False


def test_wrong_arguments_raise_submit_error_before_anything_runs(client: faas.FaasClient) -> None:
    fn = add.with_client(client)
    fn.remote(0, 0)  # registered and warm: what follows can only fail on the arguments
    before = submitted(client)
    with pytest.raises(faas.SubmitError, match="Bad arguments for add"):
        fn.submit(1, 2, 3)
    with pytest.raises(faas.SubmitError, match="Bad arguments for add"):
        fn.remote(1, c=2)
    with pytest.raises(faas.SubmitError, match="Bad arguments for add"):
        list(fn.map([1, 2, 3], [1, 2], kwargs={"c": 1}))  # every call is checked before the first is sent
    with pytest.raises(faas.UnknownModelError, match="no-such-model"):
        unknown_model.with_client(client).submit()
    assert submitted(client) == before


def test_the_tiny_model_gives_the_same_text_on_every_client(backend: Backend) -> None:
    fn = complete.with_client(backend.client)
    assert fn.remote(PROMPT) == KNOWN_COMPLETIONS[PROMPT]
    if backend.engine_here:
        assert fn.local(PROMPT) == KNOWN_COMPLETIONS[PROMPT]
    else:
        with pytest.raises(faas.UnsupportedOperationError) as info:
            fn.local(PROMPT)
        assert info.value.operation == "model_handle"
        assert info.value.client == type(backend.client).__name__
        assert f"{info.value.client} does not support model_handle" in str(info.value)


def test_a_shut_down_client_refuses_new_work(backend: Backend) -> None:
    with backend.another() as other:
        pass
    with pytest.raises(faas.PoolClosedError, match="shut down"):
        add.with_client(other).submit(1, 2)
