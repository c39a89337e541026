"""The function and invocation commands against a running ``faas serve`` (FAAS_URL set)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import faas
from tests.faas._service_helpers import faas_service  # noqa: F401
from tests.faas._service_proc import TOKENS, ServiceProc
from tests.faas.test_cli_service import invocation_id, run

MODULE = """
import faas


@faas.function(timeout=30)
def shout(word: str, times: int = 1) -> str:
    print(f"shouting {word}")
    return (word.upper() + " ") * times
"""


@pytest.fixture(autouse=True)
def remote_default(faas_service: ServiceProc, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: F811
    """Point the commands' default client at the service, as FAAS_URL/FAAS_TOKEN would."""
    monkeypatch.setenv("FAAS_URL", faas_service.url)
    monkeypatch.setenv("FAAS_TOKEN", TOKENS["alice"])
    faas.shutdown()  # the next get_client() reads the environment
    yield
    faas.shutdown()


def test_deploy_ls_invoke_result_logs_through_the_service(tmp_path: Path) -> None:
    assert isinstance(faas.get_client(), faas.RemoteClient)
    module = tmp_path / "remote_funcs.py"
    module.write_text(textwrap.dedent(MODULE))
    assert "shout" in run("deploy", str(module)).stdout
    assert [s["name"] for s in json.loads(run("ls", "--json").stdout)] == ["shout"]

    out = run("invoke", "shout", "--arg", "word=hey", "--json", '{"times": 2}').stdout
    assert out.strip() == "HEY HEY"
    inv = invocation_id(run("invoke", "shout", "-a", "word=later", "--no-wait"))
    assert run("result", inv, "--timeout", "60").stdout.strip() == "LATER"
    assert "succeeded" in run("status", inv).stdout
    assert run("logs", inv).stdout == "shouting later\n"
    assert "was not cancelled" in run("cancel", inv, code=1).stderr
    assert "No function 'missing'" in run("invoke", "missing", code=2).stderr
