"""The registry: functions and models stored as objects in an ObjectStore.

Layout under the store::

    registry/artifacts/<digest>                       pickled function (serde format)
    registry/functions/<name>/versions/<000001>.json  FunctionSpec, written commit-once
    registry/functions/<name>/aliases/<alias>.json    {"version": n}
    registry/digests/<digest>.json                    FunctionSpec of the first version with it
    registry/models/<name>/versions/<version>.json    ModelSpec
    registry/models/<name>/aliases/<alias>.json       {"version": "..."}
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from registry._adapters import Adapters
from registry._names import check_name as _check_name
from registry._specs import BUILTIN_MODELS, FunctionSpec, ModelSpec
from runtime import (
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    SubmitError,
    UnknownFunctionError,
    UnknownModelError,
    restore_function,
)
from runtime import digest_of as serde_digest_of
from runtime import loads as serde_loads


def split_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name@version`` into ``(name, version)``; version is None without ``@``."""
    name, _, version = ref.partition("@")
    return name, (version or None) if "@" in ref else None


class Registry:
    """Functions and models registered in an ObjectStore.

    Any process pointed at the same store sees the same registry. Function
    artifacts are verified against their digest before they are unpickled.

    Args:
        store: Where specs and artifacts live.
        builtin_models: Models known without registration (the tiny Llama).
        cache_size: How many loaded functions to keep in memory.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        builtin_models: dict[str, ModelSpec] | None = None,
        cache_size: int = 256,
    ) -> None:
        self.store = store
        self._builtin = dict(BUILTIN_MODELS if builtin_models is None else builtin_models)
        self._functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.adapters = Adapters(store)  # LoRA adapter versions and their aliases

    # -- functions ---------------------------------------------------------
    def register_function(self, artifact: bytes, spec: FunctionSpec) -> FunctionSpec:
        """Store a function artifact and a new version of its spec.

        Registering the same artifact digest as the latest version again
        returns that version instead of making a new one.

        Args:
            artifact: Bytes from ``runtime.dumps(fn)``.
            spec: The spec; ``version`` is assigned here and ``digest`` must match.

        Returns:
            The stored spec with its version.
        """
        _check_name(spec.name, "function")
        digest = serde_digest_of(artifact)
        if digest != spec.digest:
            raise SubmitError(f"Spec digest {spec.digest[:12]} does not match the artifact's {digest[:12]}.")
        try:
            latest = self.get_function(spec.name)
        except UnknownFunctionError:
            latest = None
        if latest is not None and latest.digest == digest and _same_options(latest, spec):
            return latest
        artifact_key = f"registry/artifacts/{digest}"
        if not self.store.exists(artifact_key):
            # Content-addressed: if another process won the race it wrote the same bytes.
            with contextlib.suppress(ObjectExists):
                self.store.put(artifact_key, artifact, if_absent=True)
        version = latest.version if latest else 0
        while True:
            version += 1
            stored = spec.model_copy(update={"version": version})
            try:
                self.store.put(
                    f"registry/functions/{spec.name}/versions/{version:06d}.json",
                    stored.model_dump_json().encode(),
                    if_absent=True,
                )
                break
            except ObjectExists:
                continue  # another process registered this version number first
        # The digest record before the alias: whoever finds this version through ``latest``
        # (a concurrent registration of the same artifact returns it early) can resolve it.
        digest_key = f"registry/digests/{digest}.json"
        if not self.store.exists(digest_key):
            self._put_json(digest_key, stored.model_dump(mode="json"))
        self._put_json(f"registry/functions/{spec.name}/aliases/latest.json", {"version": version})
        return stored

    def get_function(self, ref: str) -> FunctionSpec:
        """Resolve ``name``, ``name@latest``, ``name@3`` or a digest to a spec.

        Raises:
            UnknownFunctionError: Nothing is registered under ``ref``.
        """
        name, version = split_ref(ref)
        if version is None and re.fullmatch(r"[0-9a-f]{64}", name):
            data = self._get_json(f"registry/digests/{name}.json")
            if data is None:
                raise UnknownFunctionError(f"No function is registered with digest {name[:12]}....")
            return FunctionSpec.model_validate(data)
        if version is None or not version.isdigit():
            alias = version or "latest"
            pointer = self._get_json(f"registry/functions/{name}/aliases/{alias}.json")
            if pointer is None:
                raise UnknownFunctionError(f"No function {name!r} (alias {alias!r}) is registered.")
            version = str(pointer["version"])
        data = self._get_json(f"registry/functions/{name}/versions/{int(version):06d}.json")
        if data is None:
            raise UnknownFunctionError(f"Function {name!r} has no version {version}.")
        return FunctionSpec.model_validate(data)

    def list_functions(self) -> list[FunctionSpec]:
        """The latest version of every registered function."""
        names = sorted(
            {key.split("/")[2] for key in self.store.list("registry/functions/") if key.count("/") >= 3}
        )
        return [self.get_function(n) for n in names]

    def load_function(self, digest: str) -> Callable[..., Any]:
        """Fetch, verify and unpickle a function artifact by digest (cached).

        Raises:
            UnknownFunctionError: No artifact has that digest.
            IntegrityError: The stored bytes do not match the digest.
        """
        with self._lock:
            fn = self._functions.get(digest)
            if fn is not None:
                self._functions.move_to_end(digest)
                return fn
        try:
            blob = self.store.get(f"registry/artifacts/{digest}")
        except ObjectNotFound:
            raise UnknownFunctionError(
                f"No function artifact with digest {digest[:12]}... is stored."
            ) from None
        loaded = serde_loads(blob, expected_digest=digest, what=f"function artifact {digest[:12]}")
        fn = cast("Callable[..., Any]", restore_function(loaded))
        with self._lock:
            self._functions[digest] = fn
            while len(self._functions) > self._cache_size:
                self._functions.popitem(last=False)
        return fn

    # -- models ------------------------------------------------------------
    def register_model(self, spec: ModelSpec, *, alias: str | None = "latest") -> ModelSpec:
        """Store a model version and (by default) point ``latest`` at it."""
        _check_name(spec.name, "model")
        self._put_json(
            f"registry/models/{spec.name}/versions/{spec.version}.json", spec.model_dump(mode="json")
        )
        if alias:
            self.set_model_alias(spec.name, alias, spec.version)
        return spec

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``name@alias`` at ``version``."""
        self.get_model(f"{name}@{version}")
        self._put_json(f"registry/models/{name}/aliases/{alias}.json", {"version": version})

    def get_model(self, ref: str) -> ModelSpec:
        """Resolve ``name``, ``name@alias`` or ``name@version`` to a model spec.

        Raises:
            UnknownModelError: No such model or version, naming the known models.
        """
        name, version = split_ref(ref)
        pointer = self._get_json(f"registry/models/{name}/aliases/{version or 'latest'}.json")
        resolved = str(pointer["version"]) if pointer else version
        if resolved is not None:
            data = self._get_json(f"registry/models/{name}/versions/{resolved}.json")
            if data is not None:
                return ModelSpec.model_validate(data)
        builtin = self._builtin.get(name)
        if builtin is not None and (version in (None, "latest", builtin.version)):
            return builtin
        known = ", ".join(sorted({m.name for m in self.list_models()})) or "none"
        raise UnknownModelError(f"Unknown model {ref!r}; the registered models are: {known}.")

    def list_models(self) -> list[ModelSpec]:
        """The latest version of every model, built-in ones included."""
        names = {key.split("/")[2] for key in self.store.list("registry/models/") if key.count("/") >= 3}
        specs = {n: self._builtin[n] for n in self._builtin}
        for n in names:
            try:
                specs[n] = self.get_model(n)
            except UnknownModelError:
                continue
        return [specs[n] for n in sorted(specs)]

    def model_versions(self) -> list[tuple[ModelSpec, list[str]]]:
        """Every model version, built-in ones included, with the aliases naming it (sorted by ref)."""
        found: dict[str, tuple[ModelSpec, list[str]]] = {}
        pointers: list[tuple[str, str, str]] = []  # (name, alias, version)
        for key in self.store.list("registry/models/"):
            parts = key.split("/")
            if len(parts) != 5 or not parts[4].endswith(".json"):
                continue
            name, what, leaf = parts[2], parts[3], parts[4].removesuffix(".json")
            data = self._get_json(key)
            if data is None:
                continue
            if what == "versions":
                spec = ModelSpec.model_validate(data)
                found[spec.ref] = (spec, [])
            elif what == "aliases":
                pointers.append((name, leaf, str(data.get("version"))))
        for spec in self._builtin.values():
            if spec.ref not in found:
                named = any(n == spec.name and a == "latest" for n, a, _ in pointers)
                found[spec.ref] = (spec, [] if named else ["latest"])
        for name, alias, version in pointers:
            hit = found.get(f"{name}@{version}")
            if hit is not None:
                hit[1].append(alias)
        return [(spec, sorted(aliases)) for spec, aliases in (found[ref] for ref in sorted(found))]

    # -- helpers -----------------------------------------------------------
    def _put_json(self, key: str, data: dict[str, Any]) -> None:
        self.store.put(key, json.dumps(data, sort_keys=True).encode())

    def _get_json(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.store.get(key)))
        except ObjectNotFound:
            return None


def _same_options(a: FunctionSpec, b: FunctionSpec) -> bool:
    keys = ("model", "model_param", "model_param_index", "timeout", "retries", "priority")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
