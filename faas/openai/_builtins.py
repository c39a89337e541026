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

from typing import Any

from runtime import Model, OpenAIPath

RESERVED_PREFIX = "openai."
"""Function names starting with this belong to the service; tenants cannot register them."""


def _call(model: Model, path: OpenAIPath, body: dict[str, Any]) -> dict[str, Any]:
    payload = dict(body)
    if payload.pop("stream", False):
        # No partial-output channel from workers yet: the chunks travel with the result.
        return {"object": "faas.stream", "chunks": list(model.openai_stream(path, payload))}
    return model.openai(path, payload)


def chat(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/chat/completions`` on the model's engine."""
    return _call(model, "/v1/chat/completions", body)


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
