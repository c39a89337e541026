"""The process-wide default client: ``faas.get_client()``, ``configure()``, ``put()`` and ``shutdown()``.

Which client it is depends on the environment: a :class:`faas.RemoteClient`
when ``$FAAS_URL`` names a service, a :class:`faas.GlobusComputeCloudClient`
when ``$FAAS_GC_ENDPOINT`` names an endpoint, else an embedded
:class:`faas.Client`. Importing this module installs :func:`get_client` as the
provider behind :func:`faas.clients._protocol.default_client`, which
``Function`` and ``Future`` use without knowing any concrete client.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from faas.clients._embedded import Client
from faas.clients._gc_cloud import ENDPOINT_ENV, GlobusComputeCloudClient
from faas.clients._protocol import FaasClient, provide_default_client
from faas.clients._remote import RemoteClient
from runtime import Ref

_default: Client | RemoteClient | GlobusComputeCloudClient | None = None
_default_lock = threading.Lock()


def get_client() -> FaasClient:
    """The process-wide default client, created on first use (again after it was shut down).

    It is a :class:`RemoteClient` of the service named by ``$FAAS_URL`` (with
    ``$FAAS_TOKEN``) when that is set; else a :class:`GlobusComputeCloudClient`
    when ``$FAAS_GC_ENDPOINT`` names a Globus Compute endpoint; else an
    embedded :class:`Client`.
    """
    global _default  # its return type makes mypy check that all three clients implement FaasClient
    with _default_lock:
        if _default is None or _default._closed:
            _default = _from_env()
        return _default


def _from_env() -> Client | RemoteClient | GlobusComputeCloudClient:
    url = os.environ.get("FAAS_URL")
    if url:
        return RemoteClient(url)
    if os.environ.get(ENDPOINT_ENV):
        return GlobusComputeCloudClient.from_env()
    return Client()


def configure(**options: Any) -> FaasClient:
    """Replace the default client with one built from ``options``.

    With ``url=...`` (and optionally ``token=``, ``timeout=``) it builds a
    :class:`RemoteClient` of that service; otherwise an embedded
    :class:`Client` (see its arguments).
    """
    global _default
    url = options.pop("url", None)
    new: Client | RemoteClient = RemoteClient(url, **options) if url else Client(**options)
    with _default_lock:
        old, _default = _default, new
    if old is not None:
        old.shutdown()
    return new


def put(obj: Any, *, client: FaasClient | None = None) -> Ref:
    """Upload ``obj`` once and return a :class:`faas.Ref` to pass to many invocations.

    Args:
        obj: Any picklable value (``bytes`` are stored as they are).
        client: The client whose store to use (default: the default client's).
    """
    return (client or get_client()).put(obj)


def shutdown() -> None:
    """Shut down the default client, if one was made."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.shutdown()


provide_default_client(get_client)
atexit.register(shutdown)
