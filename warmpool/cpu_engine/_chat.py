"""The CPU engine's minimal OpenAI-compatible ``/v1/chat/completions``, as SGLang serves it.

SGLang's native ``/generate`` has no messages field; chat goes through its OpenAI-compatible
endpoint, which renders the model's chat template on the server. This module parses such a
request into the engine's native sampling parameters (SGLang's own mapping: ``max_tokens`` to
``max_new_tokens``, ``min_tokens`` to ``min_new_tokens``, ``seed`` to ``sampling_seed``; the
SGLang-only extras such as ``top_k`` keep their names) and shapes responses and stream
chunks the way SGLang does. Every other field of SGLang's ``ChatCompletionRequest`` is
accepted at its default and refused with an unsupported-feature error only when used (see
``_cpu_fields``). Kept free of torch.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmpool.cpu_engine._fields import (
    CHAT_IGNORED,
    CHAT_PARSED,
    CHAT_UNSUPPORTED,
    MESSAGE_IGNORED,
    MESSAGE_PARSED,
    MESSAGE_UNSUPPORTED,
    STREAM_OPTIONS_IGNORED,
    STREAM_OPTIONS_PARSED,
    STREAM_OPTIONS_UNSUPPORTED,
    check_fields,
)
from warmpool.cpu_engine._requests import (
    GenOutput,
    RequestError,
    SamplingParams,
    UnsupportedError,
    parse_sampling_params,
)

# OpenAI chat field -> SGLang sampling parameter.
_RENAMED = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "seed": "sampling_seed",
}
# Fields passed through to the sampling parameters under the same name; those the engine
# does not implement (penalties, n > 1, regex, ebnf, logit_bias ...) are refused there
# unless at their defaults.
_SAME_NAME = (
    "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "n", "regex", "ebnf", "logit_bias", "custom_params", "stop_regex",
)  # fmt: skip


def openai_sampling_params(
    body: dict[str, Any], names: tuple[str, ...], *, limit: int, vocab_size: int, default_max: int
) -> SamplingParams:
    """SGLang's sampling parameters from an OpenAI-style body, errors naming the OpenAI fields.

    Args:
        body: The request body (already field-checked).
        names: Fields passed through under the same name.
        limit: The largest ``max_tokens`` the context allows.
        vocab_size: Stop token ids must be below this.
        default_max: ``max_new_tokens`` when the body sets no ``max_tokens``.

    Raises:
        RequestError: A bad or unsupported value, naming the field as the client sent it.
    """
    native: dict[str, Any] = {k: body[k] for k in names if body.get(k) is not None}
    for openai_name, name in _RENAMED.items():
        if body.get(openai_name) is not None:
            native[name] = body[openai_name]
    if native.get("max_new_tokens", 1) == 0:
        raise RequestError("max_tokens must be at least 1")
    native.setdefault("max_new_tokens", default_max)
    try:
        params = parse_sampling_params(native, max_new_tokens_limit=limit, where="")
    except RequestError as exc:  # name the fields as the client sent them
        message = str(exc)
        for openai_name, name in (("max_tokens", "max_new_tokens"), ("min_tokens", "min_new_tokens")):
            message = message.replace(name, openai_name)
        raise type(exc)(message.replace("sampling_seed", "seed")) from None
    if any(i >= vocab_size for i in params.stop_token_ids):
        raise RequestError(f"stop_token_ids must be below {vocab_size}")
    return params


@dataclass
class ChatSpec:
    """A parsed chat request: one conversation, rendered to token ids."""

    prompt: list[int]
    rid: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def message_chars(messages: list[dict[str, Any]]) -> int:
    """The characters of the messages' text (string contents and text parts), before templating."""
    total = 0
    for m in messages:
        content = m.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            total += len(text) if isinstance(text, str) else 0
    return total


