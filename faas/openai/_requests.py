"""Checking OpenAI request bodies before anything is queued.

The fields the service interprets are checked here (types and ranges as the
OpenAI API documents them); our extensions (``priority``) are taken out; every
other field goes to the engine as given, which refuses what it does not
implement (400, ``unsupported_feature``). A bad body raises
:class:`runtime.InvalidParameterError` naming the field, before any work is
accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from runtime import InvalidParameterError, Priority

Kind = Literal["chat", "completions", "embeddings"]
KINDS: tuple[Kind, ...] = get_args(Kind)
PATHS: dict[Kind, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4


@dataclass(frozen=True)
class Request:
    """A checked OpenAI request body.

    Attributes:
        kind: Which route it came to.
        model: The model the client named.
        body: What goes to the engine (no ``model``, no extensions).
        stream: Whether the client asked for server-sent events.
        include_usage: Whether a streamed reply ends with a usage chunk.
        priority: Our ``priority`` extension (None: the default).
        logprobs: Whether it asks for token log-probabilities (a model mode).
    """

    kind: Kind
    model: str
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    priority: Priority | None
    logprobs: bool


def _bad(param: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(f"Invalid '{param}': {message}", param)


def _int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _bad(key, f"expected an integer {bound}, got {value!r}.")


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _bad(key, f"expected a number between {lo:g} and {hi:g}, got {value!r}.")


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(key, f"expected a boolean, got {value!r}.")
    return bool(value)


def _stop(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"expected a string or a list of at most {MAX_STOP} non-empty strings.")


def _is_ids(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _inputs(body: dict[str, Any], key: str) -> None:
    """A prompt or input: a string, a list of strings, token ids, or a list of token-id lists."""
    value = body.get(key)
    if value is None:
        raise _bad(key, "it is required.")
    if isinstance(value, str):
        return
    items = value if isinstance(value, list) and value else None
    if items and (all(isinstance(v, str) for v in items) or _is_ids(items) or all(_is_ids(v) for v in items)):
        return
    raise _bad(key, "expected a string, a non-empty list of strings, token ids, or a list of token-id lists.")


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "expected an object with a 'role'.")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"expected one of {sorted(ROLES)}, got {role!r}.")
        content = message.get("content")
        if content is None and role != "assistant":
            raise _bad(f"messages[{i}].content", "it is required.")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"messages[{i}].content", "expected a string or a list of content parts.")


def _priority(body: dict[str, Any]) -> Priority | None:
    value = body.pop("priority", None)
    if value is None:
        return None
    if value not in get_args(Priority):
        raise _bad("priority", f"expected one of {list(get_args(Priority))}, got {value!r}.")
    return value  # type: ignore[no-any-return]


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "only allowed when 'stream' is true.")
    if not isinstance(options, dict):
        raise _bad("stream_options", "expected an object.")
    return _bool(options, "include_usage")


def _logprobs(kind: Kind, body: dict[str, Any]) -> bool:
    if kind == "chat":
        wanted = _bool(body, "logprobs")
        _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not wanted:
            raise _bad("top_logprobs", "only allowed when 'logprobs' is true.")
        return wanted
    _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return body.get("logprobs") is not None


def check_request(kind: Kind, raw: object) -> Request:
    """Check an OpenAI request body for route ``kind``.

    Args:
        kind: ``chat``, ``completions`` or ``embeddings``.
        raw: The parsed JSON body.

    Returns:
        The checked request: what goes to the engine, and what the service acts on.

    Raises:
        InvalidParameterError: A field is missing or malformed (``param`` names it).
    """
    if not isinstance(raw, dict):
        raise InvalidParameterError("The request body must be a JSON object.", None)
    body = dict(raw)
    model = body.pop("model", None)
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required (GET /v1/models lists them).")
    priority = _priority(body)
    if kind == "embeddings":
        _inputs(body, "input")
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise _bad("encoding_format", f"expected 'float' or 'base64', got {fmt!r}.")
        if "stream" in body:
            raise _bad("stream", "embeddings are not streamed.")
        return Request(kind, model, body, False, False, priority, False)
    if kind == "chat":
        _messages(body)
        _int(body, "max_completion_tokens", 1)
    else:
        _inputs(body, "prompt")
        _bool(body, "echo")
    _int(body, "max_tokens", 1)
    _int(body, "n", 1, MAX_N)
    _int(body, "seed", -(2**63), 2**64 - 1)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _stop(body)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    logprobs = _logprobs(kind, body)
    return Request(kind, model, body, stream, include_usage, priority, logprobs)
