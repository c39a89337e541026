"""Where work runs: engine hosts, replicas, workers and the pool."""

from runtime import BackPressureError, SubstrateConfigError
from warmpool._adapter_moves import AdapterMove, move_adapter_alias
from warmpool._fair import Fairness, FairQueue, TokenWeights
from warmpool._front import WorkFront
from warmpool._provenance import build_provenance, ensure_provenance, wire_digest
from warmpool._replica import EngineFactory, ModelPool, Replica, ReplicaState, default_engine_factory
from warmpool._substrate import (
    ProviderConfig,
    Substrate,
    SubstrateConfig,
    SubstrateKind,
    load_substrate_config,
    make_substrate,
)
from warmpool.engines._host import CpuEngineHost, EngineHost, SubprocessEngineHost
from warmpool.local._pool import Pool, Work
from warmpool.local._tenants import TenantWorkers, WorkerLimits

__all__ = [
    "AdapterMove",
    "BackPressureError",
    "CpuEngineHost",
    "EngineFactory",
    "EngineHost",
    "FairQueue",
    "Fairness",
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
    "TenantWorkers",
    "TokenWeights",
    "Work",
    "WorkFront",
    "WorkerLimits",
    "build_provenance",
    "default_engine_factory",
    "ensure_provenance",
    "load_substrate_config",
    "make_substrate",
    "move_adapter_alias",
    "wire_digest",
]
