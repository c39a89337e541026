"""HTTP client transports for talking to engines and the service."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def tcp_transport(limits: httpx.Limits, *, url: str) -> httpx.HTTPTransport:
    """A keep-alive transport with TCP_NODELAY for requests to ``url``.

    httpx writes a request's headers and body with separate sends; with Nagle
    on, the body can wait for the peer's (delayed) ACK of the headers. For an
    ``http://`` URL no TLS context is built: loading the CA bundle cost 20-130 ms
    of CPU per client here (more on a busy host), paid by every worker's first
    engine handle and every CLI command's client, for a context plain HTTP never
    uses. An ``https://`` URL's certificates are verified as before.

    Args:
        limits: The connection pool's limits.
        url: The base URL the transport's requests go to (its scheme decides TLS).
    """
    tls = url.startswith("https://")
    return httpx.HTTPTransport(limits=limits, socket_options=_NODELAY, verify=tls)


class KeepAlivePosts:
    """JSON POSTs over plain keep-alive HTTP/1.1 connections, taken from a stack of idle ones.

    The ``Model`` handle's calls from a worker's hundred threads go here:
    httpx's pool takes one lock and scans every connection per request, and in a
    worker that cost more CPU than the rest of an invocation (measured with
    py-spy: 70% of a worker's busy time, a fifth of it in that lock). Here a
    call pops an idle ``http.client`` connection (or opens one) and pushes it
    back when the answer is read: no lock (``list.pop``/``append`` are atomic),
    no scan, and as many connections as calls at once, whichever threads make them.

    Args:
        url: ``http://host:port`` (https is left to httpx).
        timeout: Seconds a response may take.
        connect_timeout: Seconds a connection may take to open.
        max_idle: Idle connections kept; more are closed when they come back.
        headers: Sent with every request (a client's ``Authorization``, say).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float = 10.0,
        max_idle: int = 512,
        headers: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"KeepAlivePosts speaks plain http to a host; got {url!r}.")
        self._host, self._port = parts.hostname, parts.port or 80
        self._base = parts.path.rstrip("/")
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False
        self._headers = {"Content-Type": "application/json", **(headers or {})}

    def post(self, path: str, body: Any) -> tuple[int, bytes, list[tuple[str, str]]]:
        """POST ``body`` as JSON to ``path``; the status, body and headers of the answer.

        A connection the server closed while idle is reopened and the request
        sent again once (it never reached the server).

        Raises:
            OSError: The engine could not be reached, or the connection broke.
            http.client.HTTPException: The answer was not HTTP.
        """
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return self._exchange(path, data, lambda response: response.read())

    def post_bytes(
        self, path: str, data: bytes, *, timeout: float | None = None
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        """:meth:`post` of a body already encoded as JSON; ``timeout`` overrides the pool's for this call."""
        return self._exchange(path, data, lambda response: response.read(), timeout)

    def post_lines(
        self, path: str, body: Any, on_line: Callable[[bytes], None]
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        """:meth:`post`, reading a successful answer line by line (server-sent events) as it comes.

        Each line of a 2xx answer goes to ``on_line`` as it arrives (the returned body is
        then empty); an error answer is read whole and returned as :meth:`post` does.
        """

        def read(response: http.client.HTTPResponse) -> bytes:
            if response.status >= 400:
                return response.read()
            while line := response.readline():
                on_line(line)
            return b""

        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return self._exchange(path, data, read)

    def _exchange(
        self,
        path: str,
        data: bytes,
        read: Callable[[http.client.HTTPResponse], bytes],
        timeout: float | None = None,
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        headers = {**self._headers, "Content-Length": str(len(data))}
        for attempt in (0, 1):
            if self._closed:
                raise ConnectionAbortedError("This engine connection pool is closed.")
            conn, reused = self._take()
            response: http.client.HTTPResponse | None = None
            try:
                conn.use_timeout(self._timeout if timeout is None else timeout)
                conn.request("POST", self._base + path, data, headers)
                response = conn.getresponse()
                payload = read(response)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if reused and attempt == 0 and response is None:
                    continue  # closed while idle: the request never arrived (no answer began)
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close or self._closed or len(self._idle) >= self._max_idle:
                conn.close()
            else:
                self._idle.append(conn)
            return response.status, payload, response.getheaders()
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self) -> tuple[_Connection, bool]:
        """An idle connection the server has not closed (and True), else a new one (and False)."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return _Connection(self._host, self._port, self._timeout, self._connect_timeout), False
            if not conn.stale():
                return conn, True
            conn.close()  # the server closed it while idle: sending into it could lose the request

    def close(self) -> None:
        """Close the idle connections (those in use close when they come back); later posts fail."""
        self._closed = True
        while self._idle:
            with contextlib.suppress(IndexError):
                self._idle.pop().close()


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection that opens with its own connect timeout and TCP_NODELAY."""

    def __init__(self, host: str, port: int, timeout: float, connect_timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), self._connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one send per request anyway
        self.sock.settimeout(self.timeout)

    def stale(self) -> bool:
        """Whether an idle connection has something to read (the server's close): not reusable."""
        if self.sock is None:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def use_timeout(self, timeout: float) -> None:
        """Seconds the next exchange may wait on a read (set on the socket if it is open)."""
        if timeout != self.timeout:
            self.timeout = timeout
            if self.sock is not None:
                self.sock.settimeout(timeout)
