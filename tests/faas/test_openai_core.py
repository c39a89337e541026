"""The mechanism behind the OpenAI routes, in process: bodies run as a tenant's built-in invocations.

A real ServiceCore on the local pool (real worker processes, the tiny Llama on
the CPU engine); no HTTP. The routes' conformance suite is test_openai_api.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faas.service import ServiceCore, Tenant
from faas.service._api import RegisterFunction
from faas.service._auth import TokenAuth
from faas.service._openai import OpenAIGateway
from runtime import (
    InvalidParameterError,
    LocalStore,
    ModeNotAllowedError,
    SubmitError,
    UnknownModelError,
    dumps,
)

TOKEN = "lab-token-0123456789"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceCore, Tenant, OpenAIGateway]]:
    root: Path = tmp_path_factory.mktemp("oai-core")
    tokens = root / "tokens.toml"
    tokens.write_text(f'[[tenants]]\nname = "lab"\ntokens = ["{TOKEN}"]\nweight = 2\n')
    auth = TokenAuth.from_file(tokens)
    tenant = auth.authenticate(TOKEN)
    assert tenant is not None
    core = ServiceCore(LocalStore(root / "store"), auth, state_dir=root / "state", workers=1).start()
    try:
        yield core, tenant, OpenAIGateway(core)
    finally:
        core.shutdown()


def test_bodies_run_durably_as_the_tenants_builtin_invocations(
    setup: tuple[ServiceCore, Tenant, OpenAIGateway],
) -> None:
    core, tenant, gateway = setup
    bodies = [{**CHAT, "seed": i, "priority": "batch"} for i in range(3)]
    prepared = [gateway.prepare("chat", b) for b in bodies]
    batch = gateway.submit(tenant, prepared, batch=True)
    assert batch.batch_id and len(batch.ids) == 3
    assert core.batch_ids(tenant, batch.batch_id) == batch.ids  # in the index before submit returned
    views = gateway.wait(tenant, batch.ids, timeout=120)
    assert sorted(views) == sorted(batch.ids)
    for invocation_id, p in zip(batch.ids, prepared, strict=True):
        body = gateway.reply(tenant, p, views[invocation_id])
        assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
        view = core.view(tenant, invocation_id)
        assert view.function_name == "openai.chat" and view.model == "tiny-llama@1"
    rows = {r.invocation_id: r for r in core.ledger.report(tenant.name, limit=100).rows}
    for invocation_id in batch.ids:
        row = rows[invocation_id]
        assert row.tenant == "lab" and row.function == "openai.chat" and row.model == "tiny-llama@1"
        assert row.prompt_tokens > 0 and row.completion_tokens > 0


def test_a_streamed_body_returns_its_chunks_without_usage_unless_asked(
    setup: tuple[ServiceCore, Tenant, OpenAIGateway],
) -> None:
    core, tenant, gateway = setup
    plain = gateway.prepare(
        "completions", {"model": "tiny-llama", "prompt": "The cat", "max_tokens": 5, "stream": True}
    )
    usage = gateway.prepare(
        "completions",
        {**plain.request.body, "model": "tiny-llama", "stream_options": {"include_usage": True}},
    )
    ids = [gateway.submit(tenant, [p]).ids[0] for p in (plain, usage)]
    views = gateway.wait(tenant, ids, timeout=120)
    without = gateway.reply(tenant, plain, views[ids[0]])["chunks"]
    with_usage = gateway.reply(tenant, usage, views[ids[1]])["chunks"]
    assert without and all(c["choices"] and "usage" not in c for c in without)
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] > 0
    row = next(r for r in core.ledger.report(tenant.name, limit=100).rows if r.invocation_id == ids[0])
    assert row.completion_tokens > 0  # the engine call is charged even when the client did not ask


def test_bad_bodies_are_refused_before_anything_is_accepted(
    setup: tuple[ServiceCore, Tenant, OpenAIGateway],
) -> None:
    core, tenant, gateway = setup
    before = len(core.list(tenant, 10_000, None))
    with pytest.raises(InvalidParameterError) as bad:
        gateway.prepare("chat", {**CHAT, "temperature": 5})
    assert bad.value.param == "temperature"
    with pytest.raises(InvalidParameterError) as bad:
        gateway.prepare("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]})
    assert bad.value.param == "messages[0].role"
    with pytest.raises(InvalidParameterError) as bad:
        gateway.prepare("embeddings", {"model": "tiny-llama"})
    assert bad.value.param == "input"
    with pytest.raises(UnknownModelError):
        gateway.prepare("chat", {**CHAT, "model": "no-such-model"})
    assert len(core.list(tenant, 10_000, None)) == before


def test_logprobs_need_the_models_logprobs_mode(
    setup: tuple[ServiceCore, Tenant, OpenAIGateway],
) -> None:
    core, _tenant, gateway = setup
    from registry import ModelSpec

    core.models.register_model(ModelSpec(name="plain-llama", modes=["generate"]))
    assert gateway.prepare("chat", {**CHAT, "model": "plain-llama"}).model.ref == "plain-llama@1"
    with pytest.raises(ModeNotAllowedError):
        gateway.prepare("chat", {**CHAT, "model": "plain-llama", "logprobs": True})
    with pytest.raises(ModeNotAllowedError):
        gateway.prepare("embeddings", {"model": "plain-llama", "input": "hi"})


def test_builtin_names_are_reserved_and_registered_once_per_tenant(
    setup: tuple[ServiceCore, Tenant, OpenAIGateway],
) -> None:
    core, tenant, _gateway = setup
    with pytest.raises(SubmitError, match="reserved"):
        core.register(tenant, RegisterFunction(name="openai.chat", artifact=dumps("x")))
    first = core.builtin(tenant, "openai.embeddings")
    core._tenant_state(tenant).builtins.clear()  # as after a restart: found in the store, not re-versioned
    assert core.builtin(tenant, "openai.embeddings") == first
    assert first.model_param == "model" and first.version == 1 and first.retries == 2
