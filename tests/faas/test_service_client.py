"""The faas API against a running ``faas serve``: scripts that exit and come back, big maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import faas
from tests.faas._service_proc import TOKENS, ServiceProc

SUBMIT = """
import json, faas

@faas.function(model="tiny-llama", timeout=120, name="complete")
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 8, "temperature": 0}).text

futures = [complete.submit("The quick brown") for _ in range(20)]
print(json.dumps([f.invocation_id for f in futures]))
"""

REATTACH = """
import json, sys, faas

ids = json.loads(sys.argv[1])
futures = [faas.Future.from_id(i) for i in ids]
values = [f.result(timeout=120) for f in futures]
print(json.dumps(values))
"""


def _model_metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f"faas_model_{name}_total{{") and "tiny-llama" in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _double(x: int) -> int:
    return 2 * x


@pytest.fixture(scope="module", params=["local", "globus-compute"])
def service(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path, request: pytest.FixtureRequest
) -> Iterator[ServiceProc]:
    """The service on each substrate: the local pool, and GlobusComputeEngine blocks."""
    proc = ServiceProc(tmp_path_factory.mktemp("svc-client"), substrate=request.param).start()
    yield proc
    proc.stop()


def _script(tmp_path: Path, service: ServiceProc, source: str, *argv: str) -> str:
    path = tmp_path / f"script-{abs(hash(source))}.py"
    path.write_text(textwrap.dedent(source))
    env = {**os.environ, "FAAS_URL": service.url, "FAAS_TOKEN": TOKENS["alice"]}
    out = subprocess.run(
        [sys.executable, str(path), *argv], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_second_script_reattaches_by_id_and_finds_the_engine_warm(
    service: ServiceProc, tmp_path: Path
) -> None:
    ids = json.loads(_script(tmp_path, service, SUBMIT))
    assert len(set(ids)) == 20
    # The first script has exited; its invocations run on in the service.
    values = json.loads(_script(tmp_path, service, REATTACH, json.dumps(ids)))
    assert len(values) == 20 and len(set(values)) == 1 and values[0].startswith(" fox")
    cold = _model_metric(service.url, "cold_starts")
    assert cold == 1
    # A later script's calls find the engine warm: no new cold start.
    again = json.loads(_script(tmp_path, service, SUBMIT))
    values = json.loads(_script(tmp_path, service, REATTACH, json.dumps(again)))
    assert len(values) == 20
    assert _model_metric(service.url, "cold_starts") == cold
    assert _model_metric(service.url, "warm_hits") >= 20


def test_map_of_2000_uses_batches_and_streams_not_polls(service: ServiceProc) -> None:
    requests: Counter[str] = Counter()
    with faas.RemoteClient(service.url, token=TOKENS["alice"]) as client:
        remove = client.add_request_hook(lambda r: requests.update([f"{r.method} {r.url.path}"]))
        fn = faas.function(name="double")(_double).with_client(client)
        assert list(fn.map(range(2000), timeout=300)) == [2 * i for i in range(2000)]
        remove()
    assert requests["POST /v1/invocation-batches"] == 2
    total = sum(requests.values())
    assert total < 40, requests  # no per-item requests: batches, a few streams, session, register
    assert not any(path.startswith("GET /v1/invocations/") for path in requests), requests


def test_remote_client_errors_are_typed(service: ServiceProc) -> None:
    with faas.RemoteClient(service.url, token="wrong-token-0123456789") as client:
        fn = faas.function(name="double")(_double).with_client(client)
        with pytest.raises(faas.AuthError) as info:
            fn.remote(1)
        assert "wrong-token" not in str(info.value)
    with faas.RemoteClient(service.url, token=TOKENS["bob"]) as bob:
        with pytest.raises(faas.NotFoundError):
            faas.Future.from_id("0" * 32, client=bob).result(timeout=30)
        fn = faas.function(name="double")(_double).with_client(bob)
        assert fn.remote(21) == 42
        with pytest.raises(faas.SubmitError):
            fn.submit("a", "b")  # wrong arguments: refused before anything is sent
