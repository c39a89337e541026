"""SGLang's request fields, and how the CPU engine treats each one.

Every field that SGLang 0.5.x accepts on ``/generate`` (``GenerateReqInput``, its
``sampling_params``), ``/encode`` (``EmbeddingReqInput``), ``/v1/chat/completions``
(``ChatCompletionRequest``, ``StreamOptions``, the message objects), ``/v1/completions``
(``CompletionRequest``) and ``/v1/embeddings`` (``EmbeddingRequest``) falls in one of three
groups here:

- parsed: implemented (see ``_cpu_requests``, ``_cpu_chat`` and ``_cpu_openai``);
- ignored: accepted at any value because it cannot change what this engine computes
  (logging, priority, routing keys, cache namespaces);
- unsupported: a feature the engine lacks. Accepted at SGLang's default (the values below),
  refused otherwise with HTTP 400, type ``unsupported_feature``, naming the field.

Names and defaults come from ``tests/fixtures/sglang/fields.json`` (read from SGLang's
sources; its README says where), and a test checks that these tables cover it exactly.
Names SGLang does not define are refused as unknown, which catches typos (SGLang ignores
unknown top-level keys, and rejects unknown ``sampling_params`` keys as this engine does).
Kept free of torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RequestError(ValueError):
    """A request the engine refuses; the message names the offending field (HTTP 400)."""


class UnsupportedError(RequestError):
    """A known SGLang feature that this engine does not implement (HTTP 400, type ``unsupported_feature``).

    The error body carries ``"type": "unsupported_feature"`` so clients can tell it from a
    malformed request.
    """


def longest_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token of ``tokenizer`` stands for (its longest vocabulary entry).

    Byte-level BPE spells each byte as one character and SentencePiece a space as
    ``▁``, so no token decodes to more characters than its vocabulary entry has.
    """
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def check_prompt_tokens(tokens: int, context_len: int) -> None:
    """Refuse a prompt of ``tokens`` tokens that fills the context, as SGLang does and words it.

    Checked before the output length, so the error names the prompt (not a
    ``max_new_tokens`` range of 0 to 0): like SGLang, a prompt of exactly the
    context length is refused too.

    Raises:
        RequestError: The prompt is longer than the context.
    """
    if tokens >= context_len:
        raise RequestError(
            f"the input ({tokens} tokens) is longer than the model's context length ({context_len} tokens)"
        )


def check_prompt_chars(chars: int, context_len: int, token_chars: int) -> None:
    """Refuse, before tokenizing, a prompt of ``chars`` characters that cannot fit in the context.

    Tokenizing costs time and memory in proportion to the text (a 200 MB prompt
    took the engine down); a prompt of more than ``context_len * token_chars``
    characters has more than ``context_len`` tokens whatever they are.

    Raises:
        RequestError: The prompt is longer than any prompt that fits.
    """
    if chars > context_len * token_chars:
        raise RequestError(
            f"the input ({chars} characters, so more than {context_len} tokens) is longer than the "
            f"model's context length ({context_len} tokens)"
        )


_OFF: Any = None  # the default of most optional SGLang fields

# ---- /generate -----------------------------------------------------------------------------

# internals is not SGLang's: the CPU engine's hook-point reads and writes (see _internals).
GENERATE_PARSED = frozenset(
    {"text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
     "top_logprobs_num", "return_text_in_logprobs", "return_hidden_states", "input_embeds",
     "internals", "lora_path"}
)  # fmt: skip
GENERATE_IGNORED = frozenset(
    {"log_metrics", "no_logs", "priority", "custom_labels", "extra_key", "modalities", "session_id",
     "routing_key", "conversation_id", "http_worker_ipc", "received_time", "external_trace_header",
     "cache_salt"}
)  # fmt: skip
GENERATE_UNSUPPORTED: dict[str, Any] = {
    **dict.fromkeys(
        ("image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes",
         "video_config", "watermark", "token_ids_logprob", "return_sampling_mask",
         "sampling_logprobs_mode", "session_params", "lora_id", "custom_logit_processor",
         "positional_embed_overrides", "bootstrap_host", "bootstrap_port", "bootstrap_room",
         "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank", "data_parallel_rank",
         "disagg_prefill_dp_rank", "max_thinking_tokens", "need_wait_for_mm_inputs",
         "num_items_assigned", "encoder_urls", "max_dynamic_patch", "min_dynamic_patch",
         "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config", "mm_processor_kwargs",
         "multi_item_delimiter_indices", "token_indices_to_pool", "kv_hints"),
        _OFF,
    ),
    **dict.fromkeys(
        ("use_audio_in_video", "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
         "return_flat_raw_top_logprobs_b64", "return_routed_experts", "return_indexer_topk",
         "background", "require_reasoning", "return_bytes", "return_entropy",
         "return_prompt_token_ids"),
        False,
    ),
    "routed_experts_start_len": 0,
}  # fmt: skip

