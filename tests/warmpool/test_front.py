"""The CPU engine's work-route front (``_front.WorkFront``) on a real uvicorn socket.

The engine's own tests exercise its work routes through the front end to end; these pin
what the front promises on its own: exact routes answered without FastAPI's stack, an
endpoint's unexpected error answered as the engine's 500 body, everything else passed to
the app unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests._asgi_server import serve
from warmpool import WorkFront
from warmpool.cpu_engine._http import error


def _app() -> tuple[FastAPI, dict[tuple[str, str], object]]:
    app = FastAPI()
    calls: list[str] = []

    async def work(request: Request) -> Response:
        calls.append(request.url.path)
        return JSONResponse({"echo": (await request.json())["x"], "via": "front"})

    async def broken(request: Request) -> Response:
        raise RuntimeError("the handler broke")

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            raise RuntimeError("the stream broke")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app.add_api_route("/generate", work, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"via": "app"})

    routes = {("POST", "/generate"): work, ("POST", "/broken"): broken, ("POST", "/stream"): stream}
    app.state.calls = calls
    return app, routes  # type: ignore[return-value]


def test_the_front_answers_its_routes_and_passes_the_rest_to_the_app() -> None:
    app, routes = _app()
    with (
        serve(
            WorkFront(
                app, routes, on_error=lambda exc: error(500, f"internal error: {type(exc).__name__}: {exc}")
            )
        ) as url,
        httpx.Client(base_url=url) as http,
    ):  # type: ignore[arg-type]
        answer = http.post("/generate", json={"x": 7})
        assert answer.status_code == 200 and answer.json() == {"echo": 7, "via": "front"}
        assert app.state.calls == ["/generate"]
        assert http.get("/health").json() == {"via": "app"}  # not a work route: FastAPI's
        assert http.get("/generate").status_code == 405  # another method: FastAPI answers as before
        assert http.post("/nothing", json={}).status_code == 404

        broken = http.post("/broken", json={})
        assert broken.status_code == 500
        assert broken.json() == {
            "error": {"message": "internal error: RuntimeError: the handler broke", "code": 500}
        }
        assert http.post("/generate", json={"x": 8}).json()["echo"] == 8  # and it keeps serving

        # A stream that breaks after its first chunk cannot be answered 500: the response ends.
        with http.stream("POST", "/stream", json={}) as events:
            assert events.status_code == 200
            received = b""
            with contextlib.suppress(httpx.HTTPError):
                for chunk in events.iter_bytes():
                    received += chunk
        assert received.startswith(b"data: 1")
        assert http.post("/generate", json={"x": 9}).json()["echo"] == 9
