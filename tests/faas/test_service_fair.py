"""The service core hands the substrate each invocation's tenant, weight and priority."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from faas.service import ServiceCore
from faas.service._api import Item, RegisterFunction
from faas.service._app import create_app
from faas.service._auth import TokenAuth
from registry import FunctionSpec, ModelSpec
from runtime import AuthConfigError, Invocation, LocalStore, Result, dumps
from tests.faas.test_remote_client import serve
from warmpool import Replica


class RecordingPool:
    """A substrate that runs nothing and remembers what it was given."""

    id = "recording"

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.invocations: list[Invocation] = []

    def start(self, models: list[ModelSpec] | None = None) -> RecordingPool:
        return self

    def submit(
        self,
        invocation: Invocation,
        spec: FunctionSpec,
        model: ModelSpec | None,
        on_done: Callable[[Result], None],
    ) -> None:
        self.invocations.append(invocation)

    def state(self, invocation_id: str) -> str | None:
        return "queued"

    def cancel(self, invocation_id: str) -> bool:
        return False

    def prefer_warm(self, spec: ModelSpec) -> ModelSpec:
        return spec

    def engine_url(self, model: ModelSpec, timeout: float | None = None) -> str:
        raise AssertionError("no engine is needed here")

    def replicas(self, model: str | None = None) -> list[Replica]:
        return []

    def shutdown(self, timeout: float = 10.0) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}


def token_file(tmp_path: Path, weight: object) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[tenants]]\nname = "lab"\ntokens = ["lab-token-0123456789"]\nweight = {weight}\n'
        '[[tenants]]\nname = "solo"\ntokens = ["solo-token-0123456789"]\n'
    )
    return path


def test_tenant_weight_and_priority_travel_with_each_invocation(tmp_path: Path) -> None:
    auth = TokenAuth.from_file(token_file(tmp_path, 3))
    lab = auth.authenticate("lab-token-0123456789")
    solo = auth.authenticate("solo-token-0123456789")
    assert lab is not None and solo is not None
    assert lab.limits.weight == 3.0 and solo.limits.weight == 1.0
    pool = RecordingPool()
    core = ServiceCore(LocalStore(tmp_path / "store"), auth, state_dir=tmp_path / "state", pool=pool).start()
    try:
        args = dumps(((), {}))
        for tenant in (lab, solo):
            spec = core.register(
                tenant, RegisterFunction(name="f", artifact=dumps("artifact"), priority="batch")
            )
            assert spec.priority == "batch"
        core.submit(lab, "f", [Item(args=args), Item(args=args, priority="interactive")], batch=True)
        core.submit(solo, "f", [Item(args=args)])
        got = [(i.tenant, i.weight, i.priority) for i in pool.invocations]
        assert got == [("lab", 3.0, "batch"), ("lab", 3.0, "interactive"), ("solo", 1.0, "batch")]
    finally:
        core.shutdown()


def test_a_weight_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="bad limits"):
        TokenAuth.from_file(token_file(tmp_path, 0))


def test_a_single_submit_over_http_keeps_the_calls_priority(tmp_path: Path) -> None:
    auth = TokenAuth.from_file(token_file(tmp_path, 1))
    lab = auth.authenticate("lab-token-0123456789")
    assert lab is not None
    pool = RecordingPool()
    core = ServiceCore(LocalStore(tmp_path / "store"), auth, state_dir=tmp_path / "state", pool=pool).start()
    try:
        core.register(lab, RegisterFunction(name="f", artifact=dumps("artifact"), priority="batch"))
        args = base64.b64encode(dumps(((), {}))).decode()
        headers = {"Authorization": "Bearer lab-token-0123456789"}
        with (
            serve(create_app(core, manage=False)) as url,
            httpx.Client(base_url=url, headers=headers) as http,
        ):
            for priority in ("interactive", None):
                body = {"function": "f", "args": args, **({"priority": priority} if priority else {})}
                assert http.post("/v1/invocations", json=body).status_code == 200
        assert [i.priority for i in pool.invocations] == ["interactive", "batch"]
    finally:
        core.shutdown()
