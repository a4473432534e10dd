"""Keep base-model tokens free of LoRA deltas on vLLM's CPU backend.

vLLM marks a token that uses no adapter with LoRA index ``-1``. The Triton kernels (GPU) skip
such tokens; the pure-PyTorch ops the CPU backend runs (``vllm.lora.ops.torch_ops``) instead
gather ``weights[-1]``, the *last* adapter slot. So whenever the last slot holds an adapter, a
base-model request batched next to any LoRA request gets that adapter's delta: silently wrong
answers, no error. Measured here on the two-hop kit with ``--max-loras 1`` and one adapter loaded:
base requests answered 0/24 hop-1 questions alone and 10/24 when batched next to the adapter's
requests, i.e. with the adapter's knowledge. Upstream fix proposed in vllm-project/vllm#48421.

:func:`register` is a ``vllm.general_plugins`` entry point, so vLLM runs it in every process it
starts, before the model is built. It first *checks* whether the installed ops have the bug
(one tiny gather with index ``-1``) and patches only then, so a vLLM with the upstream fix is
left alone. The patch is the upstream fix's idea: clamp the gather index to a valid slot and
zero the input rows of ``-1`` tokens, so their delta is exactly zero; rows with a real index
are computed exactly as before. No data-dependent branch, so it is safe under tracing.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vllm.loragate.cpu_lora_fix")  # under "vllm": shown in the worker's log

PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
"""The gathering ops; the ``sgmv_*`` ops expand their indices and call these through module globals."""

_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
"""Every module that binds the op names: the ops' own module and the two that import them by name."""

_MARK = "__loragate_no_lora_fix__"


def skip_no_lora_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` with tokens whose LoRA index is negative contributing an exact zero delta.

    Every patched op has the signature ``(inputs, weights, output, indices, ...)`` and computes
    ``einsum(inputs[t], weights[indices[t]])`` per token ``t``; zeroing ``inputs[t]`` makes that
    product zero whatever slot the clamped index points at.
    """
    if getattr(op, _MARK, False):
        return op

    @functools.wraps(op)
    def patched(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        no_lora = (indices < 0).unsqueeze(-1)
        return op(inputs.masked_fill(no_lora, 0), weights, output, indices.clamp(min=0), *args, **kwargs)

    setattr(patched, _MARK, True)
    return patched


def has_bug(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether ``bgmv_shrink`` applies the last slot's weights to a token with index ``-1``."""
    import torch

    weights = torch.zeros(2, 1, 1, 1)
    weights[-1] = 1.0  # only the last slot holds an adapter
    output = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), weights, output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def apply() -> bool:
    """Patch the CPU LoRA ops in this process when they have the bug; True when patched."""
    try:
        modules = [importlib.import_module(name) for name in _MODULES]
    except ImportError:  # no vLLM, or a layout this fix does not know: nothing to patch
        return False
    ops = modules[0]
    if getattr(ops.bgmv_shrink, _MARK, False) or not has_bug(ops.bgmv_shrink):
        return False
    for name in PATCHED_OPS:
        fixed = skip_no_lora_tokens(getattr(ops, name))
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, fixed)
    log.info("loragate: patched vLLM's CPU LoRA ops so base-model tokens get no adapter delta (vllm#48421)")
    return True


def register() -> None:
    """``vllm.general_plugins`` entry point: apply the fix; never let it break the worker's start."""
    try:
        apply()
    except Exception:  # pragma: no cover - a defensive net around a third-party layout
        log.exception("loragate: could not check vLLM's CPU LoRA ops for the no-LoRA index bug")
