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

A second fix (:func:`apply_prompt_logits_fix`) keeps prompt logprobs from killing the engine. The
model runner computes prompt logprobs one request at a time, ``compute_logits(hidden_states[offset:
offset + n])`` over that request's prompt rows, but the LoRA logits layer gathers its adapters by
the *batch's* sampler indices, one per request. With one request in the batch that single index
broadcasts over the rows; with two (``"prompt": [q1, q2]`` plus ``echo`` and ``logprobs``, or any
two concurrent requests where one asks for prompt logprobs) the einsum fails on 2 indices against
n rows ("The size of tensor a (2) must match the size of tensor b (5)"), the engine core dies and
the worker with it; when n happens to equal the batch size it silently applies the wrong request's
adapter. vLLM's own ops fail the same way: the fault is the runner's index choice, not the ops.
The fix: while the runner computes prompt logits, the rows' own per-token LoRA indices (the
``token_lora_indices`` the rest of the forward pass used for those very rows) serve as the
sampler indices. It is applied whatever the installed version, because those indices are
correct by construction: a vLLM that fixed the runner gets the same values it would use itself.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"
"""Where the CPU model runner lives; imported (seconds) only in the process that runs the model."""

_PUNICA_MODULE = "vllm.lora.punica_wrapper.punica_cpu"
_PROMPT_ROWS: contextvars.ContextVar[slice | None] = contextvars.ContextVar("loragate_prompt_rows", default=None)
"""The hidden-state rows whose prompt logits are being computed; None outside that (vLLM's own indices)."""


def row_slice(whole: Any, rows: Any) -> slice | None:
    """Which rows of the 2-D tensor ``whole`` the tensor ``rows`` is a view of, or None if it is not such a view.

    The runner passes ``hidden_states[offset:offset + n]``: a view sharing ``whole``'s storage and
    strides, ``offset`` rows past its first element. Anything else (a copy, another layout) is None,
    and then vLLM's own indices are used, as without this fix.
    """
    if whole.dim() != 2 or rows.dim() != 2 or rows.shape[1] != whole.shape[1] or rows.stride() != whole.stride():
        return None
    if rows.dtype != whole.dtype:
        return None
    if rows.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr():
        return None
    start, remainder = divmod(rows.data_ptr() - whole.data_ptr(), whole.stride(0) * whole.element_size())
    if remainder or start < 0 or start + rows.shape[0] > whole.shape[0]:
        return None
    return slice(start, start + rows.shape[0])


@contextmanager
def prompt_rows(rows: slice | None) -> Iterator[None]:
    """Within this block, the CPU punica wrapper's sampler indices are those of hidden-state ``rows``."""
    token = _PROMPT_ROWS.set(rows)
    try:
        yield
    finally:
        _PROMPT_ROWS.reset(token)


def sampler_indices_of_prompt_rows(original: property) -> property:
    """The punica wrapper's ``sampler_indices`` property, giving per-token indices of :func:`prompt_rows`' rows."""

    def sampler_indices(self: Any) -> Any:
        rows = _PROMPT_ROWS.get()
        return original.__get__(self) if rows is None else self.token_lora_indices[rows]

    sampler_indices.__doc__ = original.__doc__
    setattr(sampler_indices, _MARK, True)
    return property(sampler_indices)


def per_request_prompt_logits(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the runner's ``_get_prompt_logprobs_dict`` so each ``compute_logits`` call uses its rows' LoRA indices."""
    if getattr(method, _MARK, False):
        return method

    @functools.wraps(method)
    def patched(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        compute_logits = model.compute_logits

        def compute_logits_of_rows(rows: Any, *more: Any, **options: Any) -> Any:
            with prompt_rows(row_slice(hidden_states, rows)):
                return compute_logits(rows, *more, **options)

        model.compute_logits = compute_logits_of_rows  # an instance attribute shadows the model class's method
        try:
            return method(self, hidden_states, *args, **kwargs)
        finally:
            del model.compute_logits

    setattr(patched, _MARK, True)
    return patched


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``patch(module)`` right after ``name`` is first imported, in any process that imports it.

    Importing the model runner costs seconds; the API server and the engine core never need it,
    so the worker process that does import it gets it patched then (this finder is inherited by
    forked processes; spawned ones run the plugin again).
    """

    def __init__(self, name: str, patch: Callable[[types.ModuleType], None]) -> None:
        self.name, self.patch = name, patch
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name or self._loader is not None:
            return None
        sys.meta_path.remove(self)  # one shot: find the real module without us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        assert self._loader is not None
        self._loader.exec_module(module)
        try:
            self.patch(module)
        except Exception:  # a layout this fix does not know must not stop the worker's start
            log.exception("loragate: could not patch %s", self.name)


def _patch_runner(module: types.ModuleType) -> None:
    runner = module.CPUModelRunner
    if "hidden_states" not in inspect.signature(runner._get_prompt_logprobs_dict).parameters:
        log.warning("loragate: unknown prompt-logprobs layout in vLLM's CPU model runner; not patched")
        return
    runner._get_prompt_logprobs_dict = per_request_prompt_logits(runner._get_prompt_logprobs_dict)
    log.info("loragate: patched vLLM's CPU model runner so prompt logprobs of several requests use each "
             "request's own LoRA indices")


def apply_prompt_logits_fix() -> bool:
    """Install the prompt-logits fix in this process (now, or when the runner is imported); True when installed."""
    try:
        punica = importlib.import_module(_PUNICA_MODULE)
    except ImportError:
        return False
    wrapper = punica.PunicaWrapperCPU
    original = inspect.getattr_static(wrapper, "sampler_indices", None)
    if not isinstance(original, property) or original.fget is None:
        return False
    if getattr(original.fget, _MARK, False):
        return False  # already installed in this process (or inherited through fork)
    wrapper.sampler_indices = sampler_indices_of_prompt_rows(original)
    if RUNNER_MODULE in sys.modules:
        _patch_runner(sys.modules[RUNNER_MODULE])
    else:
        sys.meta_path.insert(0, _PatchOnImport(RUNNER_MODULE, _patch_runner))
    return True


def register() -> None:
    """``vllm.general_plugins`` entry point: apply the fixes; never let them break the worker's start."""
    for fix, what in ((apply, "the no-LoRA index bug"), (apply_prompt_logits_fix, "prompt logprobs with LoRA")):
        try:
            fix()
        except Exception:  # pragma: no cover - a defensive net around a third-party layout
            log.exception("loragate: could not fix vLLM's CPU LoRA path for %s", what)
