"""An engine host that stages its model's weights into the node's cache before the engine starts.

:class:`StagedEngineHost` wraps whatever host the pool's engine factory builds:
``start()`` stages the weights (a cache hit fetches nothing), then builds the
real host for a copy of the spec whose ``model_path`` is the cache entry, and
starts it. It records the fetch seconds; the pool records load and ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import ModelSpec
from runtime import EngineError
from warmpool.engines._sglang import STREAMING_FORMATS
from warmpool.weights._cache import StagedWeights, Tier, WeightsCache

if TYPE_CHECKING:
    from warmpool.engines._host import EngineHost


def streams_weights(spec: ModelSpec) -> bool:
    """Whether the engine streams ``spec``'s weights from the store itself (SGLang's ``runai_streamer``)."""
    return spec.engine == "sglang" and str(spec.engine_args.get("load_format", "")) in STREAMING_FORMATS


def needs_staging(spec: ModelSpec) -> bool:
    """Whether a replica of ``spec`` stages its weights into the node's cache before starting."""
    return spec.weights_uri is not None and not streams_weights(spec)


def weights_tier(spec: ModelSpec, cache: WeightsCache | None, *, hot: bool = False) -> Tier:
    """Where ``spec``'s weights are on this node: ``hot`` (an engine is up), ``staged`` or ``cold``.

    Weights from a local ``model_path`` (or the built-in model) are on local
    disk: ``staged``. Weights only in the object store (streamed, or not in
    this node's cache) are ``cold``.
    """
    if hot:
        return "hot"
    if spec.weights_uri is None:
        path = spec.model_path or ""
        return "cold" if "://" in path and not path.startswith("file://") else "staged"
    if streams_weights(spec) or cache is None:
        return "cold"
    return cache.tier(spec.weights_uri)


class StagedEngineHost:
    """Stage the weights, then run the engine host the factory builds for the local copy.

    Args:
        spec: The model version (with ``weights_uri``).
        factory: Builds the real host from a spec and a log directory.
        log_dir: Where the engine's logs go.
        cache: The node's weights cache.
    """

    def __init__(
        self,
        spec: ModelSpec,
        factory: Callable[[ModelSpec, Path], EngineHost],
        log_dir: Path,
        cache: WeightsCache,
    ) -> None:
        if spec.weights_uri is None:
            raise EngineError(f"Model {spec.ref} has no weights_uri to stage.")
        self.spec = spec
        self._factory = factory
        self._log_dir = log_dir
        self._cache = cache
        self._inner: EngineHost | None = None
        self.staged: StagedWeights | None = None
        self.fetch_s: float | None = None
        self.launched_at: float | None = None  # monotonic, once the engine process was launched

    def __repr__(self) -> str:
        return f"StagedEngineHost({self.spec.ref!r}, inner={self._inner!r})"

    @property
    def url(self) -> str | None:
        """The engine's base URL, once it listens."""
        return self._inner.url if self._inner is not None else None

    @property
    def pid(self) -> int | None:
        """The engine's pid, once launched."""
        return self._inner.pid if self._inner is not None else None

    def start(self) -> None:
        """Stage the weights (blocking: this is the fetch), then launch the engine on them.

        Raises:
            IntegrityError: A weight file does not match its manifest.
            WeightsError: No manifest, or the cache cannot hold the weights.
            StoreError: Reading the store failed.
        """
        if self.staged is not None:
            raise EngineError(f"{self!r} was already started.")
        t0 = time.monotonic()
        assert self.spec.weights_uri is not None
        self.staged = self._cache.stage(self.spec.weights_uri)
        self.fetch_s = time.monotonic() - t0
        local = self.spec.model_copy(
            update={
                "model_path": str(self.staged.path),
                "weights_uri": None,
                "prestage": False,
                "weights_digest": self.spec.weights_digest or self.staged.digest,
            }
        )
        self._inner = self._factory(local, self._log_dir)
        self.launched_at = time.monotonic()
        self._inner.start()

    def wait_ready(self, timeout: float) -> float:
        """Wait for the engine (see :meth:`EngineHost.wait_ready`)."""
        if self._inner is None:
            raise EngineError(f"{self!r} has not been started.")
        return self._inner.wait_ready(timeout)

    def alive(self) -> bool:
        """Whether the engine process runs."""
        return self._inner is not None and self._inner.alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine and stop holding its weights in the cache."""
        try:
            if self._inner is not None:
                self._inner.stop(timeout)
        finally:
            if self.staged is not None:
                self.staged.release()

    def log_tail(self, lines: int = 40) -> str:
        """The engine log's last lines."""
        return self._inner.log_tail(lines) if self._inner is not None else ""

    def server_info(self) -> dict[str, Any]:
        """The engine's ``/server_info``."""
        return self._inner.server_info() if self._inner is not None else {}
