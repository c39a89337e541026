"""A JSON answer from a ``http.server`` handler, for the tests' small stand-in servers."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any


def send_json(handler: BaseHTTPRequestHandler, status: int, obj: Any) -> None:
    """Answer ``obj`` as JSON with ``status`` and a Content-Length (so the connection stays open)."""
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
