"""Validation of ``Model.generate``'s arguments into SGLang's native ``/generate`` body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import httpx
import numpy as np

from runtime._errors import EngineError, EngineRejectedError, SubmitError, UnsupportedFeatureError
from runtime._internals import FINAL, Read, from_hidden
from runtime._model_results import GenerateResult
from runtime._sampling import (
    SamplingParams,
    SamplingParamsInput,
    chat_fields,
    validate_params_for,
    validate_sampling_params,
)

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
UNSUPPORTED_TYPE = "unsupported_feature"
"""The error ``type`` with which an engine says it lacks a feature (the CPU engine's)."""
HiddenStates = bool | Literal["last"]
Embeds = np.ndarray | Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]]


def prompt_fields(prompt: Prompt | None, input_ids: Prompt | None) -> tuple[dict[str, Any], int, bool]:
    """The ``text``/``input_ids`` fields for a prompt; returns ``(fields, n, single)``."""
    if (prompt is None) == (input_ids is None):
        raise SubmitError("Pass exactly one of prompt (text or token ids) and input_ids.")
    value = prompt if prompt is not None else input_ids
    if isinstance(value, str):
        if input_ids is not None:
            raise SubmitError("input_ids must be token ids, not a string.")
        return {"text": value}, 1, True
    if isinstance(value, Sequence) and value:
        if all(isinstance(p, str) for p in value) and input_ids is None:
            return {"text": list(value)}, len(value), False
        if all(_is_id(t) for t in value):
            return {"input_ids": [int(t) for t in value]}, 1, True  # type: ignore[arg-type]
        if all(isinstance(p, Sequence) and p and all(_is_id(t) for t in p) for p in value):
            return {"input_ids": [[int(t) for t in p] for p in value]}, len(value), False  # type: ignore[union-attr]
    raise SubmitError(
        "prompt must be a string, a non-empty list of strings, a non-empty list of token ids, "
        f"or a list of non-empty token-id lists; got {type(value).__name__}."
    )


def _is_id(t: object) -> bool:
    return isinstance(t, int | np.integer) and not isinstance(t, bool) and int(t) >= 0


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SubmitError(f"{name} must be True or False, got {value!r}.")
    return value


def logprob_fields(return_logprob: bool, top_logprobs_num: int) -> tuple[bool, int]:
    check_flag("return_logprob", return_logprob)
    if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise SubmitError(f"top_logprobs_num must be an integer >= 0, got {top_logprobs_num!r}.")
    return return_logprob or top_logprobs_num > 0, top_logprobs_num


def embeds_fields(input_embeds: Embeds) -> tuple[dict[str, Any], int, bool]:
    """SGLang's ``input_embeds``: ``(T, hidden_size)`` for one prompt, ``(n, T, hidden_size)`` for a batch."""
    try:
        arr = np.asarray(input_embeds, dtype=np.float32)
    except (TypeError, ValueError):
        # A batch of prompts of different lengths: one array per prompt.
        if not isinstance(input_embeds, Sequence) or not input_embeds:
            raise SubmitError(
                "input_embeds must be a (tokens, hidden_size) array or a list of them."
            ) from None
        parts = [embeds_fields(p)[0]["input_embeds"] for p in input_embeds]  # type: ignore[arg-type]
        return {"input_embeds": parts}, len(parts), False
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise SubmitError(
            "input_embeds must be (tokens, hidden_size) or (prompts, tokens, hidden_size), "
            f"got shape {arr.shape}."
        )
    if not np.isfinite(arr).all():
        raise SubmitError("input_embeds has NaN or infinite values.")
    return {"input_embeds": arr.tolist()}, (1 if arr.ndim == 2 else arr.shape[0]), arr.ndim == 2


