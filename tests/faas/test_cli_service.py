"""The function and invocation commands (faas/cli/_service.py) against the embedded client."""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

import faas
from faas.cli._service import register_commands

MODULE = '''
import os
import sys
import time

import faas


@faas.function(timeout=30)
def double(n: int) -> int:
    print(f"doubling {n}")
    print("to stderr", file=sys.stderr)
    return 2 * n


@faas.function(timeout=30)
def greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


@faas.function(timeout=30)
def explode(message: str) -> None:
    raise ValueError(message)


@faas.function(timeout=120)
def linger(marker: str, seconds: float) -> str:
    """Say it started (through a file), then run until cancelled or ``seconds`` pass."""
    open(marker, "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


not_a_function = 42
'''

app = typer.Typer()
register_commands(app)
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def default_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    """The default client (what the commands use): a fresh store and one worker."""
    client = faas.configure(store=tmp_path_factory.mktemp("store").as_uri(), workers=1)
    assert isinstance(client, faas.Client)
    yield client
    faas.shutdown()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Result:
    path = tmp_path_factory.mktemp("module") / "cli_funcs.py"
    path.write_text(textwrap.dedent(MODULE))
    return run("deploy", str(path))


def run(*args: str, code: int = 0) -> Result:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def invocation_id(result: Result) -> str:
    match = re.search(r"\b[0-9a-f]{16,}\b", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return match.group(0)


def test_deploy_registers_every_function(deployed: Result) -> None:
    for name in ("double", "greet", "explode", "linger"):
        assert name in deployed.stdout
    assert "not_a_function" not in deployed.stdout


def test_deploy_refuses_a_file_without_functions(tmp_path: Path) -> None:
    empty = tmp_path / "empty_mod.py"
    empty.write_text("x = 1\n")
    assert "defines no @faas.function" in run("deploy", str(empty), code=2).stderr
    assert "No such file" in run("deploy", str(tmp_path / "missing.py"), code=2).stderr


def test_ls(deployed: Result) -> None:
    out = run("ls").stdout
    assert all(name in out for name in ("double", "greet", "linger"))
    specs = json.loads(run("ls", "--json").stdout)
    assert {s["name"] for s in specs} >= {"double", "greet", "explode", "linger"}


def test_invoke_status_result_logs(deployed: Result) -> None:
    assert run("invoke", "double", "--arg", "n=21").stdout.strip() == "42"
    out = run("invoke", "greet", "--arg", "name=world", "--json", '{"punctuation": "?"}').stdout
    assert out.strip() == "hello world?"

    inv = invocation_id(run("invoke", "double", "-a", "n=5", "--no-wait"))
    assert run("result", inv, "--timeout", "60").stdout.strip() == "10"
    assert "succeeded" in run("status", inv).stdout
    assert json.loads(run("status", inv, "--json").stdout)["status"] == "succeeded"
    assert run("logs", inv).stdout == "doubling 5\nto stderr\n"


def test_failures_and_bad_input(deployed: Result) -> None:
    failed = run("invoke", "explode", "--arg", "message=kaboom", code=1)
    assert "ValueError: kaboom" in failed.stderr
    assert "No function 'nope'" in run("invoke", "nope", code=2).stderr
    assert "key=value" in run("invoke", "double", "--arg", "oops", code=2).stderr
    assert "JSON object" in run("invoke", "double", "--json", "[1]", code=2).stderr
    assert "No invocation" in run("result", "0" * 32, code=2).stderr
    assert "No invocation" in run("logs", "0" * 32, code=2).stderr


def test_cancel_a_running_invocation(deployed: Result, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    inv = invocation_id(
        run("invoke", "linger", "--arg", f"marker={marker}", "--arg", "seconds=60", "--no-wait")
    )
    deadline = time.monotonic() + 60
    while not marker.exists():  # poll the side channel: the function has started
        assert time.monotonic() < deadline, "the invocation did not start within 60 s"
        time.sleep(0.02)
    assert "did not finish within" in run("result", inv, "--timeout", "0.2", code=3).stderr
    assert "Cancelled" in run("cancel", inv).stdout
    assert "InvocationCancelled" in run("result", inv, "--timeout", "30", code=1).stderr
    assert "cancelled" in run("status", inv).stdout
    assert "was not cancelled" in run("cancel", inv, code=1).stderr
