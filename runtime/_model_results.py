"""What ``Model`` calls return: typed results parsed from SGLang's JSON, and text streams.

Array shapes (all ``numpy`` arrays; ``n`` is ``completion_tokens``, ``P`` ``prompt_tokens``):

- ``logprobs``: ``(n,)`` float32, the log-probability of each generated token (<= 0).
- ``top_logprobs`` / ``top_logprob_ids``: ``(n, k)`` float32 / int64 for
  ``top_logprobs_num=k``, best first; a position the engine left empty is NaN / -1.
- ``hidden_states``: ``(P + n - 1, H)`` float32: one layer (the last, after the final
  norm: the vector the LM head reads) by every position the model consumed, prompt first.
  Row ``t`` is the state from which token ``t + 1`` of prompt-plus-output was predicted;
  the last generated token is never fed back, so it has no row. ``return_hidden_states=
  "last"`` keeps only the final row, shape ``(H,)``. This is what SGLang returns
  (``meta_info["hidden_states"]``: the prompt's ``[P][H]`` block, then one ``[H]`` per step).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np

from runtime._errors import EngineError, EngineLost
from runtime._internals import decode as decode_internals
from runtime._policy import call_record


def _logprob_values(entries: Sequence[Any] | None) -> np.ndarray | None:
    """``[[logprob, token_id, text], ...]`` to a float32 vector (None -> NaN)."""
    if entries is None:
        return None
    return np.array([np.nan if e[0] is None else e[0] for e in entries], dtype=np.float32)


def _top_arrays(positions: Sequence[Any] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per position ``[[logprob, token_id, text], ...]`` (or None) to ``(n, k)`` arrays."""
    if positions is None:
        return None, None
    k = max((len(p) for p in positions if p), default=0)
    values = np.full((len(positions), k), np.nan, dtype=np.float32)
    ids = np.full((len(positions), k), -1, dtype=np.int64)
    for i, entries in enumerate(positions):
        for j, e in enumerate(entries or []):
            values[i, j] = np.nan if e[0] is None else e[0]
            ids[i, j] = e[1]
    return values, ids


def hidden_states_array(raw: Sequence[Any]) -> np.ndarray:
    """SGLang's ``meta_info["hidden_states"]`` (a ``[P][H]`` block, then ``[H]`` rows) as ``(T, H)``."""
    blocks = [np.atleast_2d(np.asarray(part, dtype=np.float32)) for part in raw]
    blocks = [b for b in blocks if b.size]
    if not blocks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(blocks, axis=0)


@dataclass(frozen=True)
class GenerateResult:
    """One completion, as returned by ``Model.generate``.

    Attributes:
        text: The generated text (the prompt is not included).
        output_ids: Generated token ids (a matched eos/stop token included, as SGLang does).
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"``.
        prompt_tokens: Number of prompt tokens.
        completion_tokens: Number of generated tokens.
        meta_info: The engine's ``meta_info`` object (``hidden_states`` moved to the array).
        matched_stop: The stop token id or stop string that ended generation, if any.
        logprobs: ``(completion_tokens,)`` float32 log-probabilities of the generated
            tokens, when ``return_logprob`` was set.
        top_logprobs: ``(completion_tokens, k)`` float32, the ``k = top_logprobs_num``
            best log-probabilities at each step, best first.
        top_logprob_ids: ``(completion_tokens, k)`` int64 token ids of ``top_logprobs``.
        hidden_states: ``(prompt_tokens + completion_tokens - 1, hidden_size)`` float32
            final-layer states, or ``(hidden_size,)`` for ``return_hidden_states="last"``.
        internals: The arrays of the call's ``faas.Read`` hook points, by hook name:
            ``(m, hidden_size)`` float32 for ``reduce=None``, ``(hidden_size,)`` for
            ``"mean"``/``"last"``.
        internals_positions: The token positions each array covers (those reached).
    """

    text: str
    output_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    meta_info: dict[str, Any] = field(repr=False)
    matched_stop: int | str | None = None
    logprobs: np.ndarray | None = field(default=None, repr=False, compare=False)
    top_logprobs: np.ndarray | None = field(default=None, repr=False, compare=False)
    top_logprob_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    hidden_states: np.ndarray | None = field(default=None, repr=False, compare=False)
    internals: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    internals_positions: dict[str, list[int]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, last_hidden_state: bool = False) -> GenerateResult:
        """Parse one element of SGLang's ``/generate`` response.

        Args:
            obj: ``{"text", "output_ids", "meta_info"}``.
            last_hidden_state: Keep only the final row of the hidden states.
        """
        meta = dict(obj.get("meta_info") or {})
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, Mapping) else finish
        matched = finish.get("matched") if isinstance(finish, Mapping) else None
        hidden = None
        if "hidden_states" in meta:
            hidden = hidden_states_array(meta.pop("hidden_states") or [])
            if last_hidden_state:
                hidden = hidden[-1] if len(hidden) else np.zeros((0,), dtype=np.float32)
        top, top_ids = _top_arrays(meta.get("output_top_logprobs"))
        arrays = positions = None
        if "internals" in meta:
            arrays, positions = decode_internals(meta.pop("internals") or {})
        return cls(
            text=str(obj.get("text") or ""),
            output_ids=list(obj.get("output_ids") or []),
            finish_reason=reason,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            meta_info=meta,
            matched_stop=matched,
            logprobs=_logprob_values(meta.get("output_token_logprobs")),
            top_logprobs=top,
            top_logprob_ids=top_ids,
            hidden_states=hidden,
            internals=arrays,
            internals_positions=positions,
        )


