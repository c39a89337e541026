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

__all__ = [
    "BackPressureError",
    "CpuEngineHost",
    "EngineHost",
    "ModelPool",
    "Pool",
    "Replica",
    "ReplicaState",
    "SubprocessEngineHost",
    "Work",
    "default_engine_factory",
]
