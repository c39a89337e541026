"""LoRA adapters as model versions: specs, files and aliases in the store.

Layout under the store::

    registry/adapters/<name>/files/<sha256>.tar       the PEFT files (runtime.pack_adapter), commit-once
    registry/adapters/<name>/versions/<version>.json  AdapterSpec, commit-once
    registry/adapters/<name>/aliases/<alias>.json     {"version": "..."} (``latest`` by default)

A function names an adapter as ``chem`` (``chem@latest``), ``chem@<alias>`` or ``chem@3``.
Aliases are resolved when an invocation is submitted: :meth:`Adapters.snapshot` gives the
alias -> ``name@version`` map of a model version's adapters, which the invocation carries.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from registry._names import check_name
from runtime import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    SubmitError,
    UnknownAdapterError,
    adapter_config,
    pack_adapter,
    sha256_hex,
)

SNAPSHOT_SECONDS = 0.5
"""How long a model's alias snapshot is reused: an alias moved elsewhere is seen within this."""


class AdapterSpec(BaseModel):
    """A registered LoRA adapter version.

    Attributes:
        name: The adapter's name (``chem``).
        version: Version label (``"1"``, ``"2"``, ...).
        uri: Store key of its files (a tar of the PEFT directory).
        sha256: Digest of those bytes; a worker verifies it before the engine sees them.
        base_model: The model version it adapts (``name@version``).
        rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / r``).
        target_modules: The modules it adapts (from ``adapter_config.json``).
        created_at: Registration time (seconds since the epoch).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    uri: str
    sha256: str
    base_model: str
    rank: int = Field(gt=0)
    lora_alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


def _split(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    return name, version or "latest"


class Adapters:
    """The adapters registered in a store (``Registry.adapters``).

    Args:
        store: Where specs, files and aliases live.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._snapshots: dict[str, tuple[dict[str, str] | None, float, int]] = {}
        self._generation = 0  # bumped around every alias write made through this object

    def add(
        self,
        directory: str | Path,
        name: str,
        base_model: str,
        *,
        version: str | None = None,
        alias: str | None = "latest",
    ) -> AdapterSpec:
        """Upload a PEFT adapter directory as a new version of ``name`` (and point ``alias`` at it).

        Args:
            directory: Holds ``adapter_config.json`` and ``adapter_model.safetensors``.
            name: The adapter's name.
            base_model: The resolved model version it adapts (``name@version``).
            version: Its version label (default: one more than the highest numbered one).
            alias: Alias to point at it (None: none; pin it as ``name@version``).

        Raises:
            SubmitError: Not an adapter directory, an invalid name, or the version exists.
        """
        check_name(name, "adapter")
        if "@" not in base_model:
            raise SubmitError(f"base_model must be a model version (name@version), got {base_model!r}.")
        config = adapter_config(directory)
        blob = pack_adapter(directory)
        digest = sha256_hex(blob)
        key = f"registry/adapters/{name}/files/{digest}.tar"
        if not self.store.exists(key):
            with contextlib.suppress(ObjectExists):  # content-addressed: same bytes
                self.store.put(key, blob, if_absent=True)
        targets = config.get("target_modules") or []
        spec = AdapterSpec(
            name=name,
            version=version or str(self._next_version(name)),
            uri=key,
            sha256=digest,
            base_model=base_model,
            rank=int(config["r"]),
            lora_alpha=float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None,
            target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        )
        try:
            self.store.put(
                f"registry/adapters/{name}/versions/{spec.version}.json",
                spec.model_dump_json().encode(),
                if_absent=True,
            )
        except ObjectExists:
            raise SubmitError(f"Adapter {spec.ref} is registered already; versions never change.") from None
        if alias:
            self.set_alias(name, alias, spec.version)
        return spec

    def _next_version(self, name: str) -> int:
        found = [
            key.rsplit("/", 1)[-1].removesuffix(".json")
            for key in self.store.list(f"registry/adapters/{name}/versions/")
        ]
        return max((int(v) for v in found if v.isdigit()), default=0) + 1

    def get(self, ref: str) -> AdapterSpec:
        """Resolve ``name``, ``name@alias`` or ``name@version``.

        Raises:
            UnknownAdapterError: No such adapter, alias or version.
        """
        name, version = _split(ref)
        pointer = self._json(f"registry/adapters/{name}/aliases/{version}.json")
        resolved = str(pointer["version"]) if pointer else version
        data = self._json(f"registry/adapters/{name}/versions/{resolved}.json")
        if data is None:
            known = ", ".join(sorted({s.name for s, _ in self.versions()})) or "none"
            raise UnknownAdapterError(f"Unknown adapter {ref!r}; the registered adapters are: {known}.")
        return AdapterSpec.model_validate(data)

    def set_alias(self, name: str, alias: str, version: str) -> AdapterSpec:
        """Point ``name@alias`` at ``version`` (the registry only; see ``Pool.move_adapter_alias``)."""
        if alias.isdigit():
            raise SubmitError(f"An alias cannot be a number ({alias!r}): numbers name versions.")
        spec = self.get(f"{name}@{version}")
        data = json.dumps({"version": spec.version}, sort_keys=True).encode()
        with self._lock:
            self._generation += 1  # snapshots taken before the write are not reused after it
        self.store.put(f"registry/adapters/{name}/aliases/{alias}.json", data)
        with self._lock:
            self._generation += 1  # nor those that raced with it
            self._snapshots.clear()
        return spec

    def versions(self) -> list[tuple[AdapterSpec, list[str]]]:
        """Every adapter version with the aliases naming it (sorted by name, then version)."""
        specs: dict[tuple[str, str], AdapterSpec] = {}
        aliases: dict[tuple[str, str], list[str]] = {}
        for key in self.store.list("registry/adapters/"):
            parts = key.split("/")
            if len(parts) != 5 or not parts[4].endswith(".json"):
                continue
            data = self._json(key)
            if data is None:
                continue
            leaf = parts[4].removesuffix(".json")
            if parts[3] == "versions":
                spec = AdapterSpec.model_validate(data)
                specs[(spec.name, spec.version)] = spec
            elif parts[3] == "aliases":
                aliases.setdefault((parts[2], str(data.get("version"))), []).append(leaf)

        def order(k: tuple[str, str]) -> tuple[str, int, str]:
            return (k[0], int(k[1]) if k[1].isdigit() else 1 << 30, k[1])

        return [(specs[k], sorted(aliases.get(k, []))) for k in sorted(specs, key=order)]

    def snapshot(self, model_ref: str) -> dict[str, str] | None:
        """Alias -> ``name@version`` of the adapters of model version ``model_ref``, as they stand now.

        ``latest`` appears as the bare name (``{"chem": "chem@2", "chem@stable": "chem@1"}``).
        None when the model has no adapters. Reused for ``SNAPSHOT_SECONDS``; an alias moved
        through this object is seen at once.
        """
        now = time.monotonic()
        with self._lock:
            generation = self._generation
            hit = self._snapshots.get(model_ref)
            if hit is not None and now - hit[1] < SNAPSHOT_SECONDS and hit[2] == generation:
                return dict(hit[0]) if hit[0] is not None else None
        found: dict[str, str] = {}
        for spec, names in self.versions():
            if spec.base_model == model_ref:
                for alias in names:
                    found[spec.name if alias == "latest" else f"{spec.name}@{alias}"] = spec.ref
        result = found or None
        with self._lock:
            if self._generation == generation:
                self._snapshots[model_ref] = (result, now, generation)
        return dict(result) if result is not None else None

    def _json(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.store.get(key)))
        except ObjectNotFound:
            return None
