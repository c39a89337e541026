"""LoRA adapters as model versions, on the worker's side.

An adapter version is one object in the store: a tar of its PEFT directory
(``adapter_config.json``, ``adapter_model.safetensors``), named by its sha256. A
worker fetches it into a node-local directory (``$FAAS_CACHE_DIR/adapters/<sha256>``),
verifying the digest first, and asks its engine to load it from there under a name
made of the version and the digest (``chem@1-<sha256[:12]>``), so two stores' ``chem@1``
never collide on one engine. SGLang and the CPU engine load it the same way
(``/load_lora_adapter``) and take it per request as ``lora_path``.

The function names an adapter as ``"chem"`` (its ``latest`` alias), ``"chem@stable"``
(another alias) or ``"chem@3"`` (pinned). Aliases are resolved from the snapshot taken
when the invocation was submitted (``Invocation.adapters``), so an alias moved while it
runs does not change what it runs on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from runtime._errors import EngineError, EngineRejectedError, IntegrityError, SubmitError
from runtime._paths import cache_dir
from runtime._store import ObjectStore

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files of a PEFT LoRA adapter directory that are stored (others are ignored)."""


def pack_adapter(directory: str | Path) -> bytes:
    """A deterministic tar of an adapter directory's PEFT files (same files, same bytes).

    Raises:
        SubmitError: A file is missing, or the config has no positive rank ``r``.
    """
    root = Path(directory)
    adapter_config(root)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ADAPTER_FILES:
            data = (root / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (checked: both files exist, ``r`` is positive).

    Raises:
        SubmitError: It is not a PEFT LoRA directory.
    """
    root = Path(directory)
    missing = [n for n in ADAPTER_FILES if not (root / n).is_file()]
    if missing:
        raise SubmitError(
            f"{str(root)!r} is not a PEFT LoRA adapter directory: missing {', '.join(missing)}."
        )
    try:
        config = dict(json.loads((root / "adapter_config.json").read_text()))
    except ValueError as exc:
        raise SubmitError(f"{root / 'adapter_config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise SubmitError(f"{root / 'adapter_config.json'} has no positive integer rank 'r'.")
    return config


def fetch_adapter(store: ObjectStore, key: str, sha256: str, root: Path | None = None) -> Path:
    """The adapter's node-local directory, fetched from ``store`` and verified once per node.

    Raises:
        IntegrityError: The stored bytes do not match ``sha256``.
        ObjectNotFound: Nothing is stored at ``key``.
    """
    base = root or Path(os.environ.get("FAAS_ADAPTER_DIR") or cache_dir() / "adapters")
    target = base / sha256
    if (target / ADAPTER_FILES[1]).is_file():
        return target
    blob = store.get(key)
    actual = hashlib.sha256(blob).hexdigest()
    if actual != sha256:
        raise IntegrityError(
            f"The adapter stored at {key!r} has sha256 {actual[:12]}..., not the registered {sha256[:12]}...."
        )
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=base))
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for name in ADAPTER_FILES:
            member = tar.extractfile(name)
            if member is None:
                raise IntegrityError(f"The adapter stored at {key!r} lacks {name}.")
            (tmp / name).write_bytes(member.read())
    try:
        tmp.rename(target)  # atomic; another worker may have won the race with the same bytes
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version, ready for an engine on this node.

    Attributes:
        ref: ``name@version``.
        sha256: Digest of its stored tar.
        path: Its node-local directory.
    """

    ref: str
    sha256: str
    path: str

    @property
    def engine_name(self) -> str:
        """The name the engine knows it by (``lora_name``, then ``lora_path`` per request)."""
        return f"{self.ref}-{self.sha256[:12]}"


def call_fields(ref: AdapterRef | None) -> dict[str, Any]:
    """The adapter fields of an engine call's record (provenance): version and digest."""
    return {} if ref is None else {"adapter": ref.ref, "adapter_sha256": ref.sha256}


AdapterResolver = Callable[[str], AdapterRef]
"""Resolves what a function passes as ``adapter=`` (``chem``, ``chem@stable``, ``chem@3``)."""


class EngineAdapters:
    """The adapters this worker has loaded on one engine (shared by a handle and its clones)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: set[str] = set()

    def use(
        self, resolver: AdapterResolver | None, adapter: str, client: httpx.Client, model: str
    ) -> AdapterRef:
        """Resolve ``adapter`` and make sure the engine has it loaded.

        Raises:
            SubmitError: The invocation has no adapters (or ``adapter`` is not a string).
            UnknownAdapterError: No such adapter or version for this model.
            EngineRejectedError: The engine refused to load it.
        """
        if not isinstance(adapter, str) or not adapter:
            raise SubmitError(f"adapter must be an adapter name such as 'chem' or 'chem@3', got {adapter!r}.")
        if resolver is None:
            raise SubmitError(f"This handle on {model!r} cannot resolve adapters (no registry).")
        ref = resolver(adapter)
        with self._lock:
            if ref.engine_name in self._loaded:
                return ref
        self.load(ref, client, model)
        return ref

    def load(self, ref: AdapterRef, client: httpx.Client, model: str) -> None:
        """``POST /load_lora_adapter`` (an adapter the engine has already is fine)."""
        body = {"lora_name": ref.engine_name, "lora_path": ref.path}
        try:
            response = client.post("/load_lora_adapter", json=body, timeout=300.0)
        except httpx.TransportError as exc:
            raise EngineError(f"The engine for model {model!r} is unreachable: {exc}") from exc
        if response.status_code >= 400 and "already" not in response.text:
            raise EngineRejectedError(
                f"The engine for model {model!r} refused to load adapter {ref.ref}: "
                f"HTTP {response.status_code}: {response.text[:300]}"
            )
        with self._lock:
            self._loaded.add(ref.engine_name)

    def missing(self, ref: AdapterRef, response: httpx.Response, client: httpx.Client, model: str) -> bool:
        """After a 400 that says the engine lacks the adapter (restarted, unloaded): load it again."""
        if response.status_code != 400 or "lora" not in response.text.lower():
            return False
        with self._lock:
            self._loaded.discard(ref.engine_name)
        self.load(ref, client, model)
        return True
