"""HTTP client transports for talking to engines and the service."""

from __future__ import annotations

import socket

import httpx

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def tcp_transport(limits: httpx.Limits) -> httpx.HTTPTransport:
    """A keep-alive transport with TCP_NODELAY.

    httpx writes a request's headers and body with separate sends; with Nagle
    on, the body can wait for the peer's (delayed) ACK of the headers.
    """
    return httpx.HTTPTransport(limits=limits, socket_options=_NODELAY)
