"""The built-in functions behind the OpenAI-compatible routes.

They are ordinary faas functions (a ``Model`` handle first, then the request body)
that run in the pool's workers like any registered function, so an OpenAI
request is queued, fair-shared, retried, recorded and charged like any other
invocation. Each sends the validated body to the engine's own OpenAI route
through the handle (which checks the model's policy and records the engine
call for usage and provenance) and returns the engine's response body, or the
list of its chunks for a streamed request. They are pickled by reference, so
a worker imports this module to run them: keep it light.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime import Model, OpenAIPath, emit_partial

RESERVED_PREFIX = "openai."
"""Function names starting with this belong to the service; tenants cannot register them."""


def _call(
    model: Model, path: OpenAIPath, body: dict[str, Any], emit: Callable[[dict[str, Any]], Any] = emit_partial
) -> dict[str, Any]:
    payload = dict(body)
    if not payload.pop("stream", False):
        return model.openai(path, payload)
    # Each chunk goes out as a partial output as it comes (where the worker has a channel
    # back), and all of them travel in the result too: the durable record, and the
    # stream for substrates without a channel.
    chunks = []
    for chunk in model.openai_stream(path, payload):
        emit(chunk)
        chunks.append(chunk)
    return {"object": "faas.stream", "chunks": chunks}


def chat(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/chat/completions`` on the model's engine.

    ``n`` > 1 is sent as n concurrent requests (seeds ``seed + i`` when a seed is
    given) whose choices are merged: the CPU engine's chat takes one choice per
    request, and SGLang batches the n requests and shares their prompt's cache.
    """
    n = body.get("n") or 1
    if n == 1:
        return _call(model, "/v1/chat/completions", body)
    seed = body.get("seed")

    def one(i: int) -> dict[str, Any]:
        return _call(
            model,
            "/v1/chat/completions",
            {**body, "n": 1, **({"seed": seed + i} if seed is not None else {})},
        )

    with ThreadPoolExecutor(n, thread_name_prefix="faas-openai-n") as pool:
        replies = list(pool.map(one, range(n)))
    return _merge(replies)


def _merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """One reply with the replies' choices as choices 0..n-1 (the prompt counted once in usage)."""
    first = replies[0]
    streamed = first.get("object") == "faas.stream"
    usages = [_usage_of(r) for r in replies]
    usage = {
        "prompt_tokens": usages[0].get("prompt_tokens", 0),
        "completion_tokens": sum(u.get("completion_tokens", 0) for u in usages),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if not streamed:
        choices = [{**r["choices"][0], "index": i} for i, r in enumerate(replies)]
        return {**first, "choices": choices, "usage": usage}
    chunks: list[dict[str, Any]] = []
    for i, reply in enumerate(replies):
        for c in reply["chunks"]:
            if c.get("choices"):
                chunks.append(
                    {
                        **c,
                        "id": first["chunks"][0]["id"],
                        "choices": [{**x, "index": i} for x in c["choices"]],
                    }
                )
    last = {**first["chunks"][-1], "choices": [], "usage": usage}
    return {**first, "chunks": [*chunks, last]}


def _usage_of(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("object") == "faas.stream":
        found = [c["usage"] for c in reply["chunks"] if isinstance(c.get("usage"), dict)]
        return found[-1] if found else {}
    usage = reply.get("usage")
    return usage if isinstance(usage, dict) else {}


def completions(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/completions`` on the model's engine."""
    return _call(model, "/v1/completions", body)


def embeddings(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/embeddings`` on the model's engine."""
    return _call(model, "/v1/embeddings", body)


BUILTINS = {
    "openai.chat": chat,
    "openai.completions": completions,
    "openai.embeddings": embeddings,
}
"""The built-in functions by their reserved names."""
