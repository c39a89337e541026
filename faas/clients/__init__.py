"""The clients: one protocol, three ways to reach a pool.

Every client satisfies :class:`FaasClient` (register, submit, map, attach by
id, put, logs, status, cancel), so a decorated function runs unchanged on any:

- :class:`Client`: an embedded pool in this process, on the local or the
  Globus Compute substrate;
- :class:`RemoteClient`: a ``faas serve`` service (``FAAS_URL``);
- :class:`GlobusComputeCloudClient`: an endpoint through the Globus Compute
  cloud (``FAAS_GC_ENDPOINT``).

:func:`get_client` picks one from the environment; :func:`configure` sets it.
"""

from faas.clients._default import configure, get_client, put, shutdown
from faas.clients._embedded import Client
from faas.clients._gc_cloud import GlobusComputeCloudClient
from faas.clients._protocol import FaasClient
from faas.clients._remote import RemoteClient
from runtime import GlobusComputeConfigError, UnsupportedOperationError

__all__ = [
    "Client",
    "FaasClient",
    "GlobusComputeCloudClient",
    "GlobusComputeConfigError",
    "RemoteClient",
    "UnsupportedOperationError",
    "configure",
    "get_client",
    "put",
    "shutdown",
]
