"""Shared fixtures: a hermetic cache (with the tiny model built once per session) and clients."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every process the tests start (engines, workers) inherits this cache, so the
# tiny model is built once per session and never read from the user's cache.
_SESSION_CACHE = os.environ.get("FAAS_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="faas-test-cache-")
os.environ["FAAS_CACHE_DIR"] = _SESSION_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("FAAS_STORE", None)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny offline Llama, built once per session into the session cache."""
    override = os.environ.get("FAAS_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from warmpool._tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def local_store_url(tmp_path: Path) -> str:
    """A fresh local store URL."""
    return (tmp_path / "store").as_uri()


@pytest.fixture(scope="module")
def module_client(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A faas Client with a warm pool, shared by one test module."""
    import faas

    client = faas.Client(store=(tmp_path_factory.mktemp("store")).as_uri(), workers=2)
    yield client
    client.shutdown()
