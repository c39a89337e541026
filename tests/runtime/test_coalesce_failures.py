"""How a gathered batch's failures reach each call, against a scripted engine on a real socket.

The real CPU engine cannot be made to fail one item of a batch, refuse a batch, or cut
its stream on demand, so a small HTTP server on 127.0.0.1 plays the engine's part of
the protocol (``/model_info``'s ``batched_streams``, a streamed ``/generate`` batch
answered by ``index``, the plain ``/generate``); ``test_coalesce_engine`` runs the
same paths that succeed against the real engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from runtime import EngineError, EngineLost, GenerateResult, Model
from tests._json_http import send_json


def _item(text: str, rid: str) -> dict[str, Any]:
    meta = {
        "id": rid,
        "finish_reason": {"type": "length", "length": 1},
        "prompt_tokens": 2,
        "completion_tokens": 1,
    }
    return {"text": text, "output_ids": [7], "meta_info": meta}


class _Engine(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, batch: Callable[[_Handler, dict[str, Any]], None]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.batch = batch
        self.alone: list[str] = []  # rids sent alone


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Engine

    def do_GET(self) -> None:
        self.answer(200, {"model_path": "m", "batched_streams": True})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            self.server.batch(self, body)
        else:
            self.server.alone.append(body["rid"])
            self.answer(200, _item("alone", body["rid"]))

    def answer(self, status: int, obj: Any) -> None:
        send_json(self, status, obj)

    def stream(self, chunks: list[dict[str, Any]], *, done: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if done:
            self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> Iterator[_Engine]:
    server = _Engine(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _three_calls(engine: _Engine) -> list[Any]:
    model = Model(f"http://127.0.0.1:{engine.server_address[1]}", "m@1")
    assert model._batches is not None
    model._batches.min_company, model._batches.window, model._batches.max_batch = 0, 30.0, 3
    results: list[Any] = [None] * 3

    def call(i: int) -> None:
        try:
            results[i] = model.bind(f"c{i}").generate(f"prompt {i}", {"max_new_tokens": 1})
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _one_answered_one_failed_then_cut(handler: _Handler, body: dict[str, Any]) -> None:
    rids = body["rid"]
    assert body["sampling_params"][0]["stream_interval"] > 2**30  # finals only
    handler.stream(
        [
            {**_item("batched", rids[0]), "index": 0},
            {"error": {"message": "engine error: RuntimeError: the step failed"}, "index": 1},
        ],
        done=True,  # the stream ends properly with the third item unanswered
    )


@pytest.mark.parametrize("engine", [_one_answered_one_failed_then_cut], indirect=True)
def test_an_item_failed_and_a_stream_cut_short_fail_only_their_calls(engine: _Engine) -> None:
    results = _three_calls(engine)  # which call got which index depends on who queued first
    answered = [r for r in results if isinstance(r, GenerateResult)]
    assert [r.text for r in answered] == ["batched"]
    errors = [r for r in results if not isinstance(r, GenerateResult)]
    assert all(type(e) is EngineError for e in errors), errors
    messages = sorted(str(e) for e in errors)
    assert "broke off a batched answer" in messages[0] and "ended a batched answer" in messages[0]
    assert "failed this request" in messages[1] and "the step failed" in messages[1]
    assert engine.alone == []  # nothing was sent again: the engine may still hold those ids


def _refused(handler: _Handler, body: dict[str, Any]) -> None:
    handler.answer(400, {"error": {"message": "the prompt of item 1 is too long"}})


@pytest.mark.parametrize("engine", [_refused], indirect=True)
def test_a_refused_batch_is_sent_again_call_by_call(engine: _Engine) -> None:
    results = _three_calls(engine)
    assert all(isinstance(r, GenerateResult) and r.text == "alone" for r in results), results
    assert sorted(engine.alone) == ["c0-0", "c1-0", "c2-0"]


def _dies(handler: _Handler, body: dict[str, Any]) -> None:
    handler.stream([{**_item("batched", body["rid"][0]), "index": 0}], done=False)
    handler.connection.shutdown(2)  # as an engine killed mid-answer


@pytest.mark.parametrize("engine", [_dies], indirect=True)
def test_an_engine_that_dies_mid_batch_fails_the_unanswered_calls(engine: _Engine) -> None:
    results = _three_calls(engine)
    assert sum(isinstance(r, GenerateResult) for r in results) == 1
    # Lost, as a call alone would be: the pool retries an invocation its engine lost.
    lost = [r for r in results if isinstance(r, EngineLost)]
    assert len(lost) == 2 and "closed in the middle of its answer" in str(lost[0]), results
    assert engine.alone == []
