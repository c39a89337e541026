"""Engine replicas: one engine host plus its lifecycle state and timestamps."""

from __future__ import annotations

import enum
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry._specs import ModelSpec
from runtime._errors import EngineError
from warmpool._engine_host import CpuEngineHost, EngineHost


class ReplicaState(enum.Enum):
    """Lifecycle of an engine replica."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


EngineFactory = Callable[[ModelSpec, Path], EngineHost]


def default_engine_factory(spec: ModelSpec, log_dir: Path) -> EngineHost:
    """Build the engine host a model spec asks for."""
    if spec.engine == "cpu":
        path = spec.model_path
        if path is None:
            from warmpool._tiny_model import ensure_tiny_model  # torch is imported only here

            path = str(ensure_tiny_model())
        args = spec.engine_args
        return CpuEngineHost(
            path,
            served_model_name=spec.ref,
            max_batch_size=int(args.get("max_batch_size", 64)),
            threads=args.get("threads"),
            device=str(args.get("device", "cpu")),
            log_dir=log_dir,
        )
    raise EngineError(f"Engine kind {spec.engine!r} of model {spec.ref!r} is not available in this pool.")


@dataclass
class Replica:
    """One engine replica of a model version.

    Attributes:
        spec: The model version it serves.
        host: The engine host process.
        state: Current lifecycle state.
        created_at: When it was asked for (monotonic clock).
        ready_at: When it became ready.
        cold_start_s: Seconds from launch to ready.
        inflight: Invocations dispatched to it and not yet finished.
        error: Why it failed, if it did.
    """

    spec: ModelSpec
    host: EngineHost
    state: ReplicaState = ReplicaState.STARTING
    created_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    cold_start_s: float | None = None
    inflight: int = 0
    error: str | None = None
    ready_event: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str | None:
        """The engine's base URL."""
        return self.host.url

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for status displays."""
        return {
            "model": self.spec.ref,
            "state": self.state.value,
            "url": self.url,
            "pid": self.host.pid,
            "inflight": self.inflight,
            "cold_start_s": self.cold_start_s,
            "error": self.error,
        }


def new_log_dir() -> Path:
    """A fresh directory for one replica's logs."""
    return Path(tempfile.mkdtemp(prefix="faas-replica-"))
