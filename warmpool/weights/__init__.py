"""Weights in tiers: ``cold`` (object store only), ``staged`` (on this node's disk), ``hot`` (engine up).

``upload_weights`` puts a model directory and its manifest (``faas-weights.json``:
files, sizes, sha256) into an object store; ``WeightsCache.stage`` fetches them
into the node-local cache (parallel ranged GETs, verified against the manifest,
resumable, published atomically, bounded with LRU eviction); the pool wraps
the engine host of a model with ``weights_uri`` in a ``StagedEngineHost``.
"""

from warmpool.weights._cache import (
    BYTES_ENV,
    CACHE_ENV,
    SYNC_ENV,
    CacheEntry,
    StagedWeights,
    Tier,
    WeightsCache,
    default_cache,
)
from warmpool.weights._host import StagedEngineHost, needs_staging, streams_weights, weights_tier
from warmpool.weights._manifest import (
    MANIFEST_KEY,
    WeightFile,
    WeightsManifest,
    read_manifest,
    redact,
    upload_weights,
    weights_store,
)

__all__ = [
    "BYTES_ENV",
    "CACHE_ENV",
    "MANIFEST_KEY",
    "SYNC_ENV",
    "CacheEntry",
    "StagedEngineHost",
    "StagedWeights",
    "Tier",
    "WeightFile",
    "WeightsCache",
    "WeightsManifest",
    "default_cache",
    "needs_staging",
    "read_manifest",
    "redact",
    "streams_weights",
    "upload_weights",
    "weights_store",
    "weights_tier",
]
