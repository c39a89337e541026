"""The CPU engine's work endpoints: ``/generate``, ``/encode`` and the OpenAI-compatible ones.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``: parsing and shapes live
in ``_cpu_chat`` and ``_cpu_openai``; generation runs through the same batcher as ``/generate``
and embeddings through the same path as ``/encode``.

Response bodies follow SGLang's shapes (see ``tests/fixtures/sglang``). Handlers await futures
that the scheduler thread completes through ``loop.call_soon_threadsafe``; a client that goes
away has its requests aborted, as SGLang does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from warmpool.cpu_engine import _chat as chat
from warmpool.cpu_engine import _openai as oa
from warmpool.cpu_engine._fields import check_prompt_chars
from warmpool.cpu_engine._requests import (
    EmbedOutput,
    EmbedRequest,
    GenerateSpec,
    GenOutput,
    GenRequest,
    RequestError,
    UnsupportedError,
    parse_encode,
    parse_generate,
)

if TYPE_CHECKING:
    from warmpool.cpu_engine._batcher import Batcher
    from warmpool.cpu_engine._engine import Engine

_T = TypeVar("_T")
UNSUPPORTED_TYPE = "unsupported_feature"
WEIGHT_VERSION = "default"
# meta_info key of a request's engine-time share (not SGLang's; runtime._policy.call_record reads it).
ENGINE_SHARE = "engine_share_seconds"


def error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    """SGLang's native error body; ``kind`` adds a ``type`` (``unsupported_feature``)."""
    body: dict[str, Any] = {"message": message, "code": status}
    if kind:
        body["type"] = kind
    return JSONResponse({"error": body}, status_code=status)


def openai_error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    """SGLang's OpenAI-compatible error body (``ErrorResponse``)."""
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return JSONResponse(body, status_code=status)


def _bad_request(exc: RequestError, *, openai: bool = False) -> JSONResponse:
    if openai:
        return openai_error(
            400, str(exc), UNSUPPORTED_TYPE if isinstance(exc, UnsupportedError) else "BadRequestError"
        )
    return error(400, str(exc), UNSUPPORTED_TYPE if isinstance(exc, UnsupportedError) else None)


async def _body(request: Request) -> Any:
    """The decoded JSON body; raises RequestError for bad JSON or bad UTF-8."""
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has gone away (its body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _gather_unless_gone(request: Request, futs: list[asyncio.Future[_T]]) -> list[_T] | None:
    """All results, or None if the client left first."""
    gathered = asyncio.gather(*futs)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    waits: set[asyncio.Future[Any]] = {gathered, gone}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not gathered.done():
        gathered.cancel()
        return None
    return list(gathered.result())


def deliver(engine: Engine, fut: asyncio.Future[_T]) -> Callable[[_T], None]:
    """A thread-safe callback that completes ``fut`` on the event loop."""
    loop = engine.loop
    assert loop is not None

    def done(out: _T) -> None:
        # RuntimeError: the loop closed during shutdown, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_result, fut, out)

    return done


def _set_result(fut: asyncio.Future[_T], out: _T) -> None:
    if not fut.done():
        fut.set_result(out)


def _meta(out: GenOutput | EmbedOutput) -> dict[str, Any]:
    return {
        "id": out.rid,
        "finish_reason": out.finish_reason if isinstance(out, GenOutput) else {"type": "length", "length": 0},
        "prompt_tokens": out.prompt_tokens,
        "weight_version": WEIGHT_VERSION,
        "total_retractions": 0,
    }


def to_json(batcher: Batcher, out: GenOutput, spec: GenerateSpec) -> dict[str, Any]:
    """One output in SGLang's ``/generate`` response shape."""
    meta = _meta(out)
    meta.update(completion_tokens=len(out.output_ids), cached_tokens=0, e2e_latency=round(out.e2e_latency, 6))
    meta[ENGINE_SHARE] = out.engine_share  # not SGLang's: this request's part of the engine's busy time
    if spec.return_logprob:
        meta["input_token_logprobs"] = []  # input logprobs are not computed here
        meta["output_token_logprobs"] = _with_text(batcher, out.output_token_logprobs, spec)
        if spec.top_logprobs_num:
            meta["input_top_logprobs"] = []
            meta["output_top_logprobs"] = [
                _with_text(batcher, t, spec) for t in out.output_top_logprobs or []
            ]
    if out.hidden_states is not None:
        meta["hidden_states"] = out.hidden_states
    if out.internals is not None:
        meta["internals"] = out.internals  # not SGLang's: the reads of the request's "internals"
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


def _with_text(batcher: Batcher, entries: list[list[Any]] | None, spec: GenerateSpec) -> list[list[Any]]:
    if not entries or not spec.return_text_in_logprobs:
        return list(entries or [])
    return [[lp, tid, _token_text(batcher, tid)] for lp, tid, _ in entries]


def _token_text(batcher: Batcher, tid: int) -> str:
    with batcher.tok_lock:
        text: str = batcher.tokenizer.decode([tid])
    return text


# ---- /generate -----------------------------------------------------------------------------


async def generate(engine: Engine, batcher: Batcher, request: Request) -> Response:
    """``POST /generate``: SGLang's native generation, batched or streamed."""
    try:
        body = await _body(request)
        spec = parse_generate(
            body,
            batcher.encode,
            vocab_size=engine.vocab_size,
            context_len=engine.context_len,
            hook_points=batcher.hooks.names,
            hidden_size=batcher.hooks.hidden,
        )
        for name in spec.lora or ():
            if name is not None and not batcher.loras.known(name):
                raise RequestError(
                    f"lora_path {name!r} names no loaded LoRA adapter (see /load_lora_adapter)"
                )
    except RequestError as exc:
        return _bad_request(exc)
    if spec.stream:
        return _stream_generate(engine, batcher, spec)
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[GenOutput]] = [loop.create_future() for _ in spec.rids]
    try:
        batcher.submit(engine.requests(spec, on_finish=lambda i: deliver(engine, futs[i])))
    except ValueError as exc:
        return error(400, str(exc))
    outs = await _gather_unless_gone(request, futs)
    if outs is None:  # the client left: free its slots (SGLang does the same)
        for rid in spec.rids:
            batcher.abort(rid)
        return Response(status_code=499)
    errors = [o.error for o in outs if o.error is not None]
    if errors:
        return error(500, errors[0])
    results = [to_json(batcher, o, spec) for o in outs]
    return JSONResponse(results if spec.is_batch else results[0])


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _queue_callbacks(
    engine: Engine, queue: asyncio.Queue[tuple[int, GenOutput]]
) -> Callable[[int], Callable[[GenOutput], None]]:
    loop = engine.loop
    assert loop is not None

    def push(i: int) -> Callable[[GenOutput], None]:
        def cb(out: GenOutput) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(queue.put_nowait, (i, out))

        return cb

    return push


