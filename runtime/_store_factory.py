"""Open an object store from its config or URL (the one place that knows every backend).

Kept apart from :mod:`runtime._store` so the backends (:mod:`runtime._s3`
imports the store protocol) and the factory do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from runtime._store import LocalStore, ObjectStore, _check_key


def store_from_config(config: dict[str, Any]) -> ObjectStore:
    """Rebuild a store from its ``config()``.

    Raises:
        ValueError: The kind is not one this installation knows.
    """
    kind = config.get("kind")
    options = dict(config.get("options") or {})
    if kind == "file":
        return LocalStore.from_config(options)
    if kind == "s3":
        from runtime._s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store.from_config(options)
    raise ValueError(f"Unknown object store kind {kind!r}; expected 'file' or 's3'.")


def scoped_config(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The config of the same store with every key under ``prefix`` (e.g. ``tenants/alice``).

    Raises:
        ValueError: ``prefix`` is not a relative key path, or the kind has no prefixes.
    """
    _check_key(prefix)
    options = dict(config.get("options") or {})
    if config.get("kind") == "file":
        options["root"] = str(Path(options["root"]) / prefix)
    elif config.get("kind") == "s3":
        options["prefix"] = "/".join(p for p in (str(options.get("prefix") or "").strip("/"), prefix) if p)
    else:
        raise ValueError(f"Object store kind {config.get('kind')!r} cannot be scoped to a prefix.")
    return {"kind": config["kind"], "options": options}


def scoped_store(store: ObjectStore, prefix: str) -> ObjectStore:
    """The same store seen from ``prefix``: its keys are relative to it, nothing above is reachable."""
    return store_from_config(scoped_config(store.config(), prefix))


def store_from_url(url: str) -> ObjectStore:
    """Open the store named by a URL: ``file:///path`` or ``s3://bucket/prefix?...``.

    A plain path is taken as a local directory.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(unquote(parsed.path) if parsed.scheme else url)
    if parsed.scheme == "s3":
        from runtime._s3 import S3Store

        return S3Store.from_url(url)
    raise ValueError(f"Unsupported store URL {url!r}: use file:///path or s3://bucket/prefix.")
