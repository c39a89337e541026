"""The ``globus-compute`` substrate: warm pools on Globus Compute engines (Parsl HTEX blocks).

Public module names here are entry points: ``python -m
warmpool.globus_compute.block`` wraps each block's worker pool (it starts the
node-local engine), and :func:`warmpool.globus_compute.task.run_invocation` is
the task every worker runs (serialised by module and name).
"""

from runtime import EndpointRenderError
from warmpool.globus_compute._endpoint_config import (
    TARGETS,
    EndpointOptions,
    load_spec_file,
    render_endpoint_config,
    render_examples,
)
from warmpool.globus_compute._engine import ModelEngine, local_provider
from warmpool.globus_compute._pool import GlobusComputePool

__all__ = [
    "TARGETS",
    "EndpointOptions",
    "EndpointRenderError",
    "GlobusComputePool",
    "ModelEngine",
    "load_spec_file",
    "local_provider",
    "render_endpoint_config",
    "render_examples",
]
