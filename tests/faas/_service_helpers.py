"""Fixtures for end-to-end tests of :class:`faas.RemoteClient` against a real ``faas serve``.

Use in a test module::

    from tests.faas._service_helpers import count_requests, faas_service, remote_client  # noqa: F401

    def test_map(remote_client):
        fn = double.with_client(remote_client("alice"))
        with count_requests(fn.client) as counter:
            assert list(fn.map(range(2000))) == [2 * i for i in range(2000)]
        assert counter.total < 20, counter.by_route

``faas_service`` starts ``python -m faas.cli serve`` on 127.0.0.1 (a free
port, its own store and state directories, a token file with the tenants of
``tests.faas._service_proc.TOKENS``), waits for ``/health`` with a deadline,
and stops it (SIGTERM, then SIGKILL) at the end of the module. It is the
lead's :class:`ServiceProc`, so ``faas_service.kill()`` and
``faas_service.start()`` restart it on the same state for crash tests.
``remote_client(tenant)`` builds RemoteClients that are shut down with the test.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import faas
from tests.faas._service_proc import TOKENS, ServiceProc

_ID = re.compile(r"/[0-9a-f]{16,}(?=/|$)")


class RequestCounter:
    """Counts the HTTP requests a RemoteClient sends, by route (ids folded into ``{id}``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_route: collections.Counter[str] = collections.Counter()

    def __call__(self, request: httpx.Request) -> None:
        route = f"{request.method} {_ID.sub('/{id}', request.url.path)}"
        with self._lock:
            self.by_route[route] += 1

    @property
    def total(self) -> int:
        """Requests seen so far."""
        with self._lock:
            return sum(self.by_route.values())

    def count(self, route: str) -> int:
        """Requests to one route, e.g. ``"POST /v1/watch"``."""
        with self._lock:
            return self.by_route[route]


@contextlib.contextmanager
def count_requests(client: Any) -> Iterator[RequestCounter]:
    """Count every HTTP request ``client`` (a faas.RemoteClient) sends inside the block."""
    if not isinstance(client, faas.RemoteClient):
        raise TypeError(f"count_requests needs a faas.RemoteClient, not {type(client).__name__}.")
    counter = RequestCounter()
    remove = client.add_request_hook(counter)
    try:
        yield counter
    finally:
        remove()


@contextlib.contextmanager
def running_service(root: Path, **options: Any) -> Iterator[ServiceProc]:
    """A started ``faas serve`` under ``root``, stopped (SIGTERM, then SIGKILL) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    service = ServiceProc(root, **options)
    try:
        yield service.start(timeout=120.0)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def faas_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    """One ``faas serve`` for the test module."""
    with running_service(tmp_path_factory.mktemp("service")) as service:
        yield service


@pytest.fixture
def remote_client(faas_service: ServiceProc) -> Iterator[Callable[..., faas.RemoteClient]]:
    """A factory of RemoteClients of ``faas_service``: ``remote_client("alice")`` (None: no token)."""
    clients: list[faas.RemoteClient] = []

    def make(tenant: str | None = "alice", **options: Any) -> faas.RemoteClient:
        token = TOKENS[tenant] if tenant else ""
        client = faas.RemoteClient(faas_service.url, token=token, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown()
