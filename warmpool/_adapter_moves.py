"""Moving a LoRA adapter alias on a live pool: load, move, drain, unload.

1. **Load** the new version on every ready replica of its base model
   (``/load_lora_adapter``, SGLang's route, which the CPU engine serves too), so the first
   invocation that resolves the alias to it does not pay for the load.
2. **Move** the alias in the registry: invocations submitted from now on resolve it to the
   new version (``Invocation.adapters`` is their snapshot of the aliases).
3. **Drain**: wait until no unfinished invocation of the base model resolved the alias to
   the old version; they keep running on it meanwhile.
4. **Unload** the old version from those replicas, unless another alias still names it (an
   invocation pinned to it later makes the engine load it again).

Moving the alias back is the rollback, the same four steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from registry import Registry
from runtime import AdapterRef, EngineError, Invocation, UnknownAdapterError, fetch_adapter
from warmpool._replica import Replica, ReplicaState


class AdapterPool(Protocol):
    """What a move needs of a pool: its replicas and its unfinished invocations."""

    def replicas(self, model: str | None = None) -> list[Replica]: ...  # pragma: no cover

    def unfinished_invocations(self, model: str) -> list[Invocation]: ...  # pragma: no cover


@dataclass
class AdapterMove:
    """What a move did.

    Attributes:
        alias: ``name@alias``.
        old: The version it named before (None: none).
        new: The version it names now.
        loaded_on: Engine URLs the new version was loaded on.
        drained: Invocations on the old version waited for.
        drain_seconds: How long the drain took.
        unloaded_from: Engine URLs the old version was unloaded from.
    """

    alias: str
    old: str | None
    new: str
    loaded_on: list[str] = field(default_factory=list)
    drained: int = 0
    drain_seconds: float = 0.0
    unloaded_from: list[str] = field(default_factory=list)


def _post(url: str, path: str, body: dict[str, str]) -> None:
    try:
        response = httpx.post(url + path, json=body, timeout=300.0)
    except httpx.HTTPError as exc:
        raise EngineError(f"The engine at {url} is unreachable ({path}): {exc}") from exc
    if response.status_code >= 400 and "already" not in response.text:
        raise EngineError(
            f"The engine at {url} refused {path}: HTTP {response.status_code}: {response.text[:300]}"
        )


def move_adapter_alias(
    registry: Registry,
    pool: AdapterPool,
    name: str,
    version: str,
    alias: str = "latest",
    *,
    timeout: float = 600.0,
    poll: float = 0.05,
) -> AdapterMove:
    """Point ``name@alias`` at ``version`` on a live pool: load, move, drain, unload.

    Raises:
        UnknownAdapterError: No such adapter version.
        EngineError: A replica refused to load the new version.
        TimeoutError: Invocations on the old version did not finish within ``timeout``
            (the alias has moved; the old version stays loaded).
    """
    new = registry.adapters.get(f"{name}@{version}")
    try:
        old = registry.adapters.get(f"{name}@{alias}")
    except UnknownAdapterError:
        old = None
    move = AdapterMove(alias=f"{name}@{alias}", old=old.ref if old else None, new=new.ref)
    base = new.base_model
    urls = [r.url for r in pool.replicas(base) if r.state is ReplicaState.READY and r.url]
    if urls:
        ref = AdapterRef(new.ref, new.sha256, str(fetch_adapter(registry.store, new.uri, new.sha256)))
        for url in urls:
            _post(url, "/load_lora_adapter", {"lora_name": ref.engine_name, "lora_path": ref.path})
            move.loaded_on.append(url)
    registry.adapters.set_alias(name, alias, new.version)
    if old is None or old.ref == new.ref:
        return move
    key = name if alias == "latest" else f"{name}@{alias}"
    started = time.monotonic()

    def on_old() -> list[str]:
        return [i.id for i in pool.unfinished_invocations(base) if (i.adapters or {}).get(key) == old.ref]

    waiting = on_old()
    move.drained = len(waiting)
    while waiting:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{len(waiting)} invocations still run on {old.ref} after {timeout} s.")
        time.sleep(poll)
        waiting = on_old()
    move.drain_seconds = time.monotonic() - started
    if old.ref in (registry.adapters.snapshot(base) or {}).values():
        return move  # another alias still names it
    old_name = AdapterRef(old.ref, old.sha256, "").engine_name
    for replica in pool.replicas(base):
        if replica.state is ReplicaState.READY and replica.url:
            _post(replica.url, "/unload_lora_adapter", {"lora_name": old_name})
            move.unloaded_from.append(replica.url)
    return move
