"""Access policy and call records for the ``Model`` handle.

A model spec lists the modes it allows (``generate``, ``encode``, ``logprobs``,
``hidden_states``, ``internals_read``, ``internals_write``); the handle checks
every request against them before it leaves the worker. A tenant whose token
lacks the ``internals`` scope is refused the modes that expose model internals
(:data:`INTERNALS_MODES`) whatever the model allows. The handle also records what it asked of the engine, for
the invocation's provenance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from runtime._errors import MissingScopeError, ModeNotAllowedError

MODES = frozenset({"generate", "encode", "logprobs", "hidden_states", "internals_read", "internals_write"})
INTERNALS_MODES = frozenset({"logprobs", "hidden_states", "internals_read", "internals_write"})
"""The modes that expose model internals: they need the tenant's ``internals`` scope."""


def check_modes(modes: Iterable[str]) -> frozenset[str]:
    """Validate a list of mode names."""
    chosen = frozenset(modes)
    unknown = chosen - MODES
    if unknown:
        raise ValueError(f"Unknown model modes {sorted(unknown)}; the modes are {sorted(MODES)}.")
    return chosen


def modes_of(path: str, body: dict[str, Any]) -> set[str]:
    """The modes one engine request uses."""
    if path in ("/encode", "/v1/embeddings"):
        return {"encode"}
    modes = {"generate"}
    # Chat's ``logprobs`` is a bool; legacy completions' an int, where 0 still returns them.
    logprobs = body.get("logprobs")  # identity: 0 == False, and 0 asks for them
    if (
        body.get("return_logprob")
        or (logprobs is not None and logprobs is not False)
        or body.get("top_logprobs")
    ):
        modes.add("logprobs")
    if body.get("return_hidden_states"):
        modes.add("hidden_states")
    internals = body.get("internals")
    if isinstance(internals, dict):
        if internals.get("read"):
            modes.add("internals_read")
        if internals.get("write"):
            modes.add("internals_write")
    return modes


def guard(
    model_name: str,
    allowed: frozenset[str] | None,
    path: str,
    body: dict[str, Any],
    unscoped: frozenset[str] = frozenset(),
    ungranted: frozenset[str] = frozenset(),
) -> None:
    """Raise if the request uses a mode the model does not allow, or one the tenant's scopes lack.

    Args:
        model_name: For the message.
        allowed: The model's modes (None: all).
        path: The engine path.
        body: The engine request.
        unscoped: Modes the tenant's token may not use (see :data:`INTERNALS_MODES`).
        ungranted: Modes the tenant is not granted on this model.

    Raises:
        MissingScopeError: The tenant lacks the scope a mode needs.
        ModeNotAllowedError: The model does not allow a mode.
    """
    used = modes_of(path, body)
    if used & unscoped:
        raise MissingScopeError(
            f"Your token lacks the 'internals' scope, which {', '.join(sorted(used & unscoped))} "
            f"needs (model {model_name!r}); no request was sent to the engine."
        )
    if used & ungranted:
        raise ModeNotAllowedError(
            f"Your tenant is not granted {', '.join(sorted(used & ungranted))} on model {model_name!r}; "
            "no request was sent to the engine."
        )
    if allowed is None:
        return
    denied = used - allowed
    if denied:
        raise ModeNotAllowedError(
            f"Model {model_name!r} does not allow {', '.join(sorted(denied))} "
            f"(it allows {', '.join(sorted(allowed)) or 'nothing'}); no request was sent to the engine."
        )


ENGINE_SHARE_KEY = "engine_share_seconds"
"""``meta_info`` key of a request's share of the engine's busy time (the CPU engine's; SGLang has none)."""


def _share(metas: list[dict[str, Any]]) -> float | None:
    """The call's share of the engine's busy time: its sequences' shares, if every one has one."""
    shares = [m.get(ENGINE_SHARE_KEY) for m in metas]
    if not metas or any(s is None for s in shares):
        return None
    return sum(float(s) for s in shares if s is not None)


def _cached(metas: list[dict[str, Any]], usage: dict[str, Any]) -> int:
    """Prompt tokens served from the engine's prefix cache (native ``meta_info`` or OpenAI usage)."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = sum(int(m.get("cached_tokens") or 0) for m in metas)
    return cached or (int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0)


_OPENAI_SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n")


def _openai_sampling(body: dict[str, Any]) -> dict[str, Any] | None:
    """The sampling fields of an OpenAI-shaped body (for provenance), None when it has none."""
    found = {k: body[k] for k in _OPENAI_SAMPLING if k in body}
    return found or None


def call_record(
    path: str, body: dict[str, Any], response: Any, started: float, internals: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What one engine call asked for and got back, for provenance and usage (no prompt or output text).

    ``internals`` is the call's internals spec with vectors by digest (never by value).

    ``engine_seconds`` is the engine's own latency (the longest ``e2e_latency`` of the
    call's sequences); ``engine_share_seconds`` is the call's part of the engine's busy
    time when the engine reports it per sequence (the CPU engine does), else None.
    """
    items = response if isinstance(response, list) else [response]
    metas = [i.get("meta_info", {}) for i in items if isinstance(i, dict)]
    usage = response.get("usage", {}) if isinstance(response, dict) else {}
    record: dict[str, Any] = {
        "path": path,
        "sampling_params": body.get("sampling_params") or _openai_sampling(body),
        "options": {
            k: body[k] for k in ("return_logprob", "top_logprobs_num", "return_hidden_states") if k in body
        },
        "internals": internals,
        "rid": body.get("rid"),
        "modes": sorted(modes_of(path, body)),
        "prompt_tokens": sum(int(m.get("prompt_tokens", 0)) for m in metas) or usage.get("prompt_tokens", 0),
        "completion_tokens": sum(int(m.get("completion_tokens", 0)) for m in metas)
        or usage.get("completion_tokens", 0),
        "cached_tokens": _cached(metas, usage),
        "engine_seconds": max((float(m.get("e2e_latency", 0.0)) for m in metas), default=0.0),
        "engine_share_seconds": _share(metas),
        "wall_seconds": time.time() - started,
    }
    return record
