"""The CPU LoRA-op fix: base-model tokens (index -1) get an exact zero delta, LoRA tokens are unchanged.

Runs the installed vLLM's own torch ops on small random tensors; a worker-level test of the same
fix is in tests/integration/test_workers_pool.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from loragate.workers import cpu_lora_fix

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, HIDDEN, OUT = 3, 4, 8, 6
INDICES = torch.tensor([-1, 0, 2, -1, 1, 2])  # base tokens mixed with tokens of every slot; the last slot is full


def weights(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(SLOTS, 1, *shape, generator=torch.Generator().manual_seed(sum(shape)))


def run(op: Callable[..., Any], width: int, rows: int, inputs: torch.Tensor, stacked: torch.Tensor,
        *args: Any) -> torch.Tensor:
    output = torch.full((rows, width), 0.5)  # a nonzero start: expand ops add into it
    op(inputs, stacked, output, INDICES, *args)
    return output


CASES = [  # op name, output width, input width, stacked weight shape, extra args
    ("bgmv_shrink", RANK, HIDDEN, (RANK, HIDDEN), (1.0,)),
    ("bgmv_expand", OUT, RANK, (OUT, RANK), (True,)),
    ("bgmv_expand_slice", OUT + 2, RANK, (OUT, RANK), (2, OUT, True)),
]


@pytest.mark.parametrize(("name", "width", "in_width", "shape", "args"), CASES, ids=[c[0] for c in CASES])
def test_patched_op_gives_base_tokens_no_delta_and_lora_tokens_the_same(
        name: str, width: int, in_width: int, shape: tuple[int, ...], args: tuple[Any, ...]) -> None:
    original = getattr(lora_ops, name)
    original = getattr(original, "__wrapped__", original)  # this process may already have been patched
    patched = cpu_lora_fix.skip_no_lora_tokens(original)
    inputs = torch.randn(len(INDICES), in_width, generator=torch.Generator().manual_seed(7))
    stacked = weights(shape)
    rows = len(INDICES)
    fixed = run(patched, width, rows, inputs, stacked, *args)
    untouched = run(lambda *a: None, width, rows, inputs, stacked)
    base = INDICES < 0
    if name == "bgmv_shrink":  # shrink assigns: a base token's row is exactly zero
        assert torch.count_nonzero(fixed[base]) == 0
    else:  # expand adds: a base token's row is left as it was
        assert torch.equal(fixed[base], untouched[base])
    # Rows of real adapters match the op run on those rows alone, with valid indices only.
    lora_rows = run(original, width, rows, inputs.masked_fill(base.unsqueeze(-1), 0), stacked, *args)
    assert torch.allclose(fixed[~base], lora_rows[~base])
    assert not torch.equal(fixed[~base], untouched[~base])  # and adapters still do something


def test_has_bug_tells_a_gather_of_the_last_slot_from_a_skip() -> None:
    def buggy(inputs: torch.Tensor, stacked: torch.Tensor, output: torch.Tensor, indices: torch.Tensor,
              scale: float) -> None:
        output[:] = scale * torch.einsum("bi,boi->bo", inputs, stacked[indices].squeeze(1))

    assert cpu_lora_fix.has_bug(buggy)
    assert not cpu_lora_fix.has_bug(cpu_lora_fix.skip_no_lora_tokens(buggy))


def test_wrapping_twice_is_a_no_op() -> None:
    once = cpu_lora_fix.skip_no_lora_tokens(lora_ops.bgmv_shrink)
    assert cpu_lora_fix.skip_no_lora_tokens(once) is once


def test_apply_patches_every_binding_once_and_then_the_bug_is_gone() -> None:
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    cpu_lora_fix.apply()
    assert cpu_lora_fix.apply() is False  # already patched (or never buggy): nothing to do
    for name in cpu_lora_fix.PATCHED_OPS:
        assert getattr(punica_cpu, name) is getattr(lora_ops, name)
    assert not cpu_lora_fix.has_bug(lora_ops.bgmv_shrink)
    assert not cpu_lora_fix.has_bug(punica_cpu.bgmv_shrink)
