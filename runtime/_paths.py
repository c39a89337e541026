"""Where tpm-faas keeps its caches and its embedded store on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The cache root: ``$FAAS_CACHE_DIR`` or the user's cache directory for tpm-faas."""
    override = os.environ.get("FAAS_CACHE_DIR")
    root = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("tpm-faas"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_store_url() -> str:
    """The store used when nothing is configured: ``$FAAS_STORE`` or a local directory."""
    return os.environ.get("FAAS_STORE") or (cache_dir() / "store").as_uri()
