"""Writing small PEFT-format LoRA directories with numpy, for tests of validation and storage.

These are real adapter_config.json + safetensors files (the format vLLM reads), only with random
numbers and no torch, so unit tests stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file


def write_lora(directory: Path, *, rank: int = 8, alpha: int = 16, base: str = "tiny-llama",
               targets: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2, hidden: int = 128,
               seed: int = 0, config_overrides: dict[str, Any] | None = None,
               tensors: dict[str, np.ndarray] | None = None, prefix: str = "base_model.model.",
               in_dim: int | None = None, out_dim: int | None = None) -> Path:
    """A PEFT dir with random A (rank x in_dim) and B (out_dim x rank) per target module per layer."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
        "base_model_name_or_path": base, "task_type": "CAUSAL_LM", "use_rslora": False, "bias": "none",
    }
    config.update(config_overrides or {})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        rng = np.random.default_rng(seed)
        tensors = {}
        for layer in range(layers):
            for module in targets:
                path = f"{prefix}model.layers.{layer}.self_attn.{module}"
                tensors[f"{path}.lora_A.weight"] = rng.standard_normal((rank, in_dim or hidden)).astype(np.float32)
                tensors[f"{path}.lora_B.weight"] = rng.standard_normal((out_dim or hidden, rank)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory
