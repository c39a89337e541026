"""Engine hosts: how a model's inference server is started, probed and stopped.

``SGLangEngineHost`` runs ``python -m sglang.launch_server`` (multi-node ranks
from :func:`placement_from_env`); ``CpuEngineHost`` runs this project's CPU
engine (``python -m warmpool.cpu_engine``). Both satisfy :class:`EngineHost`.
"""

from runtime import PlacementError
from warmpool.engines._host import CpuEngineHost, EngineHost, SubprocessEngineHost
from warmpool.engines._placement import NodePlacement, expand_hostlist, placement_from_env
from warmpool.engines._sglang import SGLangEngineHost, sglang_argv

__all__ = [
    "CpuEngineHost",
    "EngineHost",
    "NodePlacement",
    "PlacementError",
    "SGLangEngineHost",
    "SubprocessEngineHost",
    "expand_hostlist",
    "placement_from_env",
    "sglang_argv",
]
