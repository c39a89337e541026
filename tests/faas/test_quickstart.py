"""`faas quickstart` end to end, as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_quickstart_prints_the_known_sentence(tiny_model_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FAAS_STORE": (tmp_path / "store").as_uri(), "COLUMNS": "120"}
    out = subprocess.run(
        [sys.executable, "-m", "faas.cli", "quickstart", "--futures", "16"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'The quick brown' -> ' fox jumps over the lazy dog.'" in out.stdout
    assert "16/16" in out.stdout
    assert "no process left behind" in out.stdout
