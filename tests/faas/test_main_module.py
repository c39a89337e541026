"""Callers without an importable ``__main__`` run functions on the embedded pool.

Workers never import the caller's main module, so a script read from stdin, a
script without a main guard, ``python -c`` and IPython all work. Each case is a
real interpreter running ``.remote`` and ``.map`` against a real pool, with a
function defined in ``__main__`` (pickled by value) and one that calls a helper
from a module importable only through a ``sys.path`` entry the caller added at
run time (pickled by reference: the worker needs the caller's path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from warmpool.cpu_engine._tiny_model import KNOWN_COMPLETIONS

ROOT = Path(__file__).resolve().parents[2]

# No `if __name__ == "__main__":` guard, on purpose.
SCRIPT = """\
import os, sys
sys.path.insert(0, os.environ["MAIN_TEST_MODDIR"])
import faas
from helper_mod import triple

@faas.function()
def add(a, b):
    return a + b

@faas.function()
def via_module(x):
    return triple(x)

@faas.function(model="tiny-llama", timeout=60)
def complete(model: faas.Model, prompt):
    return model.generate(prompt, sampling_params={"max_new_tokens": 16, "temperature": 0}).text

client = faas.Client(store=os.environ["MAIN_TEST_STORE"], workers=2)
print("REMOTE", add.with_client(client).remote(1, 2))
print("MAP", list(add.with_client(client).map([1, 2, 3], [10, 20, 30])))
print("BYREF", list(via_module.with_client(client).map([1, 2])))
if os.environ.get("MAIN_TEST_MODEL"):
    print("MODEL", complete.with_client(client).remote("The quick brown"))
counters = client.pool.status()["counters"]
print("WORKERS", counters["workers_started"], counters["workers_lost"])
client.shutdown()
"""


def _env(tmp_path: Path, *, model: bool = False) -> dict[str, str]:
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "MAIN_TEST_MODDIR": str(moddir),
        "MAIN_TEST_STORE": (tmp_path / "store").as_uri(),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    if model:
        env["MAIN_TEST_MODEL"] = "1"
    return env


def _check(out: subprocess.CompletedProcess[str], *, model: bool = False) -> None:
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REMOTE 3" in lines, out.stdout + out.stderr
    assert "MAP [11, 22, 33]" in lines
    assert "BYREF [3, 6]" in lines
    if model:
        assert f"MODEL {KNOWN_COMPLETIONS['The quick brown']}" in lines
    # Both workers started once and none died: no restart loop.
    assert "WORKERS 2 0" in lines, out.stdout + out.stderr


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


def test_script_on_stdin(tiny_model_path: Path, tmp_path: Path) -> None:
    out = _run([sys.executable, "-"], _env(tmp_path, model=True), tmp_path, stdin=SCRIPT)
    _check(out, model=True)


def test_script_without_main_guard(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT)
    _check(_run([sys.executable, str(script)], _env(tmp_path), tmp_path))


def test_python_dash_c(tmp_path: Path) -> None:
    _check(_run([sys.executable, "-c", SCRIPT], _env(tmp_path), tmp_path))


def test_ipython(tmp_path: Path) -> None:
    ipython = shutil.which("ipython", path=str(Path(sys.executable).parent))
    if ipython is None:
        pytest.skip("ipython is not installed (the dev extra has it)")
    argv = [ipython, "--quick", "--no-banner", "--colors=nocolor", "-c", SCRIPT]
    _check(_run(argv, _env(tmp_path), tmp_path))
