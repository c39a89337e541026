"""faas.RemoteClient against a boundary stub of the service, plus the embedded client's parity methods.

BOUNDARY STUB: ``StubService`` below is a small FastAPI app that speaks the
HTTP contract of ``faas/service/_api.py`` (same routes and bodies) and runs
the registered functions in a thread pool. It exists ONLY to test the client's
error mapping, SSE parsing, reconnection and request counts at the edges that
a real ``faas serve`` does not produce on demand (broken streams, 503s, junk
events). End-to-end behaviour against the real service is tested with the
fixtures of ``tests/faas/_service_helpers.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import faas
import faas.clients._default
from faas.clients._pipeline import chunks
from faas.service._api import (
    FINAL_STATES,
    BatchRequest,
    BatchView,
    CancelView,
    InvocationView,
    Item,
    Limits,
    RegisterFunction,
    ResultView,
    SessionInfo,
    SubmitRequest,
    WatchRequest,
)
from registry._specs import FunctionSpec
from runtime import _serde
from runtime._execute import error_info
from runtime._source import restore_function
from runtime._staging import stage_value, unstage_value
from runtime._store import LocalStore, new_id
from runtime._wire import ErrorInfo
from tests._asgi_server import serve
from tests.faas._service_helpers import count_requests
from tests.warmpool._pool_helpers import wait_for

TOKEN = "stub-secret-token-5f1e2d3c"
REPO = Path(__file__).resolve().parents[2]


def plausible(invocation_id: str) -> bool:
    return invocation_id.isalnum() and len(invocation_id) >= 16


@faas.function()
def add(a: int, b: int) -> int:
    return a + b


@faas.function()
def size_of(data: bytes) -> int:
    return len(data)


@faas.function()
def blob(n: int) -> bytes:
    return b"y" * n


@faas.function()
def boom(message: str) -> None:
    raise ValueError(message)


@faas.function(model="tiny-llama")
def with_model(model: faas.Model, prompt: str) -> str:
    return prompt


# -- the boundary stub ---------------------------------------------------------------------------
class StubService:
    """The service's HTTP contract over an in-process function runner (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root / "store")
        self.threshold = 1024
        self.functions: dict[str, Callable[..., Any]] = {}
        self.results: dict[str, ResultView] = {}
        self.names: dict[str, str] = {}
        self.release = threading.Event()
        self.release.set()
        self.fail_submit: tuple[int, str, str] | None = None
        self.watch_unavailable = 0
        self.watch_always_unavailable = False
        self.break_after: int | None = None
        self.noise = False
        self.watch_requests = 0
        self.open_watches = 0
        self.cancelled: list[str] = []
        self.items: list[Item] = []
        self.batch_sizes: list[int] = []
        self.batch_gate = threading.Event()  # batch requests wait here while it is clear
        self.batch_gate.set()
        self.runner = concurrent.futures.ThreadPoolExecutor(32)
        self.app = self._app()

    def _run(self, invocation_id: str, name: str, item: Item) -> None:
        self.release.wait(30)
        if invocation_id in self.results:
            return  # cancelled
        try:
            args, kwargs = unstage_value(self.store, item.args, what="arguments")
            value = self.functions[name](*args, **kwargs)
            data = stage_value(self.store, value, self.threshold, what="result")
            view = ResultView(id=invocation_id, status="succeeded", value=data)
        except Exception as exc:
            view = ResultView(id=invocation_id, status="failed", error=error_info(exc, "user"))
        self.results.setdefault(invocation_id, view)

    def _start(self, name: str, item: Item) -> str:
        invocation_id = new_id()
        self.names[invocation_id] = name
        self.items.append(item)
        self.runner.submit(self._run, invocation_id, name, item)
        return invocation_id

    def _view(self, invocation_id: str) -> InvocationView:
        result = self.results.get(invocation_id)
        return InvocationView(
            id=invocation_id,
            status=result.status if result else "queued",
            function_name=self.names[invocation_id],
            function_digest="0" * 64,
            submitted_at=time.time(),
            result=result,
        )

    def _app(self) -> FastAPI:
        app = FastAPI()
        stub = self

        def error(status: int, type_name: str, message: str) -> Response:
            if type_name == "__text__":
                return PlainTextResponse(message, status_code=status)
            return JSONResponse({"error": {"type": type_name, "message": message}}, status_code=status)

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith("/v1/") and request.headers.get("authorization") != (
                f"Bearer {TOKEN}"
            ):
                return error(401, "AuthError", "The request carries no valid bearer token.")
            response: Response = await call_next(request)
            return response

        @app.get("/v1/session")
        def session() -> SessionInfo:
            return SessionInfo(
                tenant="alice",
                store=stub.store.config(),
                staging_threshold=stub.threshold,
                limits=Limits(),
                version="stub",
            )

        @app.post("/v1/functions")
        def register(body: RegisterFunction) -> FunctionSpec:
            stub.functions[f"{body.name}@1"] = restore_function(_serde.loads(body.artifact, what="function"))
            return FunctionSpec(name=body.name, version=1, digest=_serde.digest_of(body.artifact))

        @app.get("/v1/functions")
        def functions() -> list[FunctionSpec]:
            return [FunctionSpec(name=n.split("@")[0], version=1, digest="0" * 64) for n in stub.functions]

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": []}

        @app.get("/v1/pool")
        def pool() -> dict[str, Any]:
            return {"counters": {"submitted": len(stub.names)}, "models": {}, "workers": []}

        @app.post("/v1/invocations", response_model=None)
        async def submit(body: SubmitRequest) -> InvocationView | Response:
            if stub.fail_submit is not None:
                return error(*stub.fail_submit)
            if body.function not in stub.functions:
                return error(404, "NotFoundError", f"No function {body.function!r} is registered.")
            invocation_id = stub._start(body.function, body)
            deadline = time.monotonic() + body.wait
            while invocation_id not in stub.results and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            return stub._view(invocation_id)

        @app.post("/v1/invocation-batches", response_model=None)
        def batch(body: BatchRequest) -> BatchView | Response:
            if stub.fail_submit is not None:
                return error(*stub.fail_submit)
            if not stub.batch_gate.wait(30):
                return error(503, "PoolClosedError", "The test never opened the gate.")
            stub.batch_sizes.append(len(body.items))
            ids = [stub._start(body.function, item) for item in body.items]
            return BatchView(batch_id=new_id(), ids=ids)

        @app.get("/v1/invocations/{invocation_id}", response_model=None)
        def invocation(invocation_id: str) -> InvocationView | Response:
            if invocation_id not in stub.names:
                return error(404, "NotFoundError", f"No invocation {invocation_id!r} is known.")
            return stub._view(invocation_id)

        @app.post("/v1/invocations/{invocation_id}/cancel")
        def cancel(invocation_id: str) -> CancelView:
            stub.cancelled.append(invocation_id)
            info = ErrorInfo(kind="cancelled", type_name="InvocationCancelled", message="Cancelled.")
            view = stub.results.setdefault(
                invocation_id, ResultView(id=invocation_id, status="cancelled", error=info)
            )
            return CancelView(id=invocation_id, cancelled=view.status == "cancelled", status=view.status)

        @app.get("/v1/invocations/{invocation_id}/logs")
        def logs(invocation_id: str) -> PlainTextResponse:
            return PlainTextResponse(f"logs of {invocation_id}\n")

        @app.post("/v1/watch", response_model=None)
        async def watch(body: WatchRequest) -> Response:
            stub.watch_requests += 1
            if stub.watch_always_unavailable or stub.watch_unavailable > 0:
                stub.watch_unavailable -= 1
                return error(503, "PoolClosedError", "The service is restarting.")
            unknown = [i for i in body.ids if i not in stub.names]
            if unknown:
                return error(404, "NotFoundError", f"No invocation {unknown[0]!r} is known.")
            cut, stub.break_after = stub.break_after, None
            return StreamingResponse(stub._events(body.ids, cut), media_type="text/event-stream")

        return app

    async def _events(self, ids: list[str], cut: int | None) -> AsyncIterator[bytes]:
        self.open_watches += 1
        try:
            if self.noise:
                yield b": ping\n\nevent: progress\ndata: {}\n\nevent: result\ndata: {not json\n\n"
                yield b'event: result\ndata: {"id": "elsewhere", "status": "queued"}\n\n'
            sent: set[str] = set()
            while len(sent) < len(ids):
                for invocation_id in ids:
                    view = self.results.get(invocation_id)
                    if invocation_id in sent or view is None or view.status not in FINAL_STATES:
                        continue
                    if cut is not None and len(sent) >= cut:
                        raise ConnectionResetError("stub: cutting the stream")
                    sent.add(invocation_id)
                    yield f"event: result\ndata: {view.model_dump_json()}\n\n".encode()
                await asyncio.sleep(0.002)
            yield b"event: end\ndata: {}\n\n"
        finally:
            self.open_watches -= 1


