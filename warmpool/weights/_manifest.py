"""The weights manifest: which files make up a model's weights, their sizes and sha256 digests.

``faas models upload-weights DIR URI`` (:func:`upload_weights`) uploads every
file of a model directory under the URI's prefix, then writes the manifest
beside them as ``faas-weights.json``. Staging (:mod:`warmpool.weights._cache`)
reads the manifest first and checks every file it fetches against it, so a file
changed in the store after the upload is refused with ``IntegrityError``.

The manifest's own digest (sha256 of its file list) names the weights: it keys
the node's cache and is recorded in provenance as the weights' digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from runtime import ObjectNotFound, ObjectStore, WeightsError, store_from_url

MANIFEST_KEY = "faas-weights.json"
"""The manifest's key under the weights' prefix."""

_HASH_BLOCK = 8 << 20


class WeightFile(BaseModel):
    """One file of a model's weights.

    Attributes:
        path: Its path relative to the model directory (``/``-separated); also its key under the prefix.
        size: Its size in bytes.
        sha256: Its hex sha256.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int = Field(ge=0)
    sha256: str


class WeightsManifest(BaseModel):
    """The files of a model's weights, as uploaded.

    Attributes:
        schema_version: Format version (1).
        files: Every file, sorted by path.
        created_at: Upload time (seconds since the epoch).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    files: tuple[WeightFile, ...]
    created_at: float = Field(default_factory=time.time)

    @property
    def digest(self) -> str:
        """sha256 of the file list (paths, sizes, digests): the weights' identity."""
        listing = [[f.path, f.size, f.sha256] for f in sorted(self.files, key=lambda f: f.path)]
        return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        """The sum of the files' sizes."""
        return sum(f.size for f in self.files)


def weights_store(uri: str) -> ObjectStore:
    """The store whose root is the weights' prefix (``s3://bucket/prefix?...``, ``file:///dir`` or a path).

    Raises:
        ValueError: The URI names no store this installation knows.
    """
    return store_from_url(uri)


def redact(uri: str) -> str:
    """The URI without its query (endpoint and options), for messages and status displays."""
    parsed = urlparse(uri)
    return uri if not parsed.query else uri.split("?", 1)[0]


def read_manifest(store: ObjectStore, uri: str = "") -> WeightsManifest:
    """Read and check the manifest under ``store``'s root.

    Raises:
        WeightsError: There is no manifest, or it is not a valid one.
    """
    where = redact(uri) if uri else repr(store)
    try:
        raw = store.get(MANIFEST_KEY)
    except ObjectNotFound:
        raise WeightsError(
            f"There is no weights manifest ({MANIFEST_KEY}) at {where}; upload the model directory "
            "with 'faas models upload-weights DIR URI' first."
        ) from None
    try:
        return WeightsManifest.model_validate_json(raw)
    except ValueError as exc:
        raise WeightsError(f"The weights manifest at {where} is not valid: {exc}") from exc


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def model_files(directory: Path) -> list[Path]:
    """The regular files under ``directory`` that make up a model (hidden files and dirs left out)."""
    out = []
    for dirpath, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(dirpath) / name for name in sorted(files) if not name.startswith(".")]
    return out


def upload_weights(directory: str | os.PathLike[str], uri: str, *, threads: int = 4) -> WeightsManifest:
    """Upload a model directory's files under ``uri`` and write their manifest last.

    Each file is hashed, then uploaded with its digest recorded
    (``x-amz-meta-sha256`` on S3). The manifest goes up only after every file,
    so a reader that finds it finds all the files it lists.

    Args:
        directory: The model directory (``config.json``, tokenizer, ``*.safetensors``, ...).
        uri: Where the weights go: ``s3://bucket/prefix?endpoint_url=...`` or ``file:///dir``.
        threads: Files uploaded at once.

    Returns:
        The manifest written.

    Raises:
        WeightsError: ``directory`` holds no files.
        StoreError: An upload failed.
    """
    root = Path(directory)
    paths = model_files(root)
    if not paths:
        raise WeightsError(f"The model directory {str(root)!r} holds no files to upload.")
    store = weights_store(uri)

    def upload(path: Path) -> WeightFile:
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_KEY:
            raise WeightsError(f"The model directory {str(root)!r} holds a file named {MANIFEST_KEY}.")
        digest = _sha256_file(path)
        with path.open("rb") as f:
            store.put_file(rel, f, sha256=digest)
        return WeightFile(path=rel, size=path.stat().st_size, sha256=digest)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="faas-weights-up") as pool:
        files = tuple(sorted(pool.map(upload, paths), key=lambda f: f.path))
    manifest = WeightsManifest(files=files)
    store.put(MANIFEST_KEY, manifest.model_dump_json(indent=1).encode())
    return manifest
