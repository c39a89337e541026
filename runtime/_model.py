"""The ``Model`` handle: a keep-alive HTTP client for an engine's native API.

The handle speaks SGLang's native API (``/generate``), which the CPU engine
serves too, so a function cannot tell the two apart.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime._errors import EngineError, EngineLost, SubmitError


class SamplingParams(BaseModel):
    """SGLang's sampling parameters, validated before a request leaves the worker.

    Field names and meanings follow SGLang's native ``sampling_params``; unknown
    keys are an error so a typo never silently falls back to a default.
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    n: int = Field(1, ge=1)
    sampling_seed: int | None = None


def validate_sampling_params(params: Mapping[str, Any] | SamplingParams | None) -> dict[str, Any]:
    """Validate sampling params and return only the keys the caller set.

    Raises:
        SubmitError: A key is unknown or a value is out of range.
    """
    if params is None:
        return {}
    if isinstance(params, SamplingParams):
        return params.model_dump(exclude_unset=True)
    try:
        return SamplingParams.model_validate(dict(params)).model_dump(exclude_unset=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'sampling_params'}: {e['msg']}" for e in exc.errors()
        )
        raise SubmitError(f"Invalid sampling_params: {problems}.") from None


@dataclass(frozen=True)
class GenerateResult:
    """One completion, as returned by ``Model.generate``.

    Attributes:
        text: The generated text (the prompt is not included).
        output_ids: Generated token ids.
        finish_reason: ``"stop"``, ``"length"`` or ``"abort"``.
        prompt_tokens: Number of prompt tokens.
        completion_tokens: Number of generated tokens.
        meta_info: The engine's full ``meta_info`` object.
    """

    text: str
    output_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    meta_info: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GenerateResult:
        """Parse one element of SGLang's ``/generate`` response."""
        meta = dict(obj.get("meta_info") or {})
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, Mapping) else finish
        return cls(
            text=str(obj.get("text", "")),
            output_ids=list(obj.get("output_ids") or []),
            finish_reason=reason,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            meta_info=meta,
        )


class Model:
    """A handle on a resident engine serving one model.

    Thread-safe: many invocations in one worker share a handle and its
    keep-alive connections, so their requests reach the engine concurrently and
    are batched there.

    Args:
        url: Base URL of the engine (``http://host:port``).
        name: The model's registered name (``name@version`` once resolved).
        timeout: Per-request timeout in seconds.
        request_prefix: Prefix for request ids (``rid``), so the pool can abort
            an invocation's requests.
    """

    def __init__(self, url: str, name: str, *, timeout: float = 600.0, request_prefix: str = "faas") -> None:
        self.url = url.rstrip("/")
        self.name = name
        self._prefix = request_prefix
        self._counter = itertools.count()
        self._client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
        )
        self._lock = threading.Lock()
        self._active: set[str] = set()  # shared with bind() clones, for abort_prefix()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, url={self.url!r})"

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._client.close()

    def bind(self, request_prefix: str) -> Model:
        """A handle sharing this one's connections whose request ids start with ``request_prefix``."""
        clone = copy.copy(self)
        clone._prefix = request_prefix
        return clone

    @property
    def request_prefix(self) -> str:
        """The prefix of the request ids (``rid``) this handle sends."""
        return self._prefix

    def _rid(self, prefix: str | None = None) -> str:
        with self._lock:
            n = next(self._counter)
        return f"{prefix or self._prefix}-{n}"

    @overload
    def generate(
        self, prompt: str, sampling_params: Mapping[str, Any] | None = ..., *, rid_prefix: str | None = ...
    ) -> GenerateResult: ...
    @overload
    def generate(
        self,
        prompt: Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: Mapping[str, Any] | None = ...,
        *,
        rid_prefix: str | None = ...,
    ) -> GenerateResult | list[GenerateResult]: ...

    def generate(
        self,
        prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: Mapping[str, Any] | None = None,
        *,
        rid_prefix: str | None = None,
    ) -> GenerateResult | list[GenerateResult]:
        """Generate a completion for one prompt, or one per prompt in a list.

        Args:
            prompt: A string, a list of strings, a list of token ids, or a list
                of token-id lists.
            sampling_params: SGLang sampling parameters (validated here).
            rid_prefix: Overrides the request-id prefix.

        Returns:
            A ``GenerateResult`` for a single prompt (a string or one id list),
            else a list of them in prompt order.

        Raises:
            SubmitError: The prompt or sampling params are malformed.
            EngineError: The engine rejected the request.
            EngineLost: The engine could not be reached.
        """
        body: dict[str, Any] = {"sampling_params": validate_sampling_params(sampling_params)}
        single = True
        if isinstance(prompt, str):
            body["text"] = prompt
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
            body["text"] = list(prompt)
            single = False
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, int) for p in prompt):
            body["input_ids"] = list(prompt)  # type: ignore[arg-type]
        elif (
            isinstance(prompt, Sequence)
            and prompt
            and all(isinstance(p, Sequence) and all(isinstance(t, int) for t in p) for p in prompt)
        ):
            body["input_ids"] = [list(p) for p in prompt]  # type: ignore[arg-type]
            single = False
        else:
            raise SubmitError(
                "prompt must be a string, a non-empty list of strings, a list of token ids, "
                f"or a list of token-id lists; got {type(prompt).__name__}."
            )
        n = 1 if single else len(body.get("text") or body.get("input_ids") or [])
        rids = [self._rid(rid_prefix) for _ in range(n)]
        body["rid"] = rids[0] if single else rids
        with self._lock:
            self._active.update(rids)
        try:
            data = self._post("/generate", body)
        finally:
            with self._lock:
                self._active.difference_update(rids)
        if single:
            return GenerateResult.from_json(data[0] if isinstance(data, list) else data)
        return [GenerateResult.from_json(item) for item in data]

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

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self._client.post(path, json=body)
        except httpx.TransportError as exc:
            raise EngineLost(
                f"The engine for model {self.name!r} at {self.url} is unreachable: {exc}"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json()
                message = detail.get("error", {}).get("message") if isinstance(detail, dict) else None
                message = message or (detail.get("detail") if isinstance(detail, dict) else None) or detail
            except ValueError:
                message = response.text[:500]
            raise EngineError(
                f"The engine for model {self.name!r} rejected {path} "
                f"with HTTP {response.status_code}: {message}"
            )
        return response.json()
