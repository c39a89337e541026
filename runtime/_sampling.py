"""SGLang's sampling parameters, validated in the worker before any request leaves it.

Field names, defaults and ranges follow SGLang's ``SamplingParams`` (``sampling_params.md``
and ``python/sglang/srt/sampling/sampling_params.py``), so a dict that passes here is one
SGLang accepts. Unknown keys, wrong types and out-of-range values raise ``SubmitError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime._errors import SubmitError


class SamplingParams(BaseModel):
    """SGLang's sampling parameters, validated before a request leaves the worker.

    Field names and meanings follow SGLang's native ``sampling_params``; unknown keys are
    an error so a typo never silently falls back to a default, and types are strict (a
    string is not a number). Constrained decoding (``regex``, ``json_schema``, ``ebnf``,
    ``structural_tag``) and penalties are SGLang features: they pass here, and an engine
    that cannot honour them (the CPU engine) refuses the request with
    ``UnsupportedFeatureError``.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(128, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    n: int = Field(1, ge=1)
    sampling_seed: int | None = None
    stream_interval: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> SamplingParams:
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or at least 1, got 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        grammars = [k for k in ("regex", "json_schema", "ebnf") if getattr(self, k) is not None]
        if len(grammars) > 1:
            raise ValueError(f"only one of regex, json_schema and ebnf may be set, got {', '.join(grammars)}")
        return self


# What ``Model.generate`` takes: one params object, or one per prompt of a batch.
SamplingParamsInput: TypeAlias = Mapping[str, Any] | SamplingParams | Sequence[Mapping[str, Any]] | None


def _describe(exc: ValidationError) -> str:
    by_field: dict[str, list[str]] = {}
    for e in exc.errors():
        name = str(e["loc"][0]) if e["loc"] else "sampling_params"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown sampling parameter (SGLang's are: {', '.join(SamplingParams.model_fields)})"
        if msg not in by_field.setdefault(name, []):
            by_field[name].append(msg)
    return "; ".join(f"{name}: {' or '.join(msgs)}" for name, msgs in by_field.items())


def validate_sampling_params(params: Mapping[str, Any] | SamplingParams | None) -> dict[str, Any]:
    """Validate sampling params and return only the keys the caller set.

    Args:
        params: A mapping with SGLang's names, a ``SamplingParams``, or None (defaults).

    Returns:
        The JSON-ready dict to send as ``sampling_params``.

    Raises:
        SubmitError: A key is unknown, a value has the wrong type or is out of range.
    """
    if params is None:
        return {}
    if isinstance(params, SamplingParams):
        return params.model_dump(exclude_unset=True)
    if not isinstance(params, Mapping):
        raise SubmitError(
            f"sampling_params must be a mapping or a SamplingParams, got {type(params).__name__}."
        )
    try:
        return SamplingParams.model_validate(dict(params)).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise SubmitError(f"Invalid sampling_params: {_describe(exc)}.") from None


def validate_params_for(params: SamplingParamsInput, n: int) -> dict[str, Any] | list[dict[str, Any]]:
    """Validate one params object, or one per prompt of a batch of ``n``.

    Raises:
        SubmitError: The params are invalid, or a list does not have one entry per prompt.
    """
    if isinstance(params, Sequence) and not isinstance(params, str | bytes):
        if len(params) != n:
            raise SubmitError(f"sampling_params has {len(params)} entries but there are {n} prompts.")
        return [validate_sampling_params(p) for p in params]
    return validate_sampling_params(params)


# SGLang's OpenAI-compatible chat endpoint takes OpenAI names for these.
_CHAT_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}
# ... and SGLang's own names for these extras.
_CHAT_SAME = {
    "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "stop_regex", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "regex", "ebnf", "n", "logit_bias", "custom_params",
}  # fmt: skip


def chat_fields(params: dict[str, Any]) -> dict[str, Any]:
    """Translate validated native sampling params into ``/v1/chat/completions`` fields.

    This is SGLang's own mapping (``ChatCompletionRequest.to_sampling_params``) run backwards,
    so the engine sees the same sampling parameters as through ``/generate``.

    Raises:
        SubmitError: A parameter has no chat equivalent, or ``max_new_tokens`` is 0 (the
            chat endpoint would read that as "no limit").
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in _CHAT_RENAMED:
            out[_CHAT_RENAMED[key]] = value
        elif key in _CHAT_SAME:
            out[key] = value
        elif key == "json_schema":
            try:
                schema = json.loads(value)
            except ValueError as exc:
                raise SubmitError(f"sampling_params.json_schema is not valid JSON: {exc}.") from None
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        elif value != SamplingParams.model_fields[key].default:
            raise SubmitError(
                f"sampling_params.{key} cannot be sent through chat(): "
                "SGLang's chat endpoint has no such field."
            )
    if out.get("max_tokens") == 0:
        raise SubmitError("chat() needs max_new_tokens >= 1 (the chat endpoint reads 0 as no limit).")
    return out