def _stream_generate(engine: Engine, batcher: Batcher, spec: GenerateSpec) -> Response:
    """Answer a ``stream: true`` request as SSE: cumulative outputs, then ``[DONE]``."""
    queue: asyncio.Queue[tuple[int, GenOutput]] = asyncio.Queue()
    push = _queue_callbacks(engine, queue)
    try:
        batcher.submit(engine.requests(spec, on_finish=push, on_update=push))
    except ValueError as exc:
        return error(400, str(exc))

    def event(i: int, out: GenOutput) -> bytes:
        body: dict[str, Any] = (
            {"error": {"message": out.error}} if out.error is not None else to_json(batcher, out, spec)
        )
        if spec.is_batch:  # an error's too, so a client can tell which item failed
            body["index"] = i
        return _sse(body)

    async def events() -> AsyncIterator[bytes]:
        remaining = len(spec.rids)
        try:
            while remaining:
                # What has queued goes in one write: a batch's items often end in the same step.
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                remaining -= sum(out.finish_reason is not None for _, out in ready)
                yield b"".join(event(i, out) for i, out in ready)
            yield b"data: [DONE]\n\n"
        finally:
            if remaining:  # the client went away mid-stream
                for rid in spec.rids:
                    batcher.abort(rid)

    return StreamingResponse(events(), media_type="text/event-stream")


# ---- /encode -------------------------------------------------------------------------------


async def encode(engine: Engine, batcher: Batcher, request: Request) -> Response:
    """``POST /encode``: one embedding per input (mean-pooled final hidden states, L2-normalised)."""
    try:
        body = await _body(request)
        spec = parse_encode(
            body, batcher.encode, vocab_size=engine.vocab_size, context_len=engine.context_len
        )
    except RequestError as exc:
        return _bad_request(exc)
    outs = await _embed(engine, batcher, request, spec.rids, spec.prompts, openai=False)
    if isinstance(outs, Response):
        return outs
    results = []
    for out in outs:
        meta = _meta(out)
        meta["e2e_latency"] = round(out.e2e_latency, 6)
        meta[ENGINE_SHARE] = out.engine_share
        results.append({"embedding": out.embedding, "meta_info": meta})
    return JSONResponse(results if spec.is_batch else results[0])


async def _embed(
    engine: Engine,
    batcher: Batcher,
    request: Request,
    rids: list[str],
    prompts: list[list[int]],
    *,
    openai: bool,
) -> list[EmbedOutput] | Response:
    """Embed ``prompts`` (one padded forward per group); an error response if that fails."""
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[EmbedOutput]] = [loop.create_future() for _ in rids]
    reqs = [EmbedRequest(r, ids, deliver(engine, f)) for r, ids, f in zip(rids, prompts, futs, strict=True)]
    try:
        batcher.submit_embeds(reqs)
    except ValueError as exc:
        return openai_error(400, str(exc)) if openai else error(400, str(exc))
    outs = await _gather_unless_gone(request, futs)
    if outs is None:
        return Response(status_code=499)
    errors = [o.error for o in outs if o.error is not None]
    if errors:
        return openai_error(500, errors[0], "InternalServerError") if openai else error(500, errors[0])
    return outs


