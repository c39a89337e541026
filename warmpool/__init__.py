"""Where work runs: engine hosts, replicas, workers and the pool."""

from warmpool._engine_host import CpuEngineHost, EngineHost, SubprocessEngineHost
from warmpool._pool import Pool, Work
from warmpool._replica import (
    BackPressureError,
    ModelPool,
    Replica,
    ReplicaState,
    default_engine_factory,
)
from warmpool._substrate import (
    ProviderConfig,
    Substrate,
    SubstrateConfig,
    SubstrateConfigError,
    SubstrateKind,
    load_substrate_config,
    make_substrate,
)

__all__ = [
    "BackPressureError",
    "CpuEngineHost",
    "EngineHost",
    "ModelPool",
    "Pool",
    "ProviderConfig",
    "Replica",
    "ReplicaState",
    "SubprocessEngineHost",
    "Substrate",
    "SubstrateConfig",
    "SubstrateConfigError",
    "SubstrateKind",
    "Work",
    "default_engine_factory",
    "load_substrate_config",
    "make_substrate",
]
