"""The CPU engine's OpenAI-compatible ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``.

Request parsing and response shapes follow SGLang 0.5's ``CompletionRequest``,
``EmbeddingRequest`` and ``ModelCard`` (``sglang/srt/entrypoints/openai``): prompts go to the
engine as SGLang's native requests would (text tokenized with special tokens added, token
ids as given), ``n`` asks for n completions of each prompt (choices ordered prompt by
prompt), ``logprobs`` is the legacy completions shape (``tokens``, ``token_logprobs``,
``top_logprobs`` as ``{token: logprob}``, ``text_offset`` all -1 as in SGLang). Every other
field is accepted at its default and refused with an unsupported-feature error only when
used (see ``_cpu_fields``). Kept free of torch and of the HTTP framework.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmpool.cpu_engine._chat import finish_type, matched_stop, openai_sampling_params
from warmpool.cpu_engine._fields import (
    COMPLETION_IGNORED,
    COMPLETION_PARSED,
    COMPLETION_UNSUPPORTED,
    EMBEDDING_IGNORED,
    EMBEDDING_PARSED,
    EMBEDDING_UNSUPPORTED,
    STREAM_OPTIONS_IGNORED,
    STREAM_OPTIONS_PARSED,
    STREAM_OPTIONS_UNSUPPORTED,
    check_fields,
    check_prompt_tokens,
)
from warmpool.cpu_engine._requests import GenOutput, RequestError, SamplingParams, UnsupportedError

# Completion fields passed to the sampling parameters under the same name (max_tokens,
# min_tokens and seed are renamed there); the unimplemented ones are refused there.
_SAME_NAME = (
    "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "json_schema", "regex", "ebnf", "logit_bias", "custom_params",
    "stop_regex",
)  # fmt: skip
DEFAULT_MAX_TOKENS = 16  # CompletionRequest.max_tokens
DEFAULT_MODEL = "default"  # what SGLang answers in "model" when the request names none
MAX_LOGPROBS = 20


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _prompts(
    raw: object, name: str, encode: Callable[[str], list[int]], vocab_size: int
) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text where it came as text (SGLang's four forms).

    A string or list of strings is tokenized; a list of ints is one prompt of token ids, a
    list of such lists is several.
    """
    what = f"{name} must be a string, a list of strings, or token ids (or lists of them)"
    items: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if not items:
        raise RequestError(what)
    if all(isinstance(p, str) for p in items):
        return [encode(t) for t in items], list(items)
    seqs: list[Any] = [items] if all(_is_int(i) for i in items) else items
    for seq in seqs:
        if isinstance(seq, dict):
            raise UnsupportedError(f"{name} as multimodal objects is unsupported by the CPU engine")
        if not isinstance(seq, list) or not seq or not all(_is_int(i) and 0 <= i < vocab_size for i in seq):
            raise RequestError(f"{what}; token ids must be in [0, {vocab_size}) and lists non-empty")
    return [list(s) for s in seqs], [None] * len(seqs)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{key} must be a boolean, got {value!r}")
    return bool(value)


def _rids(raw: object, n: int, prefix: str) -> list[str]:
    """One rid per prompt: as given (a string, or a list for several), else generated."""
    if raw is None:
        return [f"{prefix}{uuid.uuid4().hex}" for _ in range(n)]
    rids = [raw] if isinstance(raw, str) else raw
    if not isinstance(rids, list) or not all(isinstance(r, str) and r for r in rids):
        raise RequestError("rid must be a string or a list of strings")
    if len(rids) != n:
        raise RequestError(f"rid has {len(rids)} entries but the request has {n} inputs")
    if len(set(rids)) != n:
        raise RequestError("rid values must be unique")
    return list(rids)


def include_usage(body: dict[str, Any]) -> bool:
    """Whether ``stream_options`` asks for a final usage chunk (checked field by field)."""
    options = body.get("stream_options") or {}
    check_fields(
        options, STREAM_OPTIONS_PARSED, STREAM_OPTIONS_IGNORED, STREAM_OPTIONS_UNSUPPORTED, "stream_options."
    )
    return bool(options.get("include_usage"))