# ---- sampling_params -----------------------------------------------------------------------

SAMPLING_PARSED = frozenset(
    {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
     "min_new_tokens", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
     "no_stop_trim", "stream_interval", "sampling_seed"}
)  # fmt: skip
SAMPLING_UNSUPPORTED: dict[str, Any] = {
    "stop_regex": _OFF,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "n": 1,
    "json_schema": _OFF,
    "regex": _OFF,
    "ebnf": _OFF,
    "structural_tag": _OFF,
    "logit_bias": {},
    "custom_params": _OFF,
    "beam_width": _OFF,
    "watermark": _OFF,
    "choice": [],
}

# ---- /encode -------------------------------------------------------------------------------

ENCODE_PARSED = frozenset({"text", "input_ids", "rid"})
# sampling_params is a dummy in SGLang's EmbeddingReqInput; "model" is not SGLang's but harmless.
ENCODE_IGNORED = frozenset(
    {"sampling_params", "log_metrics", "modalities", "routing_key", "http_worker_ipc", "priority",
     "external_trace_header", "received_time", "model"}
)  # fmt: skip
ENCODE_UNSUPPORTED: dict[str, Any] = {
    **dict.fromkeys(
        ("input_embeds", "image_data", "video_data", "audio_data", "embed_override_token_id",
         "embed_overrides", "lora_path", "lora_id", "positional_embed_overrides", "dimensions",
         "multi_item_delimiter_indices", "token_indices_to_pool", "decision_layout"),
        _OFF,
    ),
    **dict.fromkeys(
        ("is_cross_encoder_request", "background", "return_pooled_hidden_states",
         "return_prompt_token_ids"),
        False,
    ),
}  # fmt: skip

# ---- /v1/chat/completions ------------------------------------------------------------------

# Parsed by _cpu_chat; the sampling ones are checked again as sampling parameters.
CHAT_PARSED = frozenset(
    {"messages", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "seed", "stop",
     "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "min_tokens",
     "stop_token_ids", "no_stop_trim", "ignore_eos", "skip_special_tokens", "rid",
     "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "regex", "ebnf",
     "logit_bias", "custom_params", "stop_regex"}
)  # fmt: skip
# thinking and task only change templates that define them; the last line is OpenAI's own
# request fields that SGLang's model does not declare, and so ignores (the official client
# sends them when a caller passes them).
CHAT_IGNORED = frozenset(
    {"model", "user", "tool_choice", "parallel_tool_calls", "separate_reasoning", "stream_reasoning",
     "priority", "extra_key", "cache_salt", "session_id", "return_cached_tokens_details",
     "return_flat_raw_top_logprobs_b64", "thinking", "task",
     "store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_options",
     "prompt_cache_retention", "safety_identifier", "verbosity", "web_search_options", "prediction",
     "audio", "modalities", "functions", "function_call", "moderation"}
)  # fmt: skip
CHAT_UNSUPPORTED: dict[str, Any] = {
    **dict.fromkeys(
        ("bootstrap_host", "bootstrap_port", "bootstrap_room", "routed_dp_rank",
         "disagg_prefill_dp_rank", "data_parallel_rank", "response_format", "tools",
         "sampling_logprobs_mode", "reasoning_effort", "lora_path", "session_params",
         "chat_template_kwargs", "max_dynamic_patch", "min_dynamic_patch", "images_config",
         "video_config", "mm_processor_kwargs", "custom_logit_processor", "watermark", "input_ids",
         "reasoning"),
        _OFF,
    ),
    **dict.fromkeys(
        ("return_hidden_states", "return_routed_experts", "return_spec_tokens_details",
         "return_prompt_token_ids", "return_token_ids", "return_meta_info",
         "return_input_ids_in_sglext", "return_output_ids_in_sglext", "return_sampling_mask",
         "return_flat_raw_output_top_logprobs", "continue_final_message", "use_audio_in_video"),
        False,
    ),
    "routed_experts_start_len": 0,
}  # fmt: skip
# ---- /v1/completions -----------------------------------------------------------------------

