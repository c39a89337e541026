"""The ``Model`` handle: a keep-alive HTTP client for an engine's native API.

The handle speaks SGLang's HTTP API, which the CPU engine serves too, so a function cannot
tell the two apart:

- ``generate``: ``POST /generate`` (text or token ids, one or a batch; logprobs, hidden
  states, SSE streaming), SGLang's native field names throughout.
- ``chat``: ``POST /v1/chat/completions``. SGLang's native API has no messages field and no
  endpoint that returns the chat template, so chat goes through the OpenAI-compatible
  endpoint, where the engine renders its own tokenizer's template.
- ``encode``: ``POST /encode`` (on SGLang, only for a model launched with ``--is-embedding``).

Everything the caller passes is validated here, before a request leaves the worker.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import itertools
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import httpx
import numpy as np

from runtime._adapters import AdapterRef, AdapterResolver, EngineAdapters, call_fields
from runtime._coalesce import Coalescer, ItemFailed
from runtime._errors import (
    EngineError,
    EngineLost,
    SubmitError,
    UnsupportedFeatureError,
)
from runtime._internals import Internals, Read, hidden_fallback, wire_body
from runtime._model_fields import (
    Embeds,
    HiddenStates,
    Prompt,
    chat_body,
    generate_body,
    hook_points_of,
    prompt_fields,
    raise_for_status,
    with_fallback,
)
from runtime._model_openai import OpenAIPath, OpenAIRoutes
from runtime._model_results import (
    ChatDecoder,
    ChatResult,
    GenerateResult,
    NativeDecoder,
    TextStream,
    hidden_states_array,
)
from runtime._net import KeepAlivePosts, tcp_transport
from runtime._policy import call_record, guard
from runtime._sampling import (
    SamplingParams,
    SamplingParamsInput,
    validate_sampling_params,
)

__all__ = [
    "ChatResult",
    "GenerateResult",
    "Model",
    "OpenAIPath",
    "SamplingParams",
    "TextStream",
    "UnsupportedFeatureError",
    "hidden_states_array",
    "validate_sampling_params",
]


class Model(OpenAIRoutes):
    """A handle on a resident engine serving one model.

    Thread-safe: many invocations in one worker share a handle and its keep-alive
    connections, so their requests reach the engine concurrently and are batched there.

    Args:
        url: Base URL of the engine (``http://host:port``).
        name: The model's registered name (``name@version`` once resolved).
        timeout: Per-request timeout in seconds.
        request_prefix: Prefix for request ids (``rid``), so the pool can abort an
            invocation's requests.
        transport: An ``httpx`` transport to use instead of the network (tests).
        allowed_modes: Modes the model's policy allows (None: all); a request
            using another mode raises ``ModeNotAllowedError`` before it is sent.
        unscoped: Modes the tenant's token lacks the scope for; a request using one
            raises ``MissingScopeError`` before it is sent.
        ungranted: Modes the tenant is not granted on this model; a request using one
            raises ``ModeNotAllowedError`` before it is sent.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        timeout: float = 600.0,
        request_prefix: str = "faas",
        transport: httpx.BaseTransport | None = None,
        allowed_modes: frozenset[str] | None = None,
        unscoped: frozenset[str] = frozenset(),
        ungranted: frozenset[str] = frozenset(),
    ) -> None:
        self.url = url.rstrip("/")
        self.allowed_modes = allowed_modes
        self.unscoped = unscoped
        self.ungranted = ungranted
        self._info: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []  # engine calls made through this handle (see bind)
        self.name = name
        self._prefix = request_prefix
        self._counter = itertools.count()
        self._client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport
            or tcp_transport(httpx.Limits(max_connections=512, max_keepalive_connections=512), url=self.url),
        )
        # Plain calls skip httpx's pool: one keep-alive connection per thread (see KeepAlivePosts).
        plain = transport is None and self.url.startswith("http://")
        self._posts = KeepAlivePosts(self.url, timeout=timeout) if plain else None
        # Concurrent plain /generate calls gather into streamed batches (see _coalesce); shared by clones.
        self._batches = (
            Coalescer(self._posts.post_lines, lambda: self.engine_info().get("batched_streams") is True)
            if self._posts is not None
            else None
        )
        self._lock = threading.Lock()
        self._active: set[str] = set()  # shared with bind() clones, for abort_prefix()
        self._priority: int | None = None  # set by bind() from the invocation's priority
        self._adapters = EngineAdapters()  # loaded on this engine; shared with clones
        self._resolver: AdapterResolver | None = None  # set by with_adapters()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, url={self.url!r})"

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._client.close()
        if self._posts is not None:
            self._posts.close()

    def bind(self, request_prefix: str, *, priority: int | None = None) -> Model:
        """A handle sharing this one's connections whose request ids start with ``request_prefix``.

        Args:
            request_prefix: Prefix of the bound handle's request ids.
            priority: SGLang's per-request ``priority``, sent with every request of
                the bound handle (None: the field is not sent).
        """
        clone = copy.copy(self)
        clone._prefix = request_prefix
        clone._counter = itertools.count()  # call numbers per invocation: the same on every attempt
        clone._priority = priority
        clone.calls = []  # each bound handle records its own invocation's engine calls
        return clone

    def with_adapters(self, resolver: AdapterResolver | None) -> Model:
        """A handle sharing this one's connections that resolves ``adapter=`` with ``resolver``."""
        clone = copy.copy(self)
        clone._resolver = resolver
        return clone

    @property
    def request_prefix(self) -> str:
        """The prefix of the request ids (``rid``) this handle sends."""
        return self._prefix

    def _rids(self, n: int, prefix: str | None) -> list[str]:
        with self._lock:
            rids = [f"{prefix or self._prefix}-{next(self._counter)}" for _ in range(n)]
            self._active.update(rids)
        return rids

    def _release(self, rids: Iterable[str]) -> None:
        with self._lock:
            self._active.difference_update(rids)

    # ---- generate --------------------------------------------------------------------------

    @overload
    def generate(
        self,
        prompt: str,
        sampling_params: SamplingParamsInput = ...,
        *,
        stream: Literal[False] = ...,
        return_logprob: bool = ...,
        top_logprobs_num: int = ...,
        return_text_in_logprobs: bool = ...,
        return_hidden_states: HiddenStates = ...,
        internals: Internals | None = ...,
        adapter: str | None = ...,
        rid_prefix: str | None = ...,
    ) -> GenerateResult: ...
    @overload
    def generate(
        self,
        prompt: Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | None = ...,
        sampling_params: SamplingParamsInput = ...,
        *,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = ...,
        input_embeds: Embeds | None = ...,
        stream: Literal[False] = ...,
        return_logprob: bool = ...,
        top_logprobs_num: int = ...,
        return_text_in_logprobs: bool = ...,
        return_hidden_states: HiddenStates = ...,
        internals: Internals | None = ...,
        adapter: str | None = ...,
        rid_prefix: str | None = ...,
    ) -> GenerateResult | list[GenerateResult]: ...
    @overload
    def generate(
        self,
        prompt: str | Sequence[int] | None = ...,
        sampling_params: SamplingParamsInput = ...,
        *,
        input_ids: Sequence[int] | None = ...,
        stream: Literal[True],
        return_logprob: bool = ...,
        top_logprobs_num: int = ...,
        return_text_in_logprobs: bool = ...,
        adapter: str | None = ...,
        rid_prefix: str | None = ...,
    ) -> TextStream: ...

    def generate(
        self,
        prompt: Prompt | None = None,
        sampling_params: SamplingParamsInput = None,
        *,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        input_embeds: Embeds | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        return_hidden_states: HiddenStates = False,
        internals: Internals | None = None,
        adapter: str | None = None,
        rid_prefix: str | None = None,
    ) -> GenerateResult | list[GenerateResult] | TextStream:
        """Generate a completion for one prompt, or one per prompt of a batch (SGLang ``/generate``).

        Args:
            prompt: A string, a list of strings, a list of token ids, or a list of
                token-id lists.
            sampling_params: SGLang sampling parameters (validated here): one mapping or
                ``SamplingParams`` for all prompts, or a list with one per prompt.
            input_ids: Token ids instead of ``prompt`` (SGLang's field name).
            input_embeds: Input embeddings instead of a prompt, ``(tokens, hidden_size)``
                (or one such array per prompt of a batch), as SGLang's ``input_embeds``.
            stream: Return a ``TextStream`` of text deltas (one prompt only).
            return_logprob: Fill ``logprobs`` (``(completion_tokens,)``, values <= 0).
            top_logprobs_num: Also fill ``top_logprobs``/``top_logprob_ids``
                (``(completion_tokens, k)``); implies ``return_logprob``.
            return_text_in_logprobs: Ask the engine to add token texts to the logprob
                entries in ``meta_info``.
            return_hidden_states: ``True`` fills ``hidden_states`` with the final layer's
                states, ``(prompt_tokens + completion_tokens - 1, hidden_size)``;
                ``"last"`` keeps only the last row, ``(hidden_size,)``.
            internals: Hook points to read and write for this call (see
                ``faas.Internals``); the arrays read fill ``internals`` of each result.
                Needs the model's ``internals_read``/``internals_write`` modes and the
                tenant's ``internals`` scope.
            adapter: A LoRA adapter of this model: ``"chem"`` (its alias as it stood when the
                invocation was submitted), ``"chem@stable"`` or ``"chem@3"`` (pinned); the engine
                loads it on first use (SGLang's ``lora_path``). Provenance records its version and digest.
            rid_prefix: Overrides the request-id prefix.

        Returns:
            A ``GenerateResult`` for a single prompt (a string or one id list), else a list
            of them in prompt order; a ``TextStream`` when ``stream`` is set.

        Raises:
            SubmitError: The prompt, sampling params or options are malformed.
            ModeNotAllowedError: The model's policy or the tenant's scopes forbid a mode.
            UnsupportedFeatureError: The engine does not implement a requested feature
                (e.g. a hook point other than final-layer states on SGLang).
            EngineError: The engine rejected the request.
            EngineLost: The engine could not be reached.
        """
        body, n, single = generate_body(
            prompt,
            sampling_params,
            input_ids=input_ids,
            input_embeds=input_embeds,
            stream=stream,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
            return_hidden_states=return_hidden_states,
        )
        lora = (
            None if adapter is None else self._adapters.use(self._resolver, adapter, self._client, self.name)
        )
        if lora is not None:
            body["lora_path"] = lora.engine_name
        fallback: Read | None = None
        recorded = None
        if internals is not None:
            if not isinstance(internals, Internals):
                raise SubmitError(f"internals must be a faas.Internals, got {type(internals).__name__}.")
            if stream:
                raise SubmitError("internals cannot be combined with stream=True.")
            wire, recorded = wire_body(internals)
            # Policy first, on what was asked: an engine without named hooks changes the body.
            guard(
                self.name,
                self.allowed_modes,
                "/generate",
                {**body, "internals": wire},
                self.unscoped,
                self.ungranted,
            )
            if self.engine_info().get("hook_points") is None:
                fallback = hidden_fallback(internals)
                body["return_hidden_states"] = True
            else:
                body["internals"] = wire
        rids = self._rids(n, rid_prefix)
        body["rid"] = rids[0] if single else rids
        if stream:
            return self._stream("/generate", body, rids, NativeDecoder(), lora)
        try:
            data = self._post("/generate", body, internals=recorded, checked=internals is not None, lora=lora)
        finally:
            self._release(rids)
        items = [data[0] if isinstance(data, list) else data] if single else list(data)
        results = [with_fallback(item, return_hidden_states, fallback) for item in items]
        return results[0] if single else results

    def engine_info(self) -> dict[str, Any]:
        """The engine's ``/model_info`` (fetched once per handle, then cached).

        Raises:
            EngineLost: The engine could not be reached.
        """
        with self._lock:
            if self._info is not None:
                return self._info
        try:
            response = self._client.get("/model_info", timeout=10.0)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._raise_for_status("/model_info", response)
        info = response.json()
        with self._lock:
            self._info = info if isinstance(info, dict) else {}
            return self._info

    def hook_points(self) -> dict[str, tuple[int, ...]]:
        """The model's named hook points and the shape of one position's activations.

        An engine without named hooks (SGLang) lists only ``ln_final.hook_normalized``,
        served from its final-layer hidden states.
        """
        return hook_points_of(self.engine_info())

    # ---- chat ------------------------------------------------------------------------------

    @overload
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: Mapping[str, Any] | SamplingParams | None = ...,
        *,
        stream: Literal[False] = ...,
        return_logprob: bool = ...,
        top_logprobs_num: int = ...,
        rid_prefix: str | None = ...,
    ) -> ChatResult: ...
    @overload
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: Mapping[str, Any] | SamplingParams | None = ...,
        *,
        stream: Literal[True],
        return_logprob: bool = ...,
        top_logprobs_num: int = ...,
        rid_prefix: str | None = ...,
    ) -> TextStream: ...

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: Mapping[str, Any] | SamplingParams | None = None,
        *,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid_prefix: str | None = None,
    ) -> ChatResult | TextStream:
        """Reply to a conversation using the model's own chat template.

        Sends SGLang's OpenAI-compatible ``/v1/chat/completions``: the engine renders the
        messages with its tokenizer's chat template (generation prompt added) and generates.
        ``sampling_params`` take SGLang's native names, as for ``generate``; they are sent
        under the chat endpoint's names (``max_new_tokens`` as ``max_tokens``,
        ``min_new_tokens`` as ``min_tokens``, ``sampling_seed`` as ``seed``), which SGLang
        maps back to the same sampling parameters.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
            sampling_params: SGLang sampling parameters (validated here).
            stream: Return a ``TextStream`` of the reply's text deltas.
            return_logprob: Fill ``logprobs`` and ``tokens`` of the result.
            top_logprobs_num: Also fill ``top_logprobs``; implies ``return_logprob``.
            rid_prefix: Overrides the request-id prefix.

        Returns:
            A ``ChatResult``, or a ``TextStream`` when ``stream`` is set.

        Raises:
            SubmitError: The messages, sampling params or options are malformed.
            UnsupportedFeatureError: The engine does not implement a requested feature.
            EngineError: The engine rejected the request (e.g. a role the template refuses).
            EngineLost: The engine could not be reached.
        """
        body = chat_body(messages, sampling_params, stream, return_logprob, top_logprobs_num)
        rids = self._rids(1, rid_prefix)
        body["rid"] = rids[0]
        if stream:
            return self._stream("/v1/chat/completions", body, rids, ChatDecoder())
        try:
            return ChatResult.from_json(self._post("/v1/chat/completions", body))
        finally:
            self._release(rids)

    # ---- encode ----------------------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        rid_prefix: str | None = None,
    ) -> np.ndarray:
        """Embed one text or a batch (SGLang ``/encode``).

        Args:
            texts: A string or a non-empty list of strings.
            input_ids: Token ids (one list, or one list per input) instead of ``texts``.
            rid_prefix: Overrides the request-id prefix.

        Returns:
            A float32 array: ``(hidden_size,)`` for one input, ``(n, hidden_size)`` for a
            batch. The CPU engine returns the mean of the final hidden states, L2-normalised;
            an SGLang embedding model returns its own pooling (normalised by default).

        Raises:
            SubmitError: The input is malformed.
            UnsupportedFeatureError: The engine does not implement a requested feature.
            EngineError: The engine rejected the request (SGLang serves ``/encode`` only
                for a model launched with ``--is-embedding``).
            EngineLost: The engine could not be reached.
        """
        fields, n, single = prompt_fields(texts, input_ids)
        rids = self._rids(n, rid_prefix)
        body = {**fields, "rid": rids[0] if single else rids}
        try:
            data = self._post("/encode", body)
        finally:
            self._release(rids)
        items = [data] if single and isinstance(data, Mapping) else list(data)
        if len(items) != n or not all(isinstance(i, Mapping) and "embedding" in i for i in items):
            raise EngineError(f"The engine for model {self.name!r} answered /encode without embeddings.")
        matrix = np.asarray([i["embedding"] for i in items], dtype=np.float32)
        return matrix[0] if single else matrix

    # ---- abort and transport ---------------------------------------------------------------

    def abort(self, rid: str) -> None:
        """Ask the engine to abort the request ``rid`` (best effort)."""
        with contextlib.suppress(httpx.HTTPError):
            self._client.post("/abort_request", json={"rid": rid}, timeout=5.0)

    def abort_prefix(self, prefix: str) -> int:
        """Abort every in-flight request whose id starts with ``prefix``; return how many."""
        with self._lock:
            rids = [r for r in self._active if r.startswith(prefix)]
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def _unreachable(self, exc: Exception) -> EngineLost:
        return EngineLost(f"The engine for model {self.name!r} at {self.url} is unreachable: {exc}")

    def _guard(self, path: str, body: dict[str, Any]) -> None:
        guard(self.name, self.allowed_modes, path, body, self.unscoped, self.ungranted)

    def _with_priority(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._priority is None or "priority" in body:
            return body
        return {**body, "priority": self._priority}

    def _post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        internals: dict[str, Any] | None = None,
        checked: bool = False,
        lora: AdapterRef | None = None,
    ) -> Any:
        if not checked:
            self._guard(path, body)
        body = self._with_priority(body)
        started = time.time()
        if self._posts is not None and lora is None:
            if path == "/generate" and self._batches is not None:
                data = self._batches.post(body, lambda: self._post_plain(path, body), self._batch_failure)
            else:
                data = self._post_plain(path, body)
        else:
            try:
                response = self._client.post(path, json=body)
                if lora is not None and self._adapters.missing(lora, response, self._client, self.name):
                    response = self._client.post(path, json=body)  # the engine lost it: loaded again
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            self._raise_for_status(path, response)
            data = response.json()
        self.calls.append(call_record(path, body, data, started, internals) | call_fields(lora))
        return data

    def _batch_failure(self, exc: Exception) -> Exception:
        """The typed error of a call whose gathered batch failed it (see ``_coalesce``)."""
        if isinstance(exc, OSError | http.client.HTTPException):
            return self._unreachable(exc)
        what = "failed this request" if isinstance(exc, ItemFailed) else "broke off a batched answer"
        return EngineError(f"The engine for model {self.name!r} {what} (/generate): {exc}")

    def _post_plain(self, path: str, body: dict[str, Any]) -> Any:
        assert self._posts is not None
        try:
            status, payload, headers = self._posts.post(path, body)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from exc
        if status >= 400:  # the rare path: the typed error from the same reading of the body
            request = httpx.Request("POST", self.url + path)
            answer = httpx.Response(status, headers=headers, content=payload, request=request)
            self._raise_for_status(path, answer)
        try:
            return json.loads(payload)
        except ValueError:
            raise EngineError(
                f"The engine for model {self.name!r} answered {path} with a body that is not JSON: "
                f"{payload[:200]!r}"
            ) from None

    def _stream(
        self, path: str, body: dict[str, Any], rids: list[str], decoder: Any, lora: AdapterRef | None = None
    ) -> TextStream:
        try:
            self._guard(path, body)
        except Exception:
            self._release(rids)
            raise
        record = call_record(path, body, {}, time.time())  # tokens filled in when the stream ends
        record.update(call_fields(lora))
        self.calls.append(record)
        body = self._with_priority(body)
        try:
            response = self._client.send(self._client.build_request("POST", path, json=body), stream=True)
        except httpx.TransportError as exc:
            self._release(rids)
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            try:
                response.read()
            finally:
                response.close()
                self._release(rids)
            self._raise_for_status(path, response)
        what = f"The engine for model {self.name!r} ({path})"
        return TextStream(response, decoder, what=what, on_close=lambda: self._release(rids), call=record)

    def _raise_for_status(self, path: str, response: httpx.Response) -> None:
        raise_for_status(self.name, path, response)
