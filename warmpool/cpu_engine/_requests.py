"""Request and response types of the CPU engine, and validation of ``/generate`` and ``/encode`` bodies.

Kept free of torch so the HTTP side can parse requests without importing the model stack.
Every field of SGLang's ``GenerateReqInput``, ``SamplingParams`` and ``EmbeddingReqInput``
is accepted at its default; the features this engine does not implement are refused
(HTTP 400) only when a request actually uses them (see ``_cpu_fields``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmpool.cpu_engine._fields import (
    ENCODE_IGNORED,
    ENCODE_PARSED,
    ENCODE_UNSUPPORTED,
    GENERATE_IGNORED,
    GENERATE_PARSED,
    GENERATE_UNSUPPORTED,
    SAMPLING_PARSED,
    SAMPLING_UNSUPPORTED,
    check_fields,
    check_prompt_tokens,
)
from warmpool.cpu_engine._fields import RequestError as RequestError  # re-exported
from warmpool.cpu_engine._fields import UnsupportedError as UnsupportedError
from warmpool.cpu_engine._internals import InternalsSpec, parse_input_embeds, parse_internals


@dataclass(frozen=True)
class SamplingParams:
    """The subset of SGLang's ``sampling_params`` that this engine implements."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stream_interval: int = 1

    @property
    def greedy(self) -> bool:
        """Whether decoding is argmax (SGLang treats temperature ~0 and top_k 1 so)."""
        return self.temperature < 1e-6 or self.top_k == 1


@dataclass
class GenerateSpec:
    """A parsed ``/generate`` body: one entry per sequence, plus request-wide flags."""

    prompts: list[list[int]] = field(default_factory=list)
    rids: list[str] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    is_batch: bool = False
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_hidden_states: list[bool] = field(default_factory=list)
    internals: InternalsSpec | None = None
    # Per prompt, its [T][H] embeddings when given as input_embeds (prompts then hold T placeholders).
    input_embeds: list[list[list[float]]] | None = None
    # Per prompt, the LoRA adapter it runs with (``lora_path``, a loaded adapter's name); None: none.
    lora: list[str | None] | None = None


@dataclass
class EncodeSpec:
    """A parsed ``/encode`` body: one prompt and rid per input."""

    prompts: list[list[int]] = field(default_factory=list)
    rids: list[str] = field(default_factory=list)
    is_batch: bool = False


