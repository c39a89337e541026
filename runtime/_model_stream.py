"""Streaming an engine's OpenAI-compatible route chunk by chunk, for ``Model.openai_stream``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from runtime._errors import EngineLost
from runtime._model_results import sse_events
from runtime._policy import call_record


def stream_chunks(
    client: httpx.Client,
    request: httpx.Request,
    what: str,
    record: dict[str, Any],
    raise_for_status: Callable[[str, httpx.Response], None],
    unreachable: Callable[[Exception], EngineLost],
) -> Iterator[dict[str, Any]]:
    """Send ``request`` and yield its SSE chunks; fill ``record`` (the call's) as they come.

    ``record`` gets the time to the first chunk with choices, and the tokens of the
    final usage chunk once the stream ends with ``[DONE]``.
    """
    started = time.time()
    try:
        response = client.send(request, stream=True)
    except httpx.TransportError as exc:
        raise unreachable(exc) from exc
    usage: dict[str, Any] = {}
    try:
        if response.status_code >= 400:
            response.read()
            raise_for_status(request.url.path, response)
        for event in sse_events(response.iter_lines(), what):
            if record.get("ttft_seconds") is None and event.get("choices"):
                record["ttft_seconds"] = time.time() - started
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            yield event
    except httpx.TransportError as exc:
        raise EngineLost(f"{what}: the stream broke: {exc}") from exc
    finally:
        response.close()
    done = call_record(record.get("path", ""), {}, {"usage": usage}, started)
    record.update(
        {k: done[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "wall_seconds")}
    )
