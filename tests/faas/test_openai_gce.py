"""The OpenAI-compatible API on a Globus Compute substrate, which has no partial-output channel.

A real ``faas serve`` whose pool runs on GlobusComputeEngine blocks (Parsl's
LocalProvider on 127.0.0.1), the tiny Llama in the block. Streams still work:
their chunks arrive with the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.faas._service_proc import TOKENS, ServiceProc, wait_hot

CHAT = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    root: Path = tmp_path_factory.mktemp("openai-gce")
    proc = ServiceProc(root, substrate="globus-compute").start(timeout=120)
    try:
        with proc.client() as alice:
            cold = alice.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CHAT})
            assert cold.status_code == 503 and 1 <= int(cold.headers["retry-after"]) <= 120, cold.text
            wait_hot(alice, "tiny-llama", 180)
        yield proc
    finally:
        proc.stop()


def test_chat_and_a_stream_delivered_with_the_result(service: ServiceProc) -> None:
    client = openai.OpenAI(base_url=service.url + "/v1", api_key=TOKENS["alice"])
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content and reply.usage is not None
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    )