@dataclass(frozen=True)
class ChatResult:
    """One chat reply, as returned by ``Model.chat`` (SGLang's ``/v1/chat/completions``).

    The chat endpoint reports no token ids, so there is no ``output_ids``; with
    ``return_logprob`` it reports each generated token's text instead (``tokens``).

    Attributes:
        text: The assistant message's content.
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"``.
        prompt_tokens: Number of prompt tokens (the rendered chat template).
        completion_tokens: Number of generated tokens.
        matched_stop: The stop token id or stop string that ended generation, if any.
        logprobs: ``(completion_tokens,)`` float32, when ``return_logprob`` was set.
        top_logprobs: ``(completion_tokens, k)`` float32 for ``top_logprobs_num=k``.
        tokens: The generated tokens' texts, when ``return_logprob`` was set.
        response: The engine's whole response body.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    matched_stop: int | str | None = None
    logprobs: np.ndarray | None = field(default=None, repr=False, compare=False)
    top_logprobs: np.ndarray | None = field(default=None, repr=False, compare=False)
    tokens: list[str] | None = field(default=None, repr=False)
    response: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ChatResult:
        """Parse a ``chat.completion`` body (its first choice)."""
        choices = obj.get("choices") or []
        if not choices:
            raise EngineError("The chat response has no choices.")
        choice = choices[0]
        message = choice.get("message") or {}
        return cls._build(
            str(message.get("content") or ""),
            choice.get("finish_reason"),
            choice.get("matched_stop"),
            obj.get("usage") or {},
            (choice.get("logprobs") or {}).get("content"),
            dict(obj),
        )

    @classmethod
    def _build(
        cls,
        text: str,
        finish: str | None,
        matched: int | str | None,
        usage: Mapping[str, Any],
        content: list[Mapping[str, Any]] | None,
        response: dict[str, Any],
    ) -> ChatResult:
        logprobs = top = None
        tokens = None
        if content is not None:
            logprobs = np.array([c.get("logprob", np.nan) for c in content], dtype=np.float32)
            tokens = [str(c.get("token", "")) for c in content]
            if any(c.get("top_logprobs") for c in content):
                k = max(len(c.get("top_logprobs") or []) for c in content)
                top = np.full((len(content), k), np.nan, dtype=np.float32)
                for i, c in enumerate(content):
                    for j, t in enumerate(c.get("top_logprobs") or []):
                        top[i, j] = t.get("logprob", np.nan)
        return cls(
            text=text,
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            matched_stop=matched,
            logprobs=logprobs,
            top_logprobs=top,
            tokens=tokens,
            response=response,
        )


# ---- streaming -----------------------------------------------------------------------------


class _Decoder(Protocol):
    def feed(self, event: Mapping[str, Any]) -> str: ...

    def result(self) -> GenerateResult | ChatResult | None: ...


class NativeDecoder:
    """``/generate`` stream events: each carries the cumulative text; the last one finishes."""

    def __init__(self) -> None:
        self.text = ""
        self.last: Mapping[str, Any] | None = None

    def feed(self, event: Mapping[str, Any]) -> str:
        """Return the new text of one event."""
        text = str(event.get("text") or "")
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += delta
        self.last = event
        return delta

    def result(self) -> GenerateResult | None:
        """The final result, once the finishing event has arrived."""
        meta = (self.last or {}).get("meta_info") or {}
        if self.last is None or meta.get("finish_reason") is None:
            return None
        return GenerateResult.from_json(self.last)


class ChatDecoder:
    """``/v1/chat/completions`` stream chunks: ``choices[0].delta.content`` pieces, then usage."""

    def __init__(self) -> None:
        self.text = ""
        self.finish: str | None = None
        self.matched: int | str | None = None
        self.usage: Mapping[str, Any] = {}
        self.content: list[Mapping[str, Any]] | None = None

    def feed(self, event: Mapping[str, Any]) -> str:
        """Return the new text of one chunk."""
        if event.get("usage"):
            self.usage = event["usage"]
        delta = ""
        for choice in event.get("choices") or []:
            delta += str((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason") is not None:
                self.finish, self.matched = choice["finish_reason"], choice.get("matched_stop")
            entries = (choice.get("logprobs") or {}).get("content")
            if entries:
                self.content = [*(self.content or []), *entries]
        self.text += delta
        return delta

    def result(self) -> ChatResult | None:
        """The final result, once a chunk with a finish reason has arrived."""
        if self.finish is None:
            return None
        return ChatResult._build(self.text, self.finish, self.matched, self.usage, self.content, {})


def sse_events(lines: Iterator[str], what: str) -> Iterator[dict[str, Any]]:
    """The JSON events of an engine's server-sent event stream, up to ``data: [DONE]``.

    Raises:
        EngineLost: The stream ended before ``[DONE]``.
        EngineError: A malformed event, or an error event mid-stream.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise EngineError(f"{what}: the engine sent a malformed event: {exc}") from None
        if not isinstance(event, dict):
            raise EngineError(f"{what}: the engine sent a non-object event.")
        if isinstance(event.get("error"), dict):
            raise EngineError(f"{what}: the engine failed mid-stream: {event['error'].get('message')}")
        yield event
    raise EngineLost(f"{what}: the stream ended before [DONE].")