# ---- /v1/chat/completions ------------------------------------------------------------------


async def chat_completions(engine: Engine, batcher: Batcher, request: Request) -> Response:
    """``POST /v1/chat/completions``: the chat template applied here, then one generation."""
    try:
        body = await _body(request)

        def render(messages: list[dict[str, Any]]) -> list[int]:
            check_prompt_chars(chat.message_chars(messages), engine.context_len, batcher.token_chars)
            return chat.render_messages(batcher.tokenizer, batcher.tok_lock, messages)

        spec = chat.parse_chat(body, render, vocab_size=engine.vocab_size, context_len=engine.context_len)
    except RequestError as exc:
        return _bad_request(exc, openai=True)
    model = engine.served_model_name
    want_logprobs = spec.logprobs or spec.top_logprobs > 0

    def content(out: GenOutput, start: int = 0) -> list[dict[str, Any]] | None:
        if not want_logprobs:
            return None
        tops = out.output_top_logprobs[start:] if out.output_top_logprobs else None
        entries = (out.output_token_logprobs or [])[start:]
        return chat.logprobs_content(entries, tops, lambda t: _token_text(batcher, t))

    def request_for(on_finish: Callable[[GenOutput], None], on_update: Any = None) -> GenRequest:
        return GenRequest(
            rid=spec.rid,
            input_ids=spec.prompt,
            params=spec.params,
            on_finish=on_finish,
            on_update=on_update,
            return_logprob=want_logprobs,
            top_logprobs_num=spec.top_logprobs,
        )

    if spec.stream:
        queue: asyncio.Queue[tuple[int, GenOutput]] = asyncio.Queue()
        push = _queue_callbacks(engine, queue)
        try:
            batcher.submit([request_for(push(0), push(0))])
        except ValueError as exc:
            return openai_error(400, str(exc))
        return StreamingResponse(
            _chat_events(spec, model, batcher, queue, content), media_type="text/event-stream"
        )
    fut: asyncio.Future[GenOutput] = asyncio.get_running_loop().create_future()
    try:
        batcher.submit([request_for(deliver(engine, fut))])
    except ValueError as exc:
        return openai_error(400, str(exc))
    outs = await _gather_unless_gone(request, [fut])
    if outs is None:
        batcher.abort(spec.rid)
        return Response(status_code=499)
    out = outs[0]
    if out.error is not None:
        return openai_error(500, out.error, "InternalServerError")
    return JSONResponse(chat.completion(spec, model, out, content(out)))


async def _chat_events(
    spec: chat.ChatSpec,
    model: str,
    batcher: Batcher,
    queue: asyncio.Queue[tuple[int, GenOutput]],
    content: Callable[[GenOutput, int], list[dict[str, Any]] | None],
) -> AsyncIterator[bytes]:
    """SSE chunks: the assistant role first, then text deltas, the finish, usage, ``[DONE]``."""
    sent_text, sent_tokens, finished = "", 0, False
    try:
        yield _sse(chat.chunk(spec, model, [chat.delta_choice({"role": "assistant", "content": ""}, None)]))
        while not finished:
            _, out = await queue.get()
            finished = out.finish_reason is not None
            if out.error is not None:
                yield _sse({"error": {"message": out.error}})
                break
            delta = out.text[len(sent_text) :] if out.text.startswith(sent_text) else ""
            sent_text += delta
            logprobs = content(out, sent_tokens)
            sent_tokens = len(out.output_ids)
            if delta or finished or logprobs:
                choice = chat.delta_choice({"content": delta}, out if finished else None, logprobs)
                yield _sse(chat.chunk(spec, model, [choice]))
            if finished and spec.include_usage:
                yield _sse(chat.chunk(spec, model, [], chat.usage(out)))
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream
            batcher.abort(spec.rid)


# ---- /v1/completions -----------------------------------------------------------------------


