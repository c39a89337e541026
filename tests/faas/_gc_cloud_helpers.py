"""The Globus Compute cloud client's network edge, faked: a loopback web service, results queue and endpoint.

Real: the SDK's ``Executor`` and ``Client`` (function registration, batching,
task submission thread, ``ComputeSerializer``, result matching and
deserialisation in its ``_ResultWatcher``), the endpoint's own
``execute_task`` running each task in a separate spawned process, and the faas
runtime on that "endpoint". Faked: ``Client._compute_web_client`` (the HTTPS
API of the web service) and the AMQP results queue (see
``tests/faas/test_gc_cloud.py`` for the full story).

Used by ``test_gc_cloud.py`` and the cloud case of ``test_client_contract.py``;
callers skip first when ``globus_compute_sdk``/``globus_compute_endpoint`` are
not installed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future as StdFuture
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

import globus_sdk
import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result as GcResult
from globus_compute_common.messagepack.message_types import Task
from globus_compute_endpoint.engines.helper import execute_task
from globus_compute_sdk import Client as SdkClient
from globus_compute_sdk import Executor
from globus_compute_sdk.sdk import executor as sdk_executor
from pika.spec import Basic, BasicProperties

from faas.clients._gc_cloud import GlobusComputeCloudClient, SdkExecutor
from registry import ModelSpec, Registry
from runtime._store_factory import store_from_url
from tests._s3_servers import S3Server
from tests.warmpool._cpu_engine_proc import running_engine

ENDPOINT = "6b0ef9b3-8f2a-4b0e-9d1e-6f8f3a1c2d4e"
THRESHOLD = 64 << 10


# -- the loopback web service, results queue and endpoint ---------------------------------------
def _endpoint_worker_init(env: dict[str, str]) -> None:
    os.environ.update(env)


class _Response:
    """What the SDK reads of a globus_sdk response: ``.data``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


class LoopbackComputeService:
    """Stands in for ``Client._compute_web_client`` (``v3``) and the AMQP results queue."""

    def __init__(self, endpoint_id: str, env: dict[str, str], run_dir: Path) -> None:
        self.v3 = self
        self.endpoint_id = endpoint_id
        self.run_dir = run_dir
        self.functions: dict[str, str] = {}
        self.registrations: list[dict[str, Any]] = []
        self.submissions: list[bytes] = []  # request bodies as they would go over HTTPS
        self.refuse: list[Exception] = []  # errors for the next submissions
        self.task_group_id = str(uuid.uuid4())
        self._lock = threading.Lock()
        self._inboxes: list[queue.Queue[bytes]] = []
        self._backlog: list[bytes] = []
        self.pool = ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_endpoint_worker_init,
            initargs=(env,),
        )

    # ComputeClientV3
    def register_function(self, data: dict[str, Any]) -> _Response:
        json.dumps(data)  # it must survive the trip as JSON
        function_id = str(uuid.uuid4())
        self.registrations.append(data)
        self.functions[function_id] = data["function_code"]
        return _Response({"function_uuid": function_id})

    def submit(self, endpoint_id: Any, data: dict[str, Any]) -> _Response:
        self.submissions.append(json.dumps(data).encode())
        if self.refuse:
            raise self.refuse.pop(0)
        assert str(endpoint_id) == self.endpoint_id
        tasks: dict[str, list[str]] = {}
        for function_id, payloads in data["tasks"].items():
            for payload in payloads:  # the service prepends the function's buffer to the arguments'
                task_id = uuid.uuid4()
                body = messagepack.pack(
                    Task(task_id=task_id, task_buffer=self.functions[function_id] + payload)
                )
                done = self.pool.submit(
                    execute_task, body, task_id, uuid.UUID(self.endpoint_id), run_dir=str(self.run_dir)
                )
                done.add_done_callback(lambda f, t=task_id: self._deliver(t, f))
                tasks.setdefault(function_id, []).append(str(task_id))
        return _Response(
            {
                "tasks": tasks,
                "task_group_id": self.task_group_id,
                "request_id": str(uuid.uuid4()),
                "endpoint_id": self.endpoint_id,
            }
        )

    # the results queue
    def _deliver(self, task_id: uuid.UUID, done: StdFuture[bytes]) -> None:
        exc = done.exception()
        body = done.result() if exc is None else messagepack.pack(GcResult(task_id=task_id, data=repr(exc)))
        with self._lock:
            if not self._inboxes:
                self._backlog.append(body)
            for inbox in self._inboxes:
                inbox.put(body)

    def connect(self) -> queue.Queue[bytes]:
        inbox: queue.Queue[bytes] = queue.Queue()
        with self._lock:
            for body in self._backlog:
                inbox.put(body)
            self._backlog.clear()
            self._inboxes.append(inbox)
        return inbox

    def close(self) -> None:
        for watcher in list(sdk_executor._RESULT_WATCHERS.values()):
            if isinstance(watcher, LoopbackResultWatcher):
                watcher.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