@pytest.fixture(scope="module")
def stub_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StubService, str]]:
    stub = StubService(tmp_path_factory.mktemp("stub"))
    with serve(stub.app) as url:
        yield stub, url
    stub.runner.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def stub(stub_service: tuple[StubService, str]) -> Iterator[StubService]:
    service = stub_service[0]
    yield service
    service.release.set()
    service.batch_gate.set()
    service.fail_submit = None
    service.watch_unavailable = 0
    service.watch_always_unavailable = False
    service.break_after = None
    service.noise = False


@pytest.fixture
def make_client(stub_service: tuple[StubService, str]) -> Iterator[Callable[..., faas.RemoteClient]]:
    clients: list[faas.RemoteClient] = []

    def make(**options: Any) -> faas.RemoteClient:
        options.setdefault("token", TOKEN)
        client = faas.RemoteClient(stub_service[1], **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown()


@pytest.fixture
def client(make_client: Callable[..., faas.RemoteClient]) -> faas.RemoteClient:
    return make_client()


# -- the calls -----------------------------------------------------------------------------------
def test_submit_remote_aio(client: faas.RemoteClient) -> None:
    fn = add.with_client(client)
    fut = fn.submit(2, 3)
    assert isinstance(fut, faas.Future)
    assert fut.result(timeout=10) == 5
    assert fn.remote(4, 5) == 9
    assert asyncio.run(fn.aio(1, 1)) == 2


def test_remote_is_one_round_trip(client: faas.RemoteClient) -> None:
    fn = add.with_client(client)
    fn.remote(0, 0)  # session and registration happen once
    with count_requests(client) as counter:
        assert fn.remote(20, 22) == 42
    assert counter.by_route == {"POST /v1/invocations": 1}


def test_map_of_2000_uses_batches_and_streams(client: faas.RemoteClient) -> None:
    fn = add.with_client(client)
    with count_requests(client) as counter:
        assert list(fn.map(range(2000), range(2000))) == [2 * i for i in range(2000)]
    assert counter.count("POST /v1/invocation-batches") == 2
    assert counter.count("GET /v1/invocations/{id}") == 0
    assert counter.total <= 10, counter.by_route


def test_a_loop_of_submits_is_pipelined_into_batches(client: faas.RemoteClient, stub: StubService) -> None:
    fn = add.with_client(client)
    fn.remote(0, 0)  # session and registration happen once
    stub.batch_sizes.clear()
    stub.batch_gate.clear()  # the first batch waits on the wire while the loop goes on
    with count_requests(client) as counter:
        futures = [fn.submit(i, i) for i in range(600)]  # returns at once: nothing is answered yet
        assert wait_for(lambda: len(stub.batch_sizes) == 0 and not futures[0].done(), timeout=5)
        stub.batch_gate.set()
        ids = [f.invocation_id for f in futures]  # waits for the answers
    assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(600)]
    assert len(set(ids)) == 600
    assert sum(stub.batch_sizes) == 600
    # The first request took what had queued when it left (a few); the rest went as one batch.
    assert counter.count("POST /v1/invocation-batches") == len(stub.batch_sizes) <= 3, stub.batch_sizes
    assert counter.count("POST /v1/invocations") == 0