# ---- /v1/completions -----------------------------------------------------------------------


@dataclass
class CompletionSpec:
    """A parsed ``/v1/completions`` body: ``n`` sequences per prompt, prompt by prompt.

    A sequence's rid is its prompt's (given or generated), suffixed ``-j`` when ``n`` > 1.
    """

    prompts: list[list[int]]
    echo_texts: list[str]
    rids: list[str]
    params: SamplingParams
    model: str = DEFAULT_MODEL
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt_of(self, i: int) -> list[int]:
        """Token ids of sequence ``i``'s prompt."""
        return self.prompts[i // self.n]


def parse_completion(
    body: object,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    *,
    vocab_size: int,
    context_len: int,
) -> CompletionSpec:
    """Validate a ``/v1/completions`` body and tokenize its prompts.

    Args:
        body: The decoded JSON body.
        encode: Tokenizes one prompt string (special tokens added, as ``/generate`` does).
        decode: Detokenizes a prompt of token ids for ``echo`` (special tokens skipped).
        vocab_size: Token ids must be below this.
        context_len: Prompt plus output must fit in this many tokens.

    Returns:
        The parsed request.

    Raises:
        RequestError: Anything wrong with the body, naming the field.
    """
    body = check_fields(body, COMPLETION_PARSED, COMPLETION_IGNORED, COMPLETION_UNSUPPORTED)
    if "prompt" not in body:
        raise RequestError("prompt is required")
    raw = body["prompt"]
    if not raw or (isinstance(raw, list) and all(not p for p in raw)):
        raise RequestError("prompt cannot be empty")
    prompts, texts = _prompts(raw, "prompt", encode, vocab_size)
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or n < 1:
        raise RequestError(f"n must be an integer >= 1, got {n!r}")
    check_prompt_tokens(max(len(p) for p in prompts), context_len)
    limit = max(context_len - min(len(p) for p in prompts), 0)
    params = openai_sampling_params(
        body, _SAME_NAME, limit=limit, vocab_size=vocab_size, default_max=DEFAULT_MAX_TOKENS
    )
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > context_len:
        raise RequestError(
            f"prompt ({longest} tokens) + max_tokens ({params.max_new_tokens}) "
            f"exceeds the context length {context_len}"
        )
    spec = CompletionSpec(
        prompts=prompts,
        echo_texts=[t if t is not None else decode(p) for t, p in zip(texts, prompts, strict=True)],
        rids=[
            f"{r}-{j}" if n > 1 else r
            for r in _rids(body.get("rid"), len(prompts), "cmpl-")
            for j in range(n)
        ],
        params=params,
        model=str(body.get("model") or DEFAULT_MODEL),
        n=n,
        stream=_bool(body, "stream"),
        echo=_bool(body, "echo"),
        include_usage=include_usage(body),
    )
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {logprobs!r}")
    if spec.echo and logprobs:
        raise UnsupportedError(
            "echo with logprobs (logprobs of the prompt's tokens) is unsupported by the CPU engine"
        )
    spec.logprobs = logprobs
    return spec


def legacy_logprobs(out: GenOutput, start: int, token_text: Callable[[int], str]) -> dict[str, Any]:
    """The completions ``logprobs`` object for output tokens ``start:`` (SGLang's ``LogProbs``)."""
    entries = (out.output_token_logprobs or [])[start:]
    tops = (out.output_top_logprobs or [])[start:]
    return {
        "text_offset": [-1] * len(entries),  # SGLang does not fill offsets either
        "token_logprobs": [lp for lp, _, _ in entries],
        "tokens": [token_text(tid) for _, tid, _ in entries],
        "top_logprobs": [{token_text(tid): lp for lp, tid, _ in top} for top in tops],
    }


def completion_usage(outs: list[GenOutput], n: int) -> dict[str, Any]:
    """``usage`` over all choices: each prompt counted once, every completion counted."""
    prompt = sum(o.prompt_tokens for o in outs[::n])
    completion = sum(len(o.output_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def completion_choice(
    index: int, text: str, out: GenOutput | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    """One choice (or stream choice); ``out`` when final gives the finish reason."""
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_type(out) if out is not None else None,
        "matched_stop": matched_stop(out) if out is not None else None,
    }


def completion(spec: CompletionSpec, choices: list[dict[str, Any]], use: dict[str, Any]) -> Any:
    """The ``text_completion`` response body."""
    return {
        "id": spec.rids[0],
        "object": "text_completion",
        "created": spec.created,
        "model": spec.model,
        "choices": choices,
        "usage": use,
        "metadata": {"weight_version": "default"},
    }


def completion_chunk(
    spec: CompletionSpec, rid: str, choices: list[dict[str, Any]], use: dict[str, Any] | None = None
) -> Any:
    """One streamed ``text_completion`` event; the final usage event leaves out null fields."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": spec.created,
        "model": spec.model,
        "choices": choices,
        "usage": use,
    }
    if use is not None:
        body["usage"] = {k: v for k, v in use.items() if v is not None}
    return body


# ---- /v1/embeddings ------------------------------------------------------------------------


@dataclass
class EmbeddingSpec:
    """A parsed ``/v1/embeddings`` body: one prompt and rid per input."""

    prompts: list[list[int]]
    rids: list[str]
    encoding_format: str = "float"


def parse_embedding(
    body: object, encode: Callable[[str], list[int]], *, vocab_size: int, context_len: int
) -> EmbeddingSpec:
    """Validate a ``/v1/embeddings`` body and tokenize its inputs.

    Args:
        body: The decoded JSON body.
        encode: Tokenizes one input string (as ``/encode`` does).
        vocab_size: Token ids must be below this.
        context_len: Each input must fit in this many tokens.

    Returns:
        The parsed request.

    Raises:
        RequestError: Anything wrong with the body, naming the field.
    """
    body = check_fields(body, EMBEDDING_PARSED, EMBEDDING_IGNORED, EMBEDDING_UNSUPPORTED)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise RequestError(f"encoding_format must be either 'float' or 'base64', got {fmt!r}")
    if "input" not in body:
        raise RequestError("input is required")
    raw = body["input"]
    if not raw:
        raise RequestError("input cannot be empty")
    prompts, texts = _prompts(raw, "input", encode, vocab_size)
    for i, text in enumerate(texts):
        if text is not None and not text.strip():
            raise RequestError(f"input[{i}] cannot be empty or whitespace only")
    longest = max(len(p) for p in prompts)
    if longest > context_len:
        raise RequestError(f"an input has {longest} tokens, more than the context length {context_len}")
    return EmbeddingSpec(prompts, _rids(body.get("rid"), len(prompts), "embd-"), fmt)


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as base64 of little-endian float32 (OpenAI's wire format)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings(
    spec: EmbeddingSpec, vectors: list[list[float]], prompt_tokens: int, model: str
) -> dict[str, Any]:
    """The ``/v1/embeddings`` response body (``model`` is the model path, as SGLang answers)."""
    data = [
        {"embedding": encode_vector(v, spec.encoding_format), "index": i, "object": "embedding"}
        for i, v in enumerate(vectors)
    ]
    use = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }
    return {"data": data, "model": model, "object": "list", "usage": use}


# ---- /v1/models ----------------------------------------------------------------------------


def model_card(name: str, context_len: int) -> dict[str, Any]:
    """SGLang's ``ModelCard`` for the served model."""
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "sglang",
        "root": name,
        "parent": None,
        "max_model_len": context_len,
    }


def model_not_found(name: str) -> dict[str, Any]:
    """SGLang's 404 body for ``GET /v1/models/{id}`` naming another model."""
    return {
        "error": {
            "message": f"The model '{name}' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