def render_messages(tokenizer: Any, lock: threading.Lock, messages: list[dict[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template (generation prompt added) and return token ids.

    The template itself adds special tokens such as BOS, so the text is not tokenized again.

    Raises:
        RequestError: The template rejects the conversation (e.g. an unknown role).
    """
    try:
        with lock:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja raises TemplateError, others raise ValueError
        raise RequestError(f"the chat template rejected the messages: {exc}") from None
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _messages(raw: object) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it (role, content, name)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role")
        check_fields(m, MESSAGE_PARSED, MESSAGE_IGNORED, MESSAGE_UNSUPPORTED, f"messages[{i}].")
        if not isinstance(m.get("content"), str):
            raise UnsupportedError(
                f"messages[{i}].content other than a string (content parts) is unsupported by the CPU engine"
            )
        out.append({k: m[k] for k in MESSAGE_PARSED if m.get(k) is not None})
    return out


def parse_chat(
    body: object, render: Callable[[list[dict[str, Any]]], list[int]], *, vocab_size: int, context_len: int
) -> ChatSpec:
    """Validate a ``/v1/chat/completions`` body and render its conversation.

    Args:
        body: The decoded JSON body.
        render: Turns messages into prompt token ids (the chat template).
        vocab_size: Stop token ids must be below this.
        context_len: Prompt plus output must fit in this many tokens.

    Returns:
        The parsed request.

    Raises:
        RequestError: Anything wrong with the body, naming the field.
    """
    body = check_fields(body, CHAT_PARSED, CHAT_IGNORED, CHAT_UNSUPPORTED)
    prompt = render(_messages(body.get("messages")))
    if len(prompt) >= context_len:
        raise RequestError(
            f"the rendered messages have {len(prompt)} tokens; the context length is {context_len}"
        )
    limit = context_len - len(prompt)
    # SGLang: an unset max_tokens means up to the context length
    params = openai_sampling_params(body, _SAME_NAME, limit=limit, vocab_size=vocab_size, default_max=limit)
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("rid must be a string")
    spec = ChatSpec(prompt=prompt, rid=rid or f"chatcmpl-{uuid.uuid4().hex}", params=params)
    for key in ("stream", "logprobs"):
        value = body.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{key} must be a boolean, got {value!r}")
        setattr(spec, key, bool(value))
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise RequestError(f"top_logprobs must be an integer between 0 and 20, got {top!r}")
    spec.top_logprobs = top or 0
    options = body.get("stream_options") or {}
    check_fields(
        options, STREAM_OPTIONS_PARSED, STREAM_OPTIONS_IGNORED, STREAM_OPTIONS_UNSUPPORTED, "stream_options."
    )
    spec.include_usage = bool(options.get("include_usage"))
    return spec


def finish_type(out: GenOutput) -> str | None:
    """OpenAI's finish reason (``stop``, ``length``, ``abort``) from SGLang's dict."""
    return str(out.finish_reason["type"]) if out.finish_reason else None


def matched_stop(out: GenOutput) -> int | str | None:
    """The stop token id or stop string that ended generation, as SGLang reports it."""
    matched: int | str | None = (out.finish_reason or {}).get("matched")
    return matched


def usage(out: GenOutput) -> dict[str, Any]:
    """The ``usage`` object of a finished completion."""
    n = len(out.output_ids)
    return {
        "prompt_tokens": out.prompt_tokens,
        "total_tokens": out.prompt_tokens + n,
        "completion_tokens": n,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def logprobs_content(
    token_logprobs: list[list[Any]], tops: list[list[list[Any]]] | None, token_text: Callable[[int], str]
) -> list[dict[str, Any]]:
    """OpenAI chat logprobs (``choices[i].logprobs.content``) from SGLang's entries."""

    def entry(lp: float, tid: int) -> dict[str, Any]:
        text = token_text(tid)
        return {"token": text, "bytes": list(text.encode()), "logprob": lp}

    content = []
    for i, (lp, tid, _) in enumerate(token_logprobs):
        item = entry(lp, tid)
        item["top_logprobs"] = [entry(v, t) for v, t, _ in (tops[i] if tops else [])]
        content.append(item)
    return content


def completion(spec: ChatSpec, model: str, out: GenOutput, logprobs: list[dict[str, Any]] | None) -> Any:
    """The ``chat.completion`` response body for a finished request."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": out.text, "reasoning_content": None, "tool_calls": None},
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish_type(out),
        "matched_stop": matched_stop(out),
    }
    return {
        "id": spec.rid,
        "object": "chat.completion",
        "created": spec.created,
        "model": model,
        "choices": [choice],
        "usage": usage(out),
    }


def chunk(
    spec: ChatSpec, model: str, choices: list[dict[str, Any]], use: dict[str, Any] | None = None
) -> Any:
    """One ``chat.completion.chunk`` stream event."""
    body: dict[str, Any] = {
        "id": spec.rid,
        "object": "chat.completion.chunk",
        "created": spec.created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def delta_choice(
    delta: dict[str, Any], out: GenOutput | None, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A stream choice carrying ``delta``; ``out`` (when final) gives the finish reason."""
    return {
        "index": 0,
        "delta": delta,
        "logprobs": {"content": logprobs} if logprobs else None,
        "finish_reason": finish_type(out) if out is not None else None,
        "matched_stop": matched_stop(out) if out is not None else None,
    }