def test_batches_are_cut_by_count_and_by_inline_bytes() -> None:
    items = [Item(args=b"x" * 10) for _ in range(5)]
    assert list(chunks(items, max_items=3, max_bytes=25)) == [range(0, 2), range(2, 4), range(4, 5)]
    assert list(chunks(items, max_items=2, max_bytes=1000)) == [range(0, 2), range(2, 4), range(4, 5)]
    assert list(chunks([Item(args=b"x" * 50)], max_items=3, max_bytes=25)) == [range(0, 1)]
    assert list(chunks([])) == []


def test_shutdown_sends_the_queued_submits_first(
    make_client: Callable[..., faas.RemoteClient], stub: StubService
) -> None:
    client = make_client()
    fn = add.with_client(client)
    fn.remote(0, 0)
    before = len(stub.items)
    stub.batch_gate.clear()
    futures = [fn.submit(i, 1) for i in range(100)]
    closer = threading.Thread(target=client.shutdown)
    closer.start()
    assert wait_for(lambda: closer.is_alive() and not futures[-1].done(), timeout=5)
    stub.batch_gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert len(stub.items) - before == 100  # every queued submit reached the service
    assert all(plausible(f.invocation_id) for f in futures)
    with pytest.raises(faas.PoolClosedError):
        fn.submit(1, 1)


