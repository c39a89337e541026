"""The Globus Compute cloud client's old module path, kept because it is wire format.

Tasks already sent to an endpoint name ``faas._gc_cloud.run_cloud_invocation``
(the SDK serialises the function by module and name), and results pickled
before the move name ``faas._gc_cloud.GlobusComputeConfigError``; both keep
loading through this module. Code imports from :mod:`faas.clients` and
:mod:`faas` instead. ``tests/golden`` checks every such path.
"""

from faas.clients._gc_cloud import run_cloud_invocation
from runtime import GlobusComputeConfigError

__all__ = ["GlobusComputeConfigError", "run_cloud_invocation"]
