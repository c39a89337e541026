"""The OpenAI batch and file routes of ``faas serve`` (a thin skin over :class:`OpenAIBatches`).

``POST /v1/batches`` itself is routed by the app (a native batch body there is
an older client's); it calls ``app.state.openai_batch_create``, set here.
Errors are OpenAI-shaped, as on the other OpenAI routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from faas.service._core import ServiceCore
from faas.service._openai import OpenAIGateway
from faas.service._openai_batches import OpenAIBatches
from faas.service._openai_files import MAX_FILE_BYTES, OpenAIFiles
from faas.service._openai_routes import _body, _who, openai_error
from faas.service._tenant import Tenant
from runtime import FaasError, InvalidParameterError


async def _call(fn: Callable[[], Any]) -> Response:
    try:
        result = await run_in_threadpool(fn)
    except FaasError as exc:
        return openai_error(exc)
    return JSONResponse(result.model_dump() if hasattr(result, "model_dump") else result)


async def _as_tenant(core: ServiceCore, request: Request, fn: Callable[[Tenant], Any]) -> Response:
    """Authenticate, then run ``fn`` for the tenant in the thread pool; errors OpenAI-shaped."""
    try:
        who = await _who(core, request)
    except FaasError as exc:
        return openai_error(exc)
    return await _call(lambda: fn(who))


def install_openai_batch_routes(app: FastAPI, core: ServiceCore, gateway: OpenAIGateway) -> OpenAIBatches:
    """Add ``/v1/files`` and ``/v1/batches`` to the service's app; returns the batch API.

    The batch API is also ``app.state.openai_batches`` (the app recovers it after a restart).
    """
    files = OpenAIFiles(core)
    batches = OpenAIBatches(core, gateway, files)
    app.state.openai_batches = batches

    async def create_batch(request: Request) -> Response:
        try:
            who = await _who(core, request)
            raw = await _body(request)
        except FaasError as exc:
            return openai_error(exc)
        return await _call(lambda: batches.create(who, raw))

    app.state.openai_batch_create = create_batch

    @app.get("/v1/batches", tags=["openai"])
    async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Response:
        """Your batches, newest first (``after``: the last id of the previous page)."""
        return await _as_tenant(core, request, lambda who: batches.list(who, after=after, limit=limit))

    @app.get("/v1/batches/{batch_id}", tags=["openai"])
    async def get_batch(request: Request, batch_id: str) -> Response:
        """One batch: status, counts and, once finished, its output and error files."""
        return await _as_tenant(core, request, lambda who: batches.get(who, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", tags=["openai"])
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        """Cancel a batch: ``cancelling`` now, ``cancelled`` once its running lines stop."""
        return await _as_tenant(core, request, lambda who: batches.cancel(who, batch_id))

    @app.post("/v1/files", tags=["openai"])
    async def upload(request: Request) -> Response:
        """Upload a file (multipart form: ``file`` and ``purpose``), kept in your store."""
        try:
            who = await _who(core, request)
            size = int(request.headers.get("content-length") or 0)
            if size > MAX_FILE_BYTES + 64 * 1024:
                raise InvalidParameterError(
                    f"The upload is {size} bytes; a file may have at most {MAX_FILE_BYTES}.", "file"
                )
            try:
                form = await request.form(max_part_size=MAX_FILE_BYTES)
            except Exception as exc:  # not multipart, or malformed
                why = f"Expected a multipart form with 'file' and 'purpose': {exc}"
                raise InvalidParameterError(why, "file") from None
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise InvalidParameterError("The form needs a 'file' part holding the file.", "file")
            if not isinstance(purpose, str):
                raise InvalidParameterError("The form needs a 'purpose' field, e.g. 'batch'.", "purpose")
            if purpose == "batch_output":
                why = "'batch_output' files are written by the batch API only."
                raise InvalidParameterError(why, "purpose")
            data = await upload.read()
            name = upload.filename or "upload.jsonl"
        except FaasError as exc:
            return openai_error(exc)
        return await _call(lambda: files.create(who, data, filename=name, purpose=purpose))

    @app.get("/v1/files", tags=["openai"])
    async def list_files(request: Request, purpose: str | None = None) -> Response:
        """Your files, newest first."""
        try:
            who = await _who(core, request)
        except FaasError as exc:
            return openai_error(exc)

        def page() -> dict[str, Any]:
            data = [f.model_dump() for f in files.list(who, purpose)]
            return {"object": "list", "data": data, "has_more": False}

        return await _call(page)

    @app.get("/v1/files/{file_id}", tags=["openai"])
    async def get_file(request: Request, file_id: str) -> Response:
        """One file's object."""
        return await _as_tenant(core, request, lambda who: files.get(who, file_id))

    @app.get("/v1/files/{file_id}/content", tags=["openai"])
    async def file_content(request: Request, file_id: str) -> Response:
        """A file's bytes."""
        try:
            who = await _who(core, request)
            data = await run_in_threadpool(files.content, who, file_id)
        except FaasError as exc:
            return openai_error(exc)
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", tags=["openai"])
    async def delete_file(request: Request, file_id: str) -> Response:
        """Delete a file."""
        return await _as_tenant(core, request, lambda who: files.delete(who, file_id))

    return batches