def test_a_script_that_submits_and_exits_still_sends_them(
    stub_service: tuple[StubService, str], tmp_path: Path
) -> None:
    stub, url = stub_service
    before = len(stub.items)
    script = tmp_path / "fire_and_forget.py"
    script.write_text(
        "import faas\n"
        "@faas.function()\n"
        "def double(x: int) -> int:\n"
        "    return 2 * x\n"
        f"client = faas.RemoteClient({url!r}, token={TOKEN!r})\n"
        "futures = [double.with_client(client).submit(i) for i in range(50)]\n"
        "print('submitted', len(futures))\n"  # and exits without waiting or shutting down
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "submitted 50" in done.stdout
    assert len(stub.items) - before == 50


def test_map_return_exceptions_keeps_order(client: faas.RemoteClient) -> None:
    fn = boom.with_client(client)
    out = list(fn.map(["a", "b"], return_exceptions=True))
    assert [type(e) for e in out] == [ValueError, ValueError]
    assert [str(e) for e in out] == ["a", "b"]
    with pytest.raises(ValueError, match="a"):
        list(fn.map(["a"]))


def test_bad_arguments_submit_nothing(client: faas.RemoteClient, stub: StubService) -> None:
    before = len(stub.names)
    with pytest.raises(faas.SubmitError, match="Bad arguments"):
        list(add.with_client(client).map([1, 2], [1, "x", 3], kwargs={"c": 1}))
    assert len(stub.names) == before


def test_large_values_go_through_the_store(client: faas.RemoteClient, stub: StubService) -> None:
    assert size_of.with_client(client).remote(b"x" * 50_000) == 50_000
    item = stub.items[-1]
    assert item.refs and len(item.args) < 2_000  # only the reference travelled
    assert blob.with_client(client).remote(40_000) == b"y" * 40_000  # staged result, read from the store
    ref = client.put(b"z" * 10_000)
    assert size_of.with_client(client).remote(ref) == 10_000


def test_user_errors_are_rebuilt(client: faas.RemoteClient) -> None:
    with pytest.raises(ValueError, match="kaput") as info:
        boom.with_client(client).remote("kaput")
    assert "Remote traceback" in "".join(getattr(info.value, "__notes__", []))


def test_attach_and_from_id(client: faas.RemoteClient, make_client: Callable[..., faas.RemoteClient]) -> None:
    futures = [add.with_client(client).submit(i, i) for i in range(5)]
    ids = [f.invocation_id for f in futures]
    other = make_client()
    attached = [faas.Future.from_id(i, client=other) for i in ids]
    assert [f.result(timeout=10) for f in attached] == [2 * i for i in range(5)]
    with pytest.raises(faas.NotFoundError, match="No invocation"):
        other.attach("f" * 32)


def test_submit_by_name(client: faas.RemoteClient) -> None:
    add.with_client(client).remote(0, 0)  # registers "add"
    assert client.submit_by_name("add@1", (), {"a": 2, "b": 5}).result(timeout=10) == 7
    with pytest.raises(faas.NotFoundError, match="No function"):
        client.submit_by_name("nothing", (1,), {})


def test_cancel(client: faas.RemoteClient, stub: StubService) -> None:
    stub.release.clear()
    fut = add.with_client(client).submit(1, 2)
    assert fut.cancel()
    assert stub.cancelled[-1] == fut.invocation_id
    assert fut.cancelled()
    stub.release.set()


def test_listings_status_logs(client: faas.RemoteClient) -> None:
    fut = add.with_client(client).submit(1, 1)
    assert fut.result(timeout=10) == 2
    assert "add" in [f.name for f in client.list_functions()]
    assert client.list_models() == []
    assert client.pool_status()["counters"]["submitted"] >= 1
    assert client.logs(fut.invocation_id) == f"logs of {fut.invocation_id}\n"
    view = client.invocation(fut.invocation_id)
    assert view.status == "succeeded"


def test_local_with_a_model_is_refused(client: faas.RemoteClient) -> None:
    with pytest.raises(
        faas.UnsupportedOperationError, match=r"RemoteClient does not support model_handle: .*\.remote\(\)"
    ):
        with_model.with_client(client).local("hi")


def test_shutdown_fails_pending_futures(client: faas.RemoteClient, stub: StubService) -> None:
    stub.release.clear()
    fut = add.with_client(client).submit(1, 2)
    client.shutdown()
    with pytest.raises(faas.PoolClosedError, match="from_id"):
        fut.result(timeout=10)
    with pytest.raises(faas.PoolClosedError):
        add.with_client(client).submit(1, 2)


# -- the watch streams ---------------------------------------------------------------------------
def test_stream_cut_mid_way_is_resumed(client: faas.RemoteClient, stub: StubService) -> None:
    stub.release.clear()
    stub.break_after = 2  # the first watch request is cut after two results
    futures = client.submit_many(add, [((i, 2), {}) for i in range(8)])
    stub.release.set()
    assert [f.result(timeout=20) for f in futures] == [i + 2 for i in range(8)]
    assert client._watcher.streams_opened >= 2


def test_stream_retries_503_until_the_service_is_back(client: faas.RemoteClient, stub: StubService) -> None:
    stub.release.clear()
    stub.watch_unavailable = 3
    fut = add.with_client(client).submit(5, 5)
    wait_for(lambda: stub.watch_unavailable <= 0, what="three refused watch requests")
    stub.release.set()
    assert fut.result(timeout=20) == 10


def test_stream_gives_up_after_the_deadline(
    make_client: Callable[..., faas.RemoteClient], stub: StubService
) -> None:
    client = make_client(reconnect_deadline=0.3)
    stub.release.clear()
    stub.watch_always_unavailable = True
    fut = add.with_client(client).submit(5, 5)
    error = fut.exception(timeout=20)
    assert isinstance(error, faas.ServiceError)
    assert "did not come back within 0.3 s" in str(error)
    assert fut.invocation_id in str(error)


def test_stream_ignores_pings_junk_and_foreign_events(client: faas.RemoteClient, stub: StubService) -> None:
    stub.noise = True
    stub.release.clear()
    fut = add.with_client(client).submit(1, 2)
    stub.release.set()
    assert fut.result(timeout=10) == 3


def test_stream_count_stays_capped(client: faas.RemoteClient, stub: StubService) -> None:
    client._watcher.max_streams = 2
    client._watcher.max_coalesce = 0.0  # every submit would open a stream of its own
    stub.release.clear()
    futures = [add.with_client(client).submit(i, 0) for i in range(12)]
    assert len(client._watcher._streams) <= 2
    stub.release.set()
    assert [f.result(timeout=20) for f in futures] == list(range(12))
    wait_for(lambda: not client._watcher._streams, what="the client's streams to close")
    assert client._watcher.streams_opened > 2  # streams were merged, not simply never opened


def test_one_unknown_id_does_not_fail_the_rest(client: faas.RemoteClient, stub: StubService) -> None:
    stub.release.clear()
    good = add.with_client(client).submit(1, 1)
    ghost: faas.Future[Any] = faas.Future("0" * 32)
    client._watcher.add([("0" * 32, ghost), (good.invocation_id, good)])
    stub.release.set()
    assert good.result(timeout=10) == 2
    assert isinstance(ghost.exception(timeout=10), faas.NotFoundError)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "type_name", "expected"),
    [
        (400, "UnknownModelError", faas.UnknownModelError),
        (400, "SerializationError", faas.SerializationError),
        (400, "SomethingElse", faas.SubmitError),
        (413, "PayloadTooLarge", faas.SubmitError),
        (401, "AuthError", faas.AuthError),
        (404, "NotFoundError", faas.NotFoundError),
        (429, "QuotaExceededError", faas.QuotaExceededError),
        (429, "BackPressureError", faas.BackPressureError),
        (503, "PoolClosedError", faas.PoolClosedError),
        (500, "InternalError", faas.ServiceError),
        (502, "__text__", faas.ServiceError),
    ],
)
def test_error_mapping(
    client: faas.RemoteClient, stub: StubService, status: int, type_name: str, expected: type[Exception]
) -> None:
    message = f"The service says no ({status})."
    stub.fail_submit = (status, type_name, message)
    fn = add.with_client(client)
    with pytest.raises(expected) as info:
        fn.remote(1, 2)  # synchronous: raised by the call
    future = fn.submit(1, 2)  # pipelined: the same error arrives on the future
    refusal = future.exception(timeout=10)
    for error in (info.value, refusal):
        assert type(error) is expected
        assert message in str(error)
        assert getattr(error, "status_code", None) == status
    with pytest.raises(expected):
        future.invocation_id  # noqa: B018 (the refused submit has no id; reading it says why)
    assert future.cancel() is False


