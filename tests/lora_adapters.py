"""Random (seeded) PEFT LoRA adapters for the tiny Llama, for tests (no peft needed)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def write_adapter(
    out: Path,
    model_path: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    scale: float = 0.5,
    targets: tuple[str, ...] = TINY_TARGETS,
) -> Path:
    """Write a PEFT-format LoRA adapter for the model at ``model_path`` into ``out``.

    The weights are random from ``seed``, large enough (``scale``) to change greedy output.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_path / "config.json").read_text())
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }  # fmt: skip
    where = {t: "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn" for t in shapes}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for t in targets:
            d_in, d_out = shapes[t]
            key = f"base_model.model.model.layers.{layer}.{where[t]}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    (out / "adapter_config.json").write_text(json.dumps(peft, sort_keys=True))
    return out
