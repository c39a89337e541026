"""SGLang's adapter routes on the CPU engine: ``/load_lora_adapter`` and ``/unload_lora_adapter``.

Bodies and answers as SGLang's: ``{"lora_name", "lora_path"}`` and ``{"lora_name"}``; the answer
is ``{"success", "error_message", "loaded_adapters"}`` (200 on success, 400 otherwise). Loading
registers the adapter (its files are read and checked once); its weights enter a batch slot when
a request names it (``_lora``).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from warmpool.cpu_engine._engine import Engine


def _answer(ok: bool, message: str, loaded: dict[str, str]) -> JSONResponse:
    body = {"success": ok, "error_message": "" if ok else message, "loaded_adapters": loaded}
    return JSONResponse(body, status_code=200 if ok else 400)


async def _fields(request: Request, *names: str) -> list[str] | str:
    """The body's string fields, or why the body is malformed."""
    try:
        body: Any = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        return f"the request body is not valid JSON: {exc}"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    values = [body.get(n) for n in names]
    bad = [n for n, v in zip(names, values, strict=True) if not isinstance(v, str) or not v]
    return f"{', '.join(bad)} must be a non-empty string" if bad else [str(v) for v in values]


def add_lora_routes(app: FastAPI, engine: Engine) -> None:
    """Add the two adapter routes to the engine's app."""

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        batcher = engine.batcher
        if batcher is None:
            return _answer(False, engine.load_error or "the model is loading", {})
        fields = await _fields(request, "lora_name", "lora_path")
        if isinstance(fields, str):
            return _answer(False, fields, batcher.loras.info()["loaded_adapters"])
        from warmpool.cpu_engine._lora import LoraError  # torch is imported once the model loads

        try:  # reading the files blocks: not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, lambda: batcher.loras.register(*fields))
        except LoraError as exc:
            return _answer(False, str(exc), batcher.loras.info()["loaded_adapters"])
        return _answer(True, "", batcher.loras.info()["loaded_adapters"])

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        batcher = engine.batcher
        if batcher is None:
            return _answer(False, engine.load_error or "the model is loading", {})
        fields = await _fields(request, "lora_name")
        if isinstance(fields, str):
            return _answer(False, fields, batcher.loras.info()["loaded_adapters"])
        from warmpool.cpu_engine._lora import LoraError

        try:
            batcher.loras.unregister(fields[0])
        except LoraError as exc:
            return _answer(False, str(exc), batcher.loras.info()["loaded_adapters"])
        return _answer(True, "", batcher.loras.info()["loaded_adapters"])
