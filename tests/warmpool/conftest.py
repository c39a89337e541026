"""Fixtures shared by the CPU engine's HTTP suites (one engine per test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.warmpool._cpu_engine_proc import running_engine


@pytest.fixture(scope="module")
def url(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A CPU engine serving the tiny model as ``tiny``, started for the module."""
    with running_engine(tiny_model_path, tmp_path_factory.mktemp("engine"), "--threads", "1",
                        "--served-model-name", "tiny") as proc:  # fmt: skip
        yield proc.url


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    """A keep-alive client of that engine."""
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
