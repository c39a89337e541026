"""The ``Model`` handle's calls to the engine's own OpenAI-compatible routes (a mixin of ``Model``)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from runtime._errors import EngineError, SubmitError
from runtime._model_stream import stream_chunks
from runtime._policy import call_record

if TYPE_CHECKING:
    import httpx

    from runtime._errors import EngineLost

OpenAIPath = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
OPENAI_PATHS: frozenset[str] = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


class OpenAIRoutes:
    """``Model.openai`` and ``Model.openai_stream``; ``Model`` provides what is declared here."""

    name: str
    calls: list[dict[str, Any]]
    _client: httpx.Client

    def _rids(self, n: int, prefix: str | None) -> list[str]:
        raise NotImplementedError

    def _release(self, rids: list[str]) -> None:
        raise NotImplementedError

    def _guard(self, path: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _with_priority(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _raise_for_status(self, path: str, response: httpx.Response) -> None:
        raise NotImplementedError

    def _unreachable(self, exc: Exception) -> EngineLost:
        raise NotImplementedError

    def openai(self, path: OpenAIPath, body: Mapping[str, Any]) -> dict[str, Any]:
        """Send an OpenAI-shaped request body to the engine's own OpenAI route; return its response body.

        The body goes as given (the caller validated it), with this handle's request id
        (when it has one prompt) and priority added; the model's policy is checked first
        (``logprobs`` needs the ``logprobs`` mode, ``/v1/embeddings`` the ``encode`` mode).

        Args:
            path: ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings``.
            body: The request body, without ``stream``.

        Raises:
            ModeNotAllowedError: The model's policy refuses the request.
            UnsupportedFeatureError: The engine does not implement a requested feature.
            EngineRejectedError: The engine refused the request as malformed.
            EngineError: The engine failed.
            EngineLost: The engine could not be reached.
        """
        if path not in OPENAI_PATHS:
            raise SubmitError(f"{path!r} is not one of the engine's OpenAI routes {sorted(OPENAI_PATHS)}.")
        payload, rids = self._openai_body(path, body)
        try:
            data = self._post(path, payload)
        finally:
            self._release(rids)
        if not isinstance(data, dict):
            raise EngineError(f"The engine for model {self.name!r} answered {path} with a non-object.")
        return data

    def openai_stream(self, path: OpenAIPath, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Like :meth:`openai`, streamed: the engine's chunks in order (closing early aborts it).

        The engine is always asked for the final usage chunk, so the call's tokens are
        recorded; a caller whose client did not ask for it drops it.
        """
        if path == "/v1/embeddings" or path not in OPENAI_PATHS:
            raise SubmitError(f"{path!r} cannot be streamed.")
        payload, rids = self._openai_body(path, body)
        payload["stream"] = True
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        return self._openai_chunks(path, payload, rids)

    def _openai_body(self, path: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        payload = dict(body)  # one rid for one prompt (a chat, a string prompt); the engine names the rest
        single = path == "/v1/chat/completions" or isinstance(payload.get("prompt"), str)
        rids = self._rids(1, None) if single and path != "/v1/embeddings" and "rid" not in payload else []
        payload.update({"rid": rids[0]} if rids else {})
        return payload, rids

    def _openai_chunks(self, path: str, payload: dict[str, Any], rids: list[str]) -> Iterator[dict[str, Any]]:
        try:
            self._guard(path, payload)
            record = call_record(path, payload, {}, time.time())  # tokens filled in when it ends
            self.calls.append(record)
            request = self._client.build_request("POST", path, json=self._with_priority(payload))
            what = f"The engine for model {self.name!r} ({path})"
            fail = self._raise_for_status
            yield from stream_chunks(self._client, request, what, record, fail, self._unreachable)
        finally:
            self._release(rids)