class LoopbackResultWatcher(sdk_executor._ResultWatcher):
    """The SDK's result watcher, reading packed Result messages from the loopback instead of AMQP."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_period_s = 0.02

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        inbox = cast(LoopbackComputeService, self.client._compute_web_client).connect()
        tag = 0
        while not self._time_to_stop:
            with contextlib.suppress(queue.Empty):
                body = inbox.get(timeout=self.poll_period_s)
                tag += 1
                props = BasicProperties(headers={}, timestamp=int(time.time()))
                self._on_message(cast(Any, None), Basic.Deliver(delivery_tag=tag), props, body)
            if self._time_to_check_results.is_set():
                self._time_to_check_results.clear()
                self._match_results_to_futures()
                self._to_ack.clear()


def loopback_factory(service: LoopbackComputeService, made: list[Executor]) -> Callable[[str], SdkExecutor]:
    def factory(endpoint_id: str) -> SdkExecutor:
        client = SdkClient(authorizer=globus_sdk.NullAuthorizer(), do_version_check=False)
        client._compute_web_client = service  # type: ignore[assignment]
        # the SDK's client-side rate limit (4 sends per 16 s) would only slow these tests down
        executor = Executor(endpoint_id=endpoint_id, client=client, api_burst_limit=8, api_burst_window_s=1)
        made.append(executor)
        return cast(SdkExecutor, executor)

    return factory


def never(endpoint_id: str) -> SdkExecutor:
    """An executor factory for clients that must not send anything."""
    raise AssertionError("no executor may be built")


@contextlib.contextmanager
def endpoint_engine(model_path: Path, tmp: Path) -> Iterator[str]:
    """The CPU engine the endpoint's workers reach at ``FAAS_ENGINE_URL``, serving the tiny model; its URL."""
    with running_engine(model_path, tmp, "--threads", "1", "--served-model-name", "tiny-llama") as proc:
        yield proc.url


def cloud_store_url(s3: S3Server, tiny_model_path: Path) -> str:
    """A fresh bucket on ``s3`` with the tiny model registered, as the endpoint's store."""
    url = s3.store_url(s3.new_bucket("gc-cloud"), "faas")
    Registry(store_from_url(url)).register_model(
        ModelSpec(name="tiny-llama", model_path=str(tiny_model_path))
    )
    return url


@contextlib.contextmanager
def loopback_service(engine_url: str, run_dir: Path) -> Iterator[LoopbackComputeService]:
    """The loopback web service with the SDK's result watcher swapped; checks nothing outlives it."""
    svc = LoopbackComputeService(ENDPOINT, {"FAAS_ENGINE_URL": engine_url}, run_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdk_executor, "_ResultWatcher", LoopbackResultWatcher)
        yield svc
        processes = list(svc.pool._processes.values())  # type: ignore[attr-defined]
        svc.close()
    assert processes and not [p for p in processes if p.is_alive()], "an endpoint worker outlived the test"
    assert not [t for t in threading.enumerate() if isinstance(t, LoopbackResultWatcher) and t.is_alive()]


@contextlib.contextmanager
def cloud_client(
    service: LoopbackComputeService, store_url: str, executors: list[Executor]
) -> Iterator[GlobusComputeCloudClient]:
    """A cloud client sending through ``service``; every executor it builds is appended to ``executors``."""
    client = GlobusComputeCloudClient(
        ENDPOINT,
        store=store_url,
        staging_threshold=THRESHOLD,
        executor_factory=loopback_factory(service, executors),
    )
    yield client
    client.shutdown()
    for executor in executors:  # shutdown() hands each submitter thread its poison pill
        executor._task_submitter.join(30)
        assert not executor._task_submitter.is_alive(), "an SDK submitter thread outlived the client"
