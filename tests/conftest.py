"""Shared fixtures: a hermetic cache (with the tiny model built once per session) and clients."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._machine_share import machine_share

# The local S3 servers are session fixtures for every module (one instance each per session).
from tests._s3_servers import aws_env, moto_server, seaweedfs_server  # noqa: F401

# Every process the tests start (engines, workers) inherits this cache, so the
# tiny model is built once per session and never read from the user's cache.
_SESSION_CACHE = os.environ.get("FAAS_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="faas-test-cache-")
os.environ["FAAS_CACHE_DIR"] = _SESSION_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("FAAS_STORE", None)


@pytest.fixture(autouse=True)
def _machine_share(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under ``-n 2``, a test marked ``quiet`` runs while the other process waits (see _machine_share)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield  # one process: nothing runs beside the test
        return
    # Every worker's base temp is a folder of the run's own: the lock files live there.
    folder = tmp_path_factory.getbasetemp().parent
    with machine_share(folder, exclusive=request.node.get_closest_marker("quiet") is not None):
        yield


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny offline Llama, built once per session into the session cache."""
    override = os.environ.get("FAAS_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from warmpool.cpu_engine._tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def local_store_url(tmp_path: Path) -> str:
    """A fresh local store URL."""
    return (tmp_path / "store").as_uri()


@pytest.fixture(scope="module", params=["file", "seaweedfs"])
def module_client(
    request: pytest.FixtureRequest, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """A faas Client with a warm pool, shared by one test module; once per store kind.

    ``file``: a local store. ``seaweedfs``: a bucket on the session's SeaweedFS,
    with its credentials in the environment for the module (workers inherit it).
    """
    import faas

    with contextlib.ExitStack() as stack:
        if request.param == "file":
            store = tmp_path_factory.mktemp("store").as_uri()
        else:
            server = request.getfixturevalue("seaweedfs_server")
            stack.enter_context(aws_env(server, tmp_path_factory.mktemp("aws")))
            store = server.store_url(server.new_bucket("e2e"), "e2e")
        client = faas.Client(store=store, workers=2)
        yield client
        client.shutdown()
