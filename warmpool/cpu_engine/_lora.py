"""LoRA adapters inside the CPU engine's batch: every row with its own adapter.

In the manner of S-LoRA and Punica: the engine holds up to ``max_loras`` adapters *resident*
in fixed slots, their ``A`` and ``B`` matrices stacked per target module (``[slots, in, rank]``
and ``[slots, rank, out]``, ranks zero-padded to ``max_lora_rank``, ``B`` pre-multiplied by the
adapter's scaling). A forward hook on each target ``Linear`` adds, for every row that names an
adapter, ``(x @ A[slot]) @ B[slot]``: one batched gather-matmul over those rows; rows with no
adapter add nothing, and a forward with no adapter row returns at once.

Adapters are *registered* by name (``/load_lora_adapter``, as SGLang's: a PEFT directory with
``adapter_config.json`` and ``adapter_model.safetensors``) and loaded into a slot on demand,
when a request naming one is admitted. A full set of slots evicts the least recently used
adapter that no running row uses; a request whose adapter finds no free slot waits in the
queue. A request for an evicted adapter reloads it from its directory.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from warmpool.cpu_engine._requests import GenRequest

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Llama-family Linear modules an adapter may target."""

_PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter cannot be registered or loaded (the message says why)."""


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter read from disk: per module name, ``A^T [in, r]`` and ``scaling * B^T [r, out]``."""

    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(path: str | Path, modules: dict[str, torch.nn.Linear], max_rank: int) -> AdapterFiles:
    """Read and check a PEFT LoRA directory against the model's target modules.

    Raises:
        LoraError: Missing files, a rank above ``max_rank``, an unknown module or a shape mismatch.
    """
    from safetensors.torch import load_file

    root = Path(path)
    try:
        config = json.loads((root / "adapter_config.json").read_text())
        tensors = load_file(str(root / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise LoraError(f"cannot read a LoRA adapter at {str(root)!r}: {exc}") from None
    rank = int(config.get("r", 0))
    if not 0 < rank <= max_rank:
        raise LoraError(f"adapter rank {rank} is outside 1..{max_rank} (--max-lora-rank)")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(_PEFT_PREFIX)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        module = modules.get(name)
        if module is None or b is None:
            raise LoraError(f"adapter weight {key!r} names no target module of this model (or lacks lora_B)")
        if tuple(a.shape) != (rank, module.in_features) or tuple(b.shape) != (module.out_features, rank):
            raise LoraError(f"adapter weights of {name!r} have shapes {list(a.shape)}, {list(b.shape)}")
        dtype = module.weight.dtype
        weights[name] = (a.t().to(dtype).contiguous(), (b.t() * scaling).to(dtype).contiguous())
    if not weights:
        raise LoraError(f"the adapter at {str(root)!r} has no lora_A/lora_B weights")
    return AdapterFiles(rank, weights)


class Loras:
    """Registered adapters, the resident slots (LRU) and the per-forward plan of the batch.

    Args:
        model: The HF model; hooks go on its target ``Linear`` modules.
        max_loras: Resident adapters at once (slots); 0 disables LoRA.
        max_rank: Largest adapter rank (slots are padded to it).
    """

    def __init__(self, model: Any, *, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.modules: dict[str, torch.nn.Linear] = {
            name: mod
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
        }
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}  # registered: name -> directory
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self._free = list(range(max_loras))[::-1]
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stats = {"lora_loads_total": 0, "lora_reloads_total": 0, "lora_evictions_total": 0}
        self._ever: set[str] = set()
        if max_loras > 0:
            for name, mod in self.modules.items():
                mod.register_forward_hook(self._hook(name))

    # ---- registration (HTTP threads) ---------------------------------------------------

    def register(self, name: str, path: str) -> None:
        """Register ``name`` (checked by reading it once); the same name and path again is a no-op.

        Raises:
            LoraError: LoRA is off, the name is taken by another path, or the adapter is unusable.
        """
        if self.max_loras <= 0:
            raise LoraError("LoRA is not enabled on this engine (--max-loras 0)")
        with self._lock:
            known = self._paths.get(name)
        if known is not None:
            if known != str(path):
                raise LoraError(f"a LoRA adapter named {name!r} is already loaded from {known!r}")
            return
        read_adapter(path, self.modules, self.max_rank)
        with self._lock:
            self._paths[name] = str(path)

    def unregister(self, name: str) -> None:
        """Forget ``name``; its slot is freed once no running row uses it.

        Raises:
            LoraError: No adapter has that name.
        """
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise LoraError(f"no LoRA adapter named {name!r} is loaded")

    def known(self, name: str) -> bool:
        """Whether ``name`` is registered (or still resident for the rows that use it)."""
        with self._lock:
            return name in self._paths or name in self._resident

    def info(self) -> dict[str, Any]:
        """For ``/server_info``: bounds, registered and resident adapters, counters."""
        with self._lock:
            return {
                "max_loras": self.max_loras,
                "max_lora_rank": self.max_rank,
                "loaded_adapters": dict(sorted(self._paths.items())),
                "resident": list(self._resident),
                **self._stats,
            }

    # ---- the scheduler thread ----------------------------------------------------------

    def admit(
        self, reqs: list[GenRequest], running: set[str]
    ) -> tuple[list[GenRequest], list[GenRequest], list[tuple[GenRequest, str]]]:
        """Make resident the adapters of requests about to join the batch.

        Args:
            reqs: The requests to admit, in order.
            running: Adapters the running rows use (never evicted).

        Returns:
            ``(admitted, deferred, failed)``: deferred ones found no free slot (they wait);
            failed ones name an adapter that is gone or unreadable, with why.
        """
        in_use = set(running)
        admitted: list[GenRequest] = []
        deferred: list[GenRequest] = []
        failed: list[tuple[GenRequest, str]] = []
        for req in reqs:
            name = req.lora
            if name is None:
                admitted.append(req)
                continue
            with self._lock:
                if name in self._resident:
                    self._resident.move_to_end(name)
                    in_use.add(name)
                    admitted.append(req)
                    continue
                path = self._paths.get(name)
            if path is None:
                failed.append((req, f"LoRA adapter {name!r} is not loaded"))
                continue
            slot = self._slot(in_use)
            if slot is None:
                deferred.append(req)
                continue
            try:
                files = read_adapter(path, self.modules, self.max_rank)
            except LoraError as exc:
                with self._lock:
                    self._free.append(slot)
                failed.append((req, str(exc)))
                continue
            self._fill(slot, files)
            with self._lock:
                self._resident[name] = slot
                self._stats["lora_loads_total"] += 1
                self._stats["lora_reloads_total"] += name in self._ever
                self._ever.add(name)
            in_use.add(name)
            admitted.append(req)
        return admitted, deferred, failed

    def _slot(self, in_use: set[str]) -> int | None:
        """A free slot, evicting the least recently used adapter no running row uses; None if none."""
        with self._lock:
            for name in list(self._resident):  # unregistered ones first
                if name not in self._paths and name not in in_use:
                    self._free.append(self._resident.pop(name))
            if self._free:
                return self._free.pop()
            for name in self._resident:
                if name not in in_use:
                    self._stats["lora_evictions_total"] += 1
                    return self._resident.pop(name)
        return None

    def _fill(self, slot: int, files: AdapterFiles) -> None:
        for name, mod in self.modules.items():
            pair = files.weights.get(name)
            if name not in self._a:
                if pair is None:
                    continue
                dev, dtype = mod.weight.device, mod.weight.dtype
                self._a[name] = torch.zeros(
                    self.max_loras, mod.in_features, self.max_rank, dtype=dtype, device=dev
                )
                self._b[name] = torch.zeros(
                    self.max_loras, self.max_rank, mod.out_features, dtype=dtype, device=dev
                )
            a, b = self._a[name], self._b[name]
            a[slot].zero_()
            b[slot].zero_()
            if pair is not None:
                a[slot, :, : files.rank] = pair[0].to(a.device)
                b[slot, : files.rank, :] = pair[1].to(b.device)

    def begin(self, adapters: list[str | None]) -> None:
        """Set the plan of the next forward: the adapter of each batch row (None: the base model)."""
        rows = [i for i, name in enumerate(adapters) if name is not None]
        if not rows:
            self._plan = None
            return
        with self._lock:
            slots = [self._resident[adapters[i]] for i in rows]  # type: ignore[index]
        device = next(iter(self.modules.values())).weight.device
        self._plan = (torch.tensor(rows, device=device), torch.tensor(slots, device=device))

    def end(self) -> None:
        """Clear the plan after the forward."""
        self._plan = None

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            a = self._a.get(name)
            if plan is None or a is None:
                return None
            rows, slots = plan
            x = args[0].index_select(0, rows)  # [k, T, in]
            delta = torch.bmm(torch.bmm(x, a.index_select(0, slots)), self._b[name].index_select(0, slots))
            return output.index_add(0, rows, delta.to(output.dtype))

        return hook
