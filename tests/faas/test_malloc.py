"""The service's glibc malloc settings: applied in a fresh process, skipped if the operator set glibc's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from faas.service._malloc import tune_malloc; print(tune_malloc())"


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux-only")
def test_glibc_takes_the_settings() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    assert _run(env) == "True"


def test_the_operators_own_setting_wins() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    assert _run({**env, "MALLOC_ARENA_MAX": "4"}) == "False"