def _get_int(d: dict[str, Any], key: str, lo: int, hi: int | None, where: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{where}{key} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise RequestError(f"{where}{key} must be {bound}, got {v}")
    return v


def _get_float(d: dict[str, Any], key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RequestError(f"{where}{key} must be a number, got {v!r}")
    return float(v)


def _get_bool(d: dict[str, Any], key: str, where: str) -> bool | None:
    v = d.get(key)
    if v is not None and not isinstance(v, bool):
        raise RequestError(f"{where}{key} must be a boolean, got {v!r}")
    return v


def parse_sampling_params(
    raw: object, *, max_new_tokens_limit: int, where: str = "sampling_params."
) -> SamplingParams:
    """Validate one ``sampling_params`` object.

    Args:
        raw: The JSON value (a dict, or None for defaults).
        max_new_tokens_limit: The largest ``max_new_tokens`` the server accepts.
        where: Prefix of field names in error messages.

    Returns:
        The parameters, defaults filled in.

    Raises:
        RequestError: An unknown key, a value of the wrong type or out of range, or a
            feature this engine does not implement.
    """
    if raw is None:
        return SamplingParams()
    w = where
    raw = check_fields(raw, SAMPLING_PARSED, frozenset(), SAMPLING_UNSUPPORTED, w)
    kw: dict[str, Any] = {}
    kw["max_new_tokens"] = _get_int(raw, "max_new_tokens", 0, max_new_tokens_limit, w)
    kw["min_new_tokens"] = _get_int(raw, "min_new_tokens", 0, None, w)
    kw["top_k"] = _get_int(raw, "top_k", -1, None, w)
    kw["sampling_seed"] = _get_int(raw, "sampling_seed", -(2**63), 2**64 - 1, w)
    kw["stream_interval"] = _get_int(raw, "stream_interval", 1, None, w)
    if kw["top_k"] == 0:
        raise RequestError(f"{w}top_k must be -1 (off) or >= 1, got 0")
    if kw["sampling_seed"] is not None and kw["sampling_seed"] < 0:
        kw["sampling_seed"] %= 2**64  # torch.Generator seeds are unsigned 64-bit
    for key in ("temperature", "top_p", "min_p"):
        kw[key] = _get_float(raw, key, w)
    if kw["temperature"] is not None and kw["temperature"] < 0:
        raise RequestError(f"{w}temperature must be >= 0, got {kw['temperature']}")
    if kw["top_p"] is not None and not 0 < kw["top_p"] <= 1:
        raise RequestError(f"{w}top_p must be in (0, 1], got {kw['top_p']}")
    if kw["min_p"] is not None and not 0 <= kw["min_p"] <= 1:
        raise RequestError(f"{w}min_p must be in [0, 1], got {kw['min_p']}")
    for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
        kw[key] = _get_bool(raw, key, w)
    kw["no_stop_trim"] = _get_bool(raw, "no_stop_trim", w)
    stop = raw.get("stop") or None  # SGLang reads "" and [] as no stop strings
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError(f"{w}stop must be a non-empty string or a list of them")
        kw["stop"] = tuple(stops)
    ids = raw.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise RequestError(f"{w}stop_token_ids must be a list of token ids")
        kw["stop_token_ids"] = tuple(ids)
    return SamplingParams(**{k: v for k, v in kw.items() if v is not None})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_list(v: object, n: int, name: str) -> list[Any]:
    """Broadcast a scalar-or-list field over a batch of ``n`` (SGLang's convention)."""
    if isinstance(v, list):
        if len(v) != n:
            raise RequestError(f"{name} has {len(v)} entries but the batch has {n}")
        return v
    return [v] * n


def _parse_prompts(
    body: dict[str, Any], encode: Callable[[str], list[int]], vocab_size: int
) -> tuple[list[list[int]], bool]:
    """Tokenize ``text`` or check ``input_ids``; returns the prompts and whether it is a batch."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("exactly one of text or input_ids is required")
    if text is not None:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a non-empty list of strings")
        prompts = [encode(t) for t in texts]
        is_batch = not isinstance(text, str)
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise RequestError("input_ids must be a non-empty list of token ids (or of lists)")
        is_batch = isinstance(input_ids[0], list)
        seqs: list[Any] = input_ids if is_batch else [input_ids]
        for seq in seqs:
            if not isinstance(seq, list) or not all(_is_int(i) and 0 <= i < vocab_size for i in seq):
                raise RequestError(f"input_ids must be lists of token ids in [0, {vocab_size})")
        prompts = [list(s) for s in seqs]
    if any(not p for p in prompts):
        raise RequestError("text/input_ids: a prompt is empty")
    return prompts, is_batch


def _parse_rids(body: dict[str, Any], n: int, is_batch: bool) -> list[str]:
    rids = _as_list(body.get("rid"), n, "rid") if is_batch else [body.get("rid")]
    if not all(r is None or isinstance(r, str) for r in rids):
        raise RequestError("rid must be a string (or, for a batch, a list of strings)")
    out = [r if r is not None else uuid.uuid4().hex for r in rids]
    if len(set(out)) != n:
        raise RequestError("rid values must be unique within a batch")
    return out


def _uniform(body: dict[str, Any], key: str) -> Any:
    """A field SGLang takes per prompt or for the whole batch, as one value.

    Raises:
        UnsupportedError: The per-prompt values differ.
    """
    value = body.get(key)
    if not isinstance(value, list):
        return value
    if any(v != value[0] for v in value):
        raise UnsupportedError(f"{key} with different values per prompt is unsupported by the CPU engine")
    return value[0] if value else None


# Logprob options SGLang also takes as one value per prompt of a batch.
_PER_PROMPT = ("return_logprob", "logprob_start_len", "top_logprobs_num")


def parse_generate(
    body: object,
    encode: Callable[[str], list[int]],
    *,
    vocab_size: int,
    context_len: int,
    hook_points: list[str] | None = None,
    hidden_size: int = 0,
) -> GenerateSpec:
    """Validate a ``/generate`` body and tokenize its prompts.

    Args:
        body: The decoded JSON body.
        encode: Tokenizes one prompt string.
        vocab_size: Token ids must be below this.
        context_len: Prompt plus output must fit in this many tokens.
        hook_points: The model's hook points (``internals``); None or empty: none.
        hidden_size: The model's hidden size (``internals`` vectors, ``input_embeds``).

    Returns:
        The parsed request.

    Raises:
        RequestError: Anything wrong with the body, naming the field.
    """
    body = check_fields(body, GENERATE_PARSED, GENERATE_IGNORED, GENERATE_UNSUPPORTED)
    body = {**body, **{k: _uniform(body, k) for k in _PER_PROMPT if k in body}}
    if body.get("logprob_start_len", -1) not in (-1, None):
        raise UnsupportedError(
            "logprob_start_len other than -1 (input logprobs) is unsupported by the CPU engine"
        )
    spec = GenerateSpec()
    if body.get("input_embeds") is not None:
        if body.get("text") is not None or body.get("input_ids") is not None:
            raise RequestError("exactly one of text, input_ids or input_embeds is required")
        embeds = parse_input_embeds(body["input_embeds"], hidden=hidden_size, context_len=context_len)
        spec.input_embeds, spec.is_batch = embeds
        spec.prompts = [[0] * len(e) for e in spec.input_embeds]  # placeholders: only lengths count
    else:
        spec.prompts, spec.is_batch = _parse_prompts(body, encode, vocab_size)
    n = len(spec.prompts)
    check_prompt_tokens(max(len(p) for p in spec.prompts), context_len)
    limit = max(context_len - min(len(p) for p in spec.prompts), 0)
    raw_params = _as_list(body.get("sampling_params"), n, "sampling_params")
    spec.params = [parse_sampling_params(p, max_new_tokens_limit=limit) for p in raw_params]
    for p, params in zip(spec.prompts, spec.params, strict=True):
        if any(i >= vocab_size for i in params.stop_token_ids):
            raise RequestError(f"sampling_params.stop_token_ids must be below {vocab_size}")
        if len(p) + params.max_new_tokens > context_len:
            raise RequestError(
                f"prompt ({len(p)} tokens) + sampling_params.max_new_tokens "
                f"({params.max_new_tokens}) exceeds the context length {context_len}"
            )
    spec.rids = _parse_rids(body, n, spec.is_batch)
    for key in ("stream", "return_logprob", "return_text_in_logprobs"):
        setattr(spec, key, bool(_get_bool(body, key, "")))
    spec.top_logprobs_num = _get_int(body, "top_logprobs_num", 0, 20, "") or 0
    hidden = _as_list(body.get("return_hidden_states", False), n, "return_hidden_states")
    if not all(isinstance(h, bool) for h in hidden):
        raise RequestError("return_hidden_states must be a boolean (or, for a batch, a list of them)")
    spec.return_hidden_states = hidden
    if spec.stream and any(hidden):
        raise UnsupportedError("return_hidden_states with stream is unsupported by the CPU engine")
    spec.internals = parse_internals(
        body.get("internals"), names=hook_points or [], hidden=hidden_size, context_len=context_len
    )
    if spec.stream and spec.internals is not None:
        raise UnsupportedError("internals with stream is unsupported by the CPU engine")
    lora = body.get("lora_path")
    if lora is not None:
        names = _as_list(lora, n, "lora_path")
        if not all(x is None or (isinstance(x, str) and x) for x in names):
            raise RequestError("lora_path must be an adapter name (or, for a batch, a list of them or nulls)")
        spec.lora = names if any(names) else None
    return spec


def parse_encode(
    body: object, encode: Callable[[str], list[int]], *, vocab_size: int, context_len: int
) -> EncodeSpec:
    """Validate an ``/encode`` body (SGLang's ``EmbeddingReqInput``) and tokenize its inputs.

    Args:
        body: The decoded JSON body.
        encode: Tokenizes one prompt string.
        vocab_size: Token ids must be below this.
        context_len: Each input must fit in this many tokens.

    Returns:
        The parsed request.

    Raises:
        RequestError: Anything wrong with the body, naming the field.
    """
    body = check_fields(body, ENCODE_PARSED, ENCODE_IGNORED, ENCODE_UNSUPPORTED)
    spec = EncodeSpec()
    spec.prompts, spec.is_batch = _parse_prompts(body, encode, vocab_size)
    longest = max(len(p) for p in spec.prompts)
    if longest > context_len:
        raise RequestError(f"an input has {longest} tokens, more than the context length {context_len}")
    spec.rids = _parse_rids(body, len(spec.prompts), spec.is_batch)
    return spec


@dataclass
class GenOutput:
    """What the scheduler reports about one request, final or partial (streaming).

    Attributes:
        rid: The request id.
        output_ids: Generated token ids so far (a matched eos/stop token included).
        text: Decoded output, a matched stop string trimmed off unless ``no_stop_trim``.
        finish_reason: SGLang's finish-reason dict, or None while still running.
        prompt_tokens: Number of prompt tokens.
        e2e_latency: Seconds from submission to this report.
        output_token_logprobs: ``[logprob, token_id, None]`` per output token, if asked.
        output_top_logprobs: Per output token, the top-N ``[logprob, token_id, None]``.
        hidden_states: If asked, SGLang's layout: the prompt's final-layer states
            (``[prompt_tokens][hidden]``) then one ``[hidden]`` vector per later step.
        error: Set when the engine itself failed (not the request's fault).
        engine_share: Engine seconds charged to this request: each forward step's time split
            over its rows by the tokens each fed that step.
        internals: Per read hook point, the recorded array (final outputs only).
    """

    rid: str
    output_ids: list[int]
    text: str
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    e2e_latency: float
    output_token_logprobs: list[list[Any]] | None = None
    output_top_logprobs: list[list[list[Any]]] | None = None
    hidden_states: list[Any] | None = None
    error: str | None = None
    engine_share: float = 0.0
    internals: dict[str, Any] | None = None


@dataclass
class GenRequest:
    """One sequence to generate; ``on_finish`` is called exactly once, from any thread.

    Attributes:
        rid: Unique id while in flight (used by ``Batcher.abort``).
        input_ids: Prompt token ids (non-empty).
        params: Validated sampling parameters.
        on_finish: Receives the final output.
        on_update: If set, receives a partial output after every generated token.
        return_logprob: Collect ``output_token_logprobs``.
        top_logprobs_num: Collect this many top logprobs per output token.
        return_hidden_states: Collect the final-layer hidden state of every position.
        counted: Counts towards ``requests_total`` (health checks do not).
        internals: Hook-point reads and writes (``_hooks``), if any.
        input_embeds: The prompt's ``[T][H]`` embeddings, if given instead of tokens
            (``input_ids`` then holds ``T`` placeholders).
        lora: The LoRA adapter this sequence runs with (``_lora``), None for the base model.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    on_finish: Callable[[GenOutput], None]
    on_update: Callable[[GenOutput], None] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    counted: bool = True
    created: float = field(default_factory=time.perf_counter)
    internals: InternalsSpec | None = None
    input_embeds: list[list[float]] | None = None
    lora: str | None = None


@dataclass
class EmbedOutput:
    """One embedding: the mean of the final hidden states over the input, L2-normalised."""

    rid: str
    embedding: list[float]
    prompt_tokens: int
    e2e_latency: float
    error: str | None = None
    engine_share: float = 0.0


@dataclass
class EmbedRequest:
    """One input to embed; ``on_finish`` is called exactly once, from the scheduler thread."""

    rid: str
    input_ids: list[int]
    on_finish: Callable[[EmbedOutput], None]
    created: float = field(default_factory=time.perf_counter)