async def completions(engine: Engine, batcher: Batcher, request: Request) -> Response:
    """``POST /v1/completions``: ``n`` generations per prompt, batched or streamed."""
    try:
        body = await _body(request)
        spec = oa.parse_completion(
            body,
            batcher.encode,
            lambda ids: _decode_prompt(batcher, ids),
            vocab_size=engine.vocab_size,
            context_len=engine.context_len,
        )
    except RequestError as exc:
        return _bad_request(exc, openai=True)

    def requests(
        on_finish: Callable[[int], Callable[[GenOutput], None]],
        on_update: Callable[[int], Callable[[GenOutput], None]] | None = None,
    ) -> list[GenRequest]:
        return [
            GenRequest(
                rid=rid,
                input_ids=spec.prompt_of(i),
                params=spec.params,
                on_finish=on_finish(i),
                on_update=on_update(i) if on_update is not None else None,
                return_logprob=spec.logprobs is not None,
                top_logprobs_num=spec.logprobs or 0,
            )
            for i, rid in enumerate(spec.rids)
        ]

    if spec.stream:
        queue: asyncio.Queue[tuple[int, GenOutput]] = asyncio.Queue()
        push = _queue_callbacks(engine, queue)
        try:
            batcher.submit(requests(push, push))
        except ValueError as exc:
            return openai_error(400, str(exc))
        return StreamingResponse(_completion_events(spec, batcher, queue), media_type="text/event-stream")
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[GenOutput]] = [loop.create_future() for _ in spec.rids]
    try:
        batcher.submit(requests(lambda i: deliver(engine, futs[i])))
    except ValueError as exc:
        return openai_error(400, str(exc))
    outs = await _gather_unless_gone(request, futs)
    if outs is None:
        for rid in spec.rids:
            batcher.abort(rid)
        return Response(status_code=499)
    errors = [o.error for o in outs if o.error is not None]
    if errors:
        return openai_error(500, errors[0], "InternalServerError")
    choices = [
        oa.completion_choice(
            i,
            (spec.echo_texts[i // spec.n] if spec.echo else "") + out.text,
            out,
            _legacy_logprobs(batcher, spec, out, 0),
        )
        for i, out in enumerate(outs)
    ]
    return JSONResponse(oa.completion(spec, choices, oa.completion_usage(outs, spec.n)))


def _decode_prompt(batcher: Batcher, ids: list[int]) -> str:
    with batcher.tok_lock:
        text: str = batcher.tokenizer.decode(ids, skip_special_tokens=True)
    return text


def _legacy_logprobs(batcher: Batcher, spec: oa.CompletionSpec, out: GenOutput, start: int) -> Any:
    if spec.logprobs is None or (start and len(out.output_ids) <= start):
        return None
    return oa.legacy_logprobs(out, start, lambda t: _token_text(batcher, t))


async def _completion_events(
    spec: oa.CompletionSpec, batcher: Batcher, queue: asyncio.Queue[tuple[int, GenOutput]]
) -> AsyncIterator[bytes]:
    """SSE chunks per sequence (text deltas, the echo first), then usage if asked, ``[DONE]``."""
    total = len(spec.rids)
    sent_text, sent_tokens = [""] * total, [0] * total
    finals: dict[int, GenOutput] = {}
    started: set[int] = set()  # sequences with an event sent
    try:
        while len(finals) < total:
            i, out = await queue.get()
            if out.error is not None:
                yield _sse({"error": {"message": out.error}})
                break
            finished = out.finish_reason is not None
            if finished:
                finals[i] = out
            new = out.text[len(sent_text[i]) :] if out.text.startswith(sent_text[i]) else ""
            sent_text[i] += new
            logprobs = _legacy_logprobs(batcher, spec, out, sent_tokens[i])
            sent_tokens[i] = len(out.output_ids)
            delta = (spec.echo_texts[i // spec.n] if spec.echo and i not in started else "") + new
            if delta or finished or logprobs:
                started.add(i)
                choice = oa.completion_choice(i, delta, out if finished else None, logprobs)
                yield _sse(oa.completion_chunk(spec, spec.rids[i], [choice]))
        else:
            if spec.include_usage:
                use = oa.completion_usage([finals[i] for i in range(total)], spec.n)
                yield _sse(oa.completion_chunk(spec, spec.rids[0], [], use))
        yield b"data: [DONE]\n\n"
    finally:
        if len(finals) < total:  # the client went away mid-stream
            for rid in spec.rids:
                batcher.abort(rid)


# ---- /v1/embeddings ------------------------------------------------------------------------


async def embeddings(engine: Engine, batcher: Batcher, request: Request) -> Response:
    """``POST /v1/embeddings``: ``/encode``'s vectors in OpenAI's shape (floats or base64)."""
    try:
        body = await _body(request)
        spec = oa.parse_embedding(
            body, batcher.encode, vocab_size=engine.vocab_size, context_len=engine.context_len
        )
    except RequestError as exc:
        return _bad_request(exc, openai=True)
    outs = await _embed(engine, batcher, request, spec.rids, spec.prompts, openai=True)
    if isinstance(outs, Response):
        return outs
    tokens = sum(o.prompt_tokens for o in outs)
    model = str(engine.args.model_path)
    return JSONResponse(oa.embeddings(spec, [o.embedding for o in outs], tokens, model))
