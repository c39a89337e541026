"""Open an object store from its config or URL (the one place that knows every backend).

Kept apart from :mod:`runtime._store` so the backends (:mod:`runtime._s3`
imports the store protocol) and the factory do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from runtime._errors import StoreConfigError
from runtime._store import LocalStore, ObjectStore, _check_key


def store_from_config(config: dict[str, Any]) -> ObjectStore:
    """Rebuild a store from its ``config()``.

    Raises:
        StoreConfigError: The kind is not one this installation knows, or an option is
            missing, unknown or malformed (a ``ValueError`` too).
    """
    if not isinstance(config, dict):
        raise StoreConfigError(f"A store config is a {{kind, options}} object, not {type(config).__name__}.")
    kind = config.get("kind")
    try:
        options = dict(config.get("options") or {})
        if kind == "file":
            return LocalStore.from_config(options)
        if kind == "s3":
            from runtime._s3 import S3Store  # boto3 is imported only when S3 is used

            return S3Store.from_config(options)
    except StoreConfigError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        why = f"missing option {exc}" if isinstance(exc, KeyError) else str(exc)
        raise StoreConfigError(f"Cannot open the {kind!r} store: {why}") from None
    raise StoreConfigError(f"Unknown object store kind {str(kind)[:80]!r}; expected 'file' or 's3'.")


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

    Raises:
        StoreConfigError: The scheme is unknown, the bucket is missing or invalid, or an
            option is unknown or malformed (a ``ValueError`` too).
    """
    if not isinstance(url, str) or not url or "\x00" in url:
        raise StoreConfigError(
            f"Invalid store URL {str(url)[:80]!r}: use file:///path or s3://bucket/prefix."
        )
    parsed = urlparse(url)
    try:
        if parsed.scheme in ("", "file"):
            return LocalStore(unquote(parsed.path) if parsed.scheme else url)
        if parsed.scheme == "s3":
            from runtime._s3 import S3Store

            return S3Store.from_url(url)
    except StoreConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise StoreConfigError(f"Invalid store URL {url[:200]!r}: {exc}") from None
    raise StoreConfigError(f"Unsupported store URL {url[:200]!r}: use file:///path or s3://bucket/prefix.")
