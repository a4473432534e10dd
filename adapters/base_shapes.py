"""The base model's layer count and projection sizes, to refuse adapters that cannot fit it.

An adapter for another model size (hidden 512 against a 256 model, more layers than the base) passes
every format check and then fails to load on every request (502 ``adapter_load_failed``). The
gateway checks its shapes at registration against the base model's ``config.json`` instead of
loading it once on a worker: the check is exact for the Llama family vLLM serves (Llama, Mistral,
Qwen2/3, Gemma, ...), costs no worker slot or load time, and works when no worker is up yet
(registration before ``loragate up``'s workers are ready, or a fleet that is scaling).
Modules outside the table below (another architecture's names) are checked for their layer only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loragate.errors import Unprocessable

CONFIG_NAME = "config.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class BaseModelShapes:
    """What an adapter's LoRA pairs must match: (in_features, out_features) per projection name."""

    source: str
    layers: int
    projections: Mapping[str, tuple[int, int]]

    @classmethod
    def read(cls, path: Path) -> BaseModelShapes:
        """From a model dir (its ``config.json``) or the file itself; a bad file stops startup."""
        file = path / CONFIG_NAME if path.is_dir() else path
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"base_model_config: cannot read {file}: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"base_model_config: {file} must hold a JSON object")
        try:
            return cls.from_config(config, str(file))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"base_model_config: {file} lacks the sizes of a decoder model ({exc!r})") from exc

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> BaseModelShapes:
        """Pure: HF config keys -> the shapes of each projection (multimodal configs: their text_config)."""
        text = config.get("text_config") if "hidden_size" not in config else config
        if not isinstance(text, Mapping):
            raise KeyError("hidden_size")
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        intermediate = int(text["intermediate_size"])
        q, kv = heads * head_dim, kv_heads * head_dim
        return cls(source=source, layers=int(text["num_hidden_layers"]), projections={
            "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        })

    def mismatches(self, module_dims: Iterable[tuple[str, int, int]]) -> list[str]:
        """Each LoRA pair that does not fit, in words; empty when the adapter fits this base."""
        problems = []
        for module, in_features, out_features in module_dims:
            layer = _LAYER.search(module)
            if layer is not None and int(layer[1]) >= self.layers:
                problems.append(f"{module}: layer {layer[1]} does not exist (the base model has {self.layers} "
                                "layers)")
                continue
            expected = self.projections.get(module.rsplit(".", 1)[-1])
            if expected is not None and expected != (in_features, out_features):
                problems.append(f"{module}: LoRA maps {in_features} -> {out_features} features, the base "
                                f"model's {module.rsplit('.', 1)[-1]} maps {expected[0]} -> {expected[1]}")
        return problems

    def check(self, module_dims: Iterable[tuple[str, int, int]]) -> None:
        """422 naming the first mismatches (and how many there are)."""
        problems = self.mismatches(module_dims)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise Unprocessable(f"adapter does not fit the base model ({self.source}): {'; '.join(problems[:3])}"
                                f"{more}", param="path", code="base_shape_mismatch")
