"""``faas serve``: the warm pool as a multi-tenant HTTP service.

:class:`ServiceCore` (tenants, admission, the durable index, result delivery,
trigger bindings) runs on any substrate; :func:`serve` puts the HTTP API in
front of it. See docs/service.md.
"""

from faas.service._auth import Authenticator, load_authenticator, token_digest
from faas.service._core import ServiceCore
from faas.service._serve import build_core, serve
from faas.service._tenant import Tenant
from runtime import AuthConfigError, ServeConfigError

__all__ = [
    "AuthConfigError",
    "Authenticator",
    "ServeConfigError",
    "ServiceCore",
    "Tenant",
    "build_core",
    "load_authenticator",
    "serve",
    "token_digest",
]