# Parsed by _cpu_openai; the sampling ones are checked again as sampling parameters (n is
# implemented here, as n copies of each prompt).
COMPLETION_PARSED = frozenset(
    {"prompt", "echo", "logprobs", "max_tokens", "n", "seed", "stop", "stream", "stream_options",
     "temperature", "top_p", "top_k", "min_p", "min_tokens", "stop_token_ids", "no_stop_trim",
     "ignore_eos", "skip_special_tokens", "rid", "frequency_penalty", "presence_penalty",
     "repetition_penalty", "json_schema", "regex", "ebnf", "logit_bias", "custom_params",
     "stop_regex"}
)  # fmt: skip
COMPLETION_IGNORED = frozenset(
    {"model", "user", "priority", "extra_key", "cache_salt", "session_id", "custom_labels",
     "return_cached_tokens_details"}
)  # fmt: skip
COMPLETION_UNSUPPORTED: dict[str, Any] = {
    **dict.fromkeys(
        ("bootstrap_host", "bootstrap_port", "bootstrap_room", "routed_dp_rank",
         "disagg_prefill_dp_rank", "data_parallel_rank", "best_of", "suffix", "lora_path",
         "session_params", "response_format", "custom_logit_processor", "watermark",
         "images_config", "mm_processor_kwargs"),
        _OFF,
    ),
    **dict.fromkeys(
        ("return_hidden_states", "return_routed_experts", "return_spec_tokens_details",
         "return_token_ids"),
        False,
    ),
    "routed_experts_start_len": 0,
}  # fmt: skip

# ---- /v1/embeddings ------------------------------------------------------------------------

EMBEDDING_PARSED = frozenset({"input", "encoding_format", "rid"})
EMBEDDING_IGNORED = frozenset({"model", "user", "priority"})
EMBEDDING_UNSUPPORTED: dict[str, Any] = dict.fromkeys(
    ("dimensions", "lora_path", "embed_override_token_id", "embed_overrides"), _OFF
)

# Values other than the default that still ask for nothing (best_of 1: the one completion).
_ALSO_NEUTRAL: dict[str, tuple[Any, ...]] = {"response_format": ({"type": "text"},), "best_of": (1,)}

STREAM_OPTIONS_PARSED = frozenset({"include_usage"})
STREAM_OPTIONS_IGNORED = frozenset({"include_obfuscation"})  # OpenAI's; SGLang ignores it
STREAM_OPTIONS_UNSUPPORTED: dict[str, Any] = {"continuous_usage_stats": False}

# Message objects: role and content are parsed, name goes to the chat template.
MESSAGE_PARSED = frozenset({"role", "content", "name"})
MESSAGE_IGNORED = frozenset({"refusal", "annotations", "audio", "function_call"})  # OpenAI's
MESSAGE_UNSUPPORTED: dict[str, Any] = dict.fromkeys(
    ("tool_call_id", "phase", "reasoning_content", "tool_calls", "tools", "prefix"), _OFF
)


def at_default(value: Any, default: Any) -> bool:
    """Whether ``value`` asks for nothing beyond SGLang's ``default``.

    ``None`` always does (SGLang reads it as "use the default"), and so does an empty or
    false value where the default is off (``[]``, ``{}``, ``""``, ``0``), as SGLang reads
    falsy values there. A batch's per-prompt list is at default when every entry is.
    """
    if value is None or value == default:
        return True
    if (default is None or default is False or default == [] or default == {}) and not value:
        return True
    return (
        isinstance(value, list)
        and not isinstance(default, list)
        and all(at_default(v, default) for v in value)
    )


def check_fields(
    body: object,
    parsed: frozenset[str],
    ignored: frozenset[str],
    unsupported: Mapping[str, Any],
    where: str = "",
) -> dict[str, Any]:
    """Refuse unknown fields and unsupported features used at a non-default value.

    Args:
        body: The decoded JSON object.
        parsed: Fields the caller parses.
        ignored: Fields accepted at any value.
        unsupported: Unimplemented fields and their SGLang defaults.
        where: Prefix of field names in error messages (e.g. ``sampling_params.``).

    Returns:
        ``body``, known to be a dict.

    Raises:
        UnsupportedError: An unsupported field is set to something other than its default.
        RequestError: ``body`` is not an object, or has a field SGLang does not define.
    """
    if not isinstance(body, dict):
        what = where.rstrip(".") or "the request body"
        raise RequestError(f"{what} must be a JSON object, got {type(body).__name__}")
    for key, default in unsupported.items():
        if key in body:
            value = body[key]
            if not at_default(value, default) and value not in _ALSO_NEUTRAL.get(key, ()):
                raise UnsupportedError(
                    f"{where}{key} is unsupported by the CPU engine "
                    f"(only its default, {default!r}, is accepted; got {_short(value)})"
                )
    unknown = sorted(set(body) - parsed - ignored - set(unsupported))
    if unknown:
        raise RequestError(f"unknown field {where}{unknown[0]!r} (not an SGLang request field)")
    return body


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