def test_tokens_never_show(
    make_client: Callable[..., faas.RemoteClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-7a9b8c"
    client = make_client(token=wrong)
    with pytest.raises(faas.AuthError) as info:
        add.with_client(client).remote(1, 2)
    assert info.value.status_code == 401
    assert "bearer token" in str(info.value)
    unreachable = faas.RemoteClient("http://127.0.0.1:9", token=wrong, timeout=2)
    with pytest.raises(faas.ServiceError) as down:
        unreachable.list_functions()
    with pytest.raises(faas.ServiceError) as down_post:  # a POST: the plain keep-alive path
        add.with_client(unreachable).remote(1, 2)
    unreachable.shutdown()
    assert "Could not reach the faas service at http://127.0.0.1:9" in str(down.value)
    assert "Could not reach the faas service at http://127.0.0.1:9 for POST /v1/functions" in str(
        down_post.value
    )
    texts = (str(info.value), repr(info.value), str(down.value), str(down_post.value), repr(client))
    for text in (*texts, caplog.text):
        assert wrong not in text and TOKEN not in text


def test_a_service_that_never_answers_a_post_times_out() -> None:
    with socket.socket() as mute:  # accepts connections (the kernel does) and never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        client = faas.RemoteClient(f"http://127.0.0.1:{mute.getsockname()[1]}", token=TOKEN, timeout=0.5)
        try:
            with pytest.raises(faas.ServiceError, match="did not answer POST /v1/functions in time"):
                add.with_client(client).remote(1, 2)
        finally:
            client.shutdown()


def test_faas_url_selects_the_remote_client(
    stub_service: tuple[StubService, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faas.clients._default, "_default", None)
    monkeypatch.setenv("FAAS_URL", stub_service[1])
    monkeypatch.setenv("FAAS_TOKEN", TOKEN)
    client = faas.get_client()
    try:
        assert isinstance(client, faas.RemoteClient)
        assert faas.get_client() is client
        assert add.remote(3, 4) == 7  # an unbound function uses the default client
    finally:
        faas.shutdown()
    configured = faas.configure(url=stub_service[1], token=TOKEN)
    try:
        assert isinstance(configured, faas.RemoteClient)
        assert faas.get_client() is configured
    finally:
        faas.shutdown()


# -- the embedded client's parity methods ------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    store = tmp_path_factory.mktemp("embedded-store").as_uri()
    with faas.Client(store=store, workers=1, threads_per_worker=8, records="sync") as client:
        yield client


def test_embedded_parity(embedded: faas.Client, tmp_path: Path) -> None:
    fn = add.with_client(embedded)
    assert fn.remote(1, 2) == 3
    assert embedded.call(fn, (2, 2), {}, timeout=30) == 4
    futures = embedded.submit_many(fn, [((i, 1), {}) for i in range(5)])
    assert [f.result(timeout=30) for f in futures] == [1, 2, 3, 4, 5]
    assert list(fn.map(range(3), range(3))) == [0, 2, 4]
    done = futures[0].invocation_id
    assert embedded.invocation(done).status == "succeeded"
    assert isinstance(embedded.logs(done), str)
    assert "add" in [f.name for f in embedded.list_functions()]
    assert isinstance(embedded.list_models(), list)
    assert "counters" in embedded.pool_status()
    # Another client on the same store re-attaches from the records.
    with faas.Client(store=embedded.store) as other:
        assert faas.Future.from_id(done, client=other).result(timeout=5) == 1
        with pytest.raises(faas.NotFoundError, match="No invocation"):
            other.attach("e" * 32)
        with pytest.raises(faas.NotFoundError):
            other.invocation("e" * 32)


def test_embedded_attach_waits_for_a_running_invocation(embedded: faas.Client) -> None:
    release = embedded.store.url()  # any value: the function just waits for a file to appear
    flag = Path(release.removeprefix("file://")) / "release-flag"

    @faas.function(timeout=30)
    def wait_for_flag(path: str) -> str:
        import pathlib

        deadline = time.monotonic() + 20
        while not pathlib.Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"

    fut = wait_for_flag.with_client(embedded).submit(str(flag))
    with faas.Client(store=embedded.store) as other:
        attached = other.attach(fut.invocation_id)
        assert not attached.done()
        flag.write_text("go")
        assert attached.result(timeout=30) == "released"


def test_remote_client_rejects_a_bad_url() -> None:
    with pytest.raises(ValueError, match="http://"):
        faas.RemoteClient("127.0.0.1:8000")