class TextStream(Iterator[str]):
    """An iterator of text deltas from ``generate(..., stream=True)`` or ``chat(..., stream=True)``.

    The deltas join to the full text. Once the stream is exhausted, ``result`` holds the
    final ``GenerateResult`` (or ``ChatResult``). Closing it early (``close()``, leaving a
    ``with`` block, or dropping it) closes the connection, and the engine aborts the request.
    A stream lives only where it was made: it cannot be pickled, so a faas function must
    consume it and return the text (or a list of deltas), never the stream itself.

    Attributes:
        result: The final result once the stream ended normally, else None.
    """

    def __init__(
        self,
        response: httpx.Response,
        decoder: _Decoder,
        *,
        what: str,
        on_close: Callable[[], None],
        call: dict[str, Any] | None = None,
    ) -> None:
        self._call = call  # the call's record: time to first text, then tokens once it ends
        self._started = time.time()
        self._response = response
        self._decoder = decoder
        self._what = what
        self._on_close = on_close
        self._lines = response.iter_lines()
        self._closed = False
        self.result: GenerateResult | ChatResult | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return str(getattr(self._decoder, "text", ""))

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while not self._closed:
            try:
                line = next(self._lines)
            except StopIteration:
                self.close()
                raise EngineLost(f"{self._what}: the stream ended before [DONE].") from None
            except httpx.TransportError as exc:
                self.close()
                raise EngineLost(f"{self._what}: the stream broke: {exc}") from exc
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                self.result = self._decoder.result()
                self._record_usage()
                self.close()
                break
            try:
                event = json.loads(payload)
            except ValueError as exc:
                self.close()
                raise EngineError(f"{self._what}: the engine sent a malformed event: {exc}") from None
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                self.close()
                raise EngineError(
                    f"{self._what}: the engine failed mid-stream: {event['error'].get('message')}"
                )
            delta = self._decoder.feed(event)
            if delta:
                if self._call is not None and self._call.get("ttft_seconds") is None:
                    self._call["ttft_seconds"] = time.time() - self._started
                return delta
        raise StopIteration

    def _record_usage(self) -> None:
        """Fill the call's record from the stream's last event (native) or its usage chunk (chat)."""
        if self._call is None:
            return
        last = getattr(self._decoder, "last", None)
        final = (
            dict(last) if isinstance(last, Mapping) else {"usage": dict(getattr(self._decoder, "usage", {}))}
        )
        done = call_record("", {}, final, self._started)
        keys = (
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "engine_seconds",
            "engine_share_seconds",
        )
        self._call.update({k: done[k] for k in (*keys, "wall_seconds")})

    def close(self) -> None:
        """Close the connection (the engine then aborts the request if it still runs)."""
        if not self._closed:
            self._closed = True
            self._response.close()
            self._on_close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "A TextStream cannot be pickled: a stream cannot travel through a faas future or "
            "any other process boundary. Consume it inside the function (e.g. ''.join(stream)) "
            "and return the text."
        )
