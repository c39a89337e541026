"""Priorities: the decorator option, the per-call override, and what reaches the engine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import faas
from registry import FunctionSpec
from runtime import FunctionDefinitionError, Invocation, Model, dumps, execute, new_id
from tests.runtime.test_model_handle import Recorder, fixture


def ident(x: int) -> int:
    return x


def ask(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 2}).text  # type: ignore[union-attr]


def test_the_decorator_takes_interactive_or_batch_only() -> None:
    assert faas.function(priority="batch")(ident).priority == "batch"
    assert faas.function()(ident).priority is None
    with pytest.raises(FunctionDefinitionError, match="priority must be"):
        faas.function(priority="urgent")(ident)  # type: ignore[arg-type]
    with pytest.raises(FunctionDefinitionError, match="priority must be"):
        faas.function()(ident).with_options(priority="now")  # type: ignore[arg-type]


def test_with_options_overrides_the_call_and_registers_nothing_new() -> None:
    fn = faas.function(priority="batch", name="ident")(ident)
    urgent = fn.with_options(priority="interactive")
    assert urgent.priority == "interactive" and urgent.origin is fn
    assert urgent.with_options().priority == "batch"  # None: back to the decorator's
    _, spec = urgent.bundle()
    assert spec.priority == "batch"  # the registered default stays the decorator's
    assert spec.invocation(b"", model=None, store=None, stage_threshold=None).priority == "batch"
    inv = spec.invocation(b"", model=None, store=None, stage_threshold=None, priority="interactive")
    assert inv.priority == "interactive"


def test_embedded_client_sends_the_calls_priority_and_registers_once(tmp_path: Path) -> None:
    client = faas.Client(store=(tmp_path / "store").as_uri(), workers=1)
    try:
        seen: list[Invocation] = []
        submit = client.pool.submit

        def spy(invocation: Invocation, *rest: object) -> None:
            seen.append(invocation)
            submit(invocation, *rest)  # type: ignore[arg-type]

        client.pool.submit = spy  # type: ignore[method-assign]
        fn = faas.function(priority="batch", name="ident")(ident).with_client(client)
        assert fn.remote(1) == 1
        assert fn.with_options(priority="interactive").remote(2) == 2
        assert [(i.priority, i.tenant) for i in seen] == [("batch", None), ("interactive", None)]
        versions = [s.version for s in client.registry.list_functions() if s.name == "ident"]
        assert versions == [1]
    finally:
        client.shutdown()


def test_the_bound_handle_sends_the_engine_priority() -> None:
    rec = Recorder({"/generate": fixture("generate_single.json")})
    model = Model("http://engine.invalid:30000", "m@1", transport=httpx.MockTransport(rec))
    model.bind("plain").generate("hi")
    model.bind("p", priority=1).generate("hi")
    model.bind("p", priority=0).generate("hi")
    assert [b.get("priority") for b in rec.bodies] == [None, 1, 0]
    assert "priority" not in rec.bodies[0]


def test_execute_binds_the_priority_the_pool_chose() -> None:
    rec = Recorder({"/generate": fixture("generate_single.json")})
    model = Model("http://engine.invalid:30000", "m@1", transport=httpx.MockTransport(rec))
    spec = FunctionSpec(name="ask", digest="0" * 64, model_param="model")
    inv = Invocation(
        id=new_id(),
        function_name=spec.name,
        function_digest=spec.digest,
        args=dumps((("hi",), {})),
        priority="batch",
    )
    result = execute(inv, ask, model=model, model_param="model", engine_priority=0)
    assert result.ok, result.error
    assert rec.bodies[-1]["priority"] == 0