def generate_body(
    prompt: Prompt | None,
    sampling_params: SamplingParamsInput,
    *,
    input_ids: Sequence[int] | Sequence[Sequence[int]] | None,
    input_embeds: Embeds | None,
    stream: bool,
    return_logprob: bool,
    top_logprobs_num: int,
    return_text_in_logprobs: bool,
    return_hidden_states: HiddenStates,
) -> tuple[dict[str, Any], int, bool]:
    """Validate ``generate``'s arguments into a ``/generate`` body; returns ``(body, n, single)``.

    Raises:
        SubmitError: Anything malformed, naming the argument.
    """
    if input_embeds is not None:
        if prompt is not None or input_ids is not None:
            raise SubmitError("Pass input_embeds instead of a prompt or input_ids, not with them.")
        fields, n, single = embeds_fields(input_embeds)
    else:
        fields, n, single = prompt_fields(prompt, input_ids)
    body: dict[str, Any] = {**fields, "sampling_params": validate_params_for(sampling_params, n)}
    all_params = (
        body["sampling_params"] if isinstance(body["sampling_params"], list) else [body["sampling_params"]]
    )
    if any(p.get("n", 1) != 1 for p in all_params):
        raise SubmitError("sampling_params.n > 1 is not supported by the handle: repeat the prompt instead.")
    want_logprob, top_n = logprob_fields(return_logprob, top_logprobs_num)
    if want_logprob:
        body["return_logprob"] = True
        if top_n:
            body["top_logprobs_num"] = top_n
        if check_flag("return_text_in_logprobs", return_text_in_logprobs):
            body["return_text_in_logprobs"] = True
    if return_hidden_states not in (False, True, "last"):
        raise SubmitError(
            f"return_hidden_states must be True, False or 'last', got {return_hidden_states!r}."
        )
    if return_hidden_states:
        body["return_hidden_states"] = True  # SGLang's field is a bool; "last" is sliced by the handle
    if check_flag("stream", stream):
        if not single:
            raise SubmitError("stream=True takes one prompt, not a batch.")
        if return_hidden_states:
            raise SubmitError("return_hidden_states cannot be combined with stream=True.")
        body["stream"] = True
    return body, n, single


def raise_for_status(model: str, path: str, response: httpx.Response) -> None:
    """Raise the typed error for an error response (SGLang's native or OpenAI error body)."""
    if response.status_code < 400:
        return
    kind: object = None
    try:
        detail = response.json()
    except ValueError:
        message: object = response.text[:500]
    else:
        err = detail.get("error") if isinstance(detail, dict) else None
        err = err if isinstance(err, dict) else detail if isinstance(detail, dict) else {}
        message = err.get("message") or (detail.get("detail") if isinstance(detail, dict) else None) or detail
        kind = err.get("type")
    text = f"The engine for model {model!r} rejected {path} with HTTP {response.status_code}: {message}"
    if kind == UNSUPPORTED_TYPE:
        raise UnsupportedFeatureError(text)
    if response.status_code < 500:
        raise EngineRejectedError(text)
    raise EngineError(text)


def with_fallback(item: Mapping[str, Any], hidden: HiddenStates, fallback: Read | None) -> GenerateResult:
    """Parse one ``/generate`` item; serve a final-layer read from its hidden states when ``fallback``."""
    result = GenerateResult.from_json(item, last_hidden_state=hidden == "last")
    if fallback is None or result.hidden_states is None:
        return result
    arr, pos = from_hidden(fallback, result.hidden_states, result.prompt_tokens)
    kept = result.hidden_states if hidden else None
    return replace(
        result, hidden_states=kept, internals={fallback.hook: arr}, internals_positions={fallback.hook: pos}
    )


def hook_points_of(info: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The hook points in an engine's ``/model_info`` (only the final layer's when it names none)."""
    points = info.get("hook_points")
    if points is None:
        size = info.get("hidden_size")
        return {FINAL: (int(size),) if size else ()}
    return {p["name"]: tuple(p["shape"]) for p in points}


def chat_body(
    messages: Sequence[Mapping[str, Any]],
    sampling_params: Mapping[str, Any] | SamplingParams | None,
    stream: bool,
    return_logprob: bool,
    top_logprobs_num: int,
) -> dict[str, Any]:
    """A checked ``/v1/chat/completions`` body (no ``rid``) from ``Model.chat``'s arguments."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise SubmitError("messages must be a non-empty list of {'role': ..., 'content': ...} mappings.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise SubmitError(f"messages[{i}] must be a mapping with a string 'role' and a 'content'.")
    body: dict[str, Any] = {"messages": [dict(m) for m in messages]}
    params = validate_sampling_params(sampling_params)
    if params.get("n", 1) != 1:
        raise SubmitError("sampling_params.n > 1 is not supported by the handle: call chat() again instead.")
    body.update(chat_fields(params))
    want_logprob, top_n = logprob_fields(return_logprob, top_logprobs_num)
    if want_logprob:
        body["logprobs"] = True
        if top_n:
            body["top_logprobs"] = top_n
    if check_flag("stream", stream):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body
