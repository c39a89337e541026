"""KeepAlivePosts (the Model handle's plain path) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runtime import EngineLost, EngineRejectedError, Model
from runtime._net import KeepAlivePosts
from tests._json_http import send_json


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        status = 400 if body.get("bad") else 200
        answer = {"error": {"message": "no such thing"}} if status == 400 else {"echo": body, "text": "ok"}
        send_json(self, status, answer)
        if self.server.drop_after_answer:
            self.close_connection = True  # as a server closing an idle connection: no header says so

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, object]] = []
        self.connections = 0
        self.drop_after_answer = False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        self.connections += 1
        return super().get_request()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_connections_are_kept_alive_and_shared_between_threads(server: _Server) -> None:
    posts = KeepAlivePosts(_url(server), timeout=10)
    for i in range(20):
        status, payload, _ = posts.post("/generate", {"i": i, "text": "é"})
        assert status == 200 and json.loads(payload)["echo"] == {"i": i, "text": "é"}
    assert server.connections == 1

    def one() -> None:
        posts.post("/generate", {"i": 0})

    for _ in range(10):  # a thread per call (a deadline's thread) still reuses the idle connection
        thread = threading.Thread(target=one)
        thread.start()
        thread.join(10)
    assert server.connections == 1
    barrier = threading.Barrier(3)

    def at_once() -> None:
        barrier.wait(10)
        for i in range(4):
            posts.post("/generate", {"i": i})

    threads = [threading.Thread(target=at_once) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert server.connections <= 3  # as many as calls at once, no more
    posts.close()
    with pytest.raises(OSError):
        posts.post("/generate", {})


def test_a_connection_closed_while_idle_is_reopened_once(server: _Server) -> None:
    posts = KeepAlivePosts(_url(server), timeout=10)
    server.drop_after_answer = True
    for i in range(3):
        assert posts.post("/generate", {"i": i})[0] == 200
    assert [b["i"] for b in server.bodies] == [0, 1, 2]  # each sent once
    assert server.connections == 3


def test_the_model_handle_maps_answers_and_failures(server: _Server) -> None:
    model = Model(_url(server), "stub")
    assert model._post("/generate", {"text": "hi"}, checked=True)["text"] == "ok"
    with pytest.raises(EngineRejectedError, match="HTTP 400: no such thing"):
        model._post("/generate", {"bad": True}, checked=True)
    model.close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineLost, match="unreachable"):
        Model(f"http://127.0.0.1:{port}", "gone")._post("/generate", {}, checked=True)


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="plain http"):
        KeepAlivePosts("https://example.org", timeout=1)
