"""The CPU LoRA fixes: base-model tokens (index -1) get an exact zero delta, LoRA tokens are unchanged;
prompt logprobs of a batch of several requests use each request's own adapter instead of crashing.

Runs the installed vLLM's own torch ops on small random tensors; a worker-level test of the same
fix is in tests/integration/test_workers_pool.py.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
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


# -- prompt logprobs of several requests (the request that killed the worker) ---------------------------
VOCAB, TOKENS = 5, (3, 2)  # two requests in one batch: 3 prompt rows with adapter slot 0, then 2 base rows


def punica_with_batch(index_mapping: tuple[int, ...], prompt_mapping: tuple[int, ...]) -> Any:
    """vLLM's CPU punica wrapper holding one step's mapping (LoRA id 1 in slot 0, slot 1 empty)."""
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    from vllm.lora.layers.utils import LoRAMapping

    wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=4, device="cpu")
    wrapper.update_metadata(LoRAMapping(index_mapping, prompt_mapping, is_prefill=True), [1, None], 2, VOCAB)
    return wrapper


def lora_logits(wrapper: Any, rows: torch.Tensor) -> torch.Tensor:
    lora_a, lora_b = weights((RANK, HIDDEN)), weights((VOCAB, RANK))
    logits = torch.zeros(rows.shape[0], VOCAB)
    wrapper.add_lora_logits(logits, rows, lora_a, lora_b, 1.0)
    return logits


@pytest.fixture
def prompt_rows_property(monkeypatch: pytest.MonkeyPatch) -> None:
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    cpu_lora_fix.apply()  # the no-LoRA fix, so base rows get an exact zero whatever the slot
    original = inspect.getattr_static(punica_cpu.PunicaWrapperCPU, "sampler_indices")
    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "sampler_indices",
                        cpu_lora_fix.sampler_indices_of_prompt_rows(original))


@pytest.mark.usefixtures("prompt_rows_property")
def test_prompt_rows_of_a_two_request_batch_get_their_own_adapter() -> None:
    hidden = torch.randn(sum(TOKENS), HIDDEN, generator=torch.Generator().manual_seed(3))
    batch = punica_with_batch((1, 1, 1, 0, 0), (1, 0))
    first, second = hidden[:3], hidden[3:]
    with pytest.raises(RuntimeError, match="must match the size"):  # what vLLM does: 2 sampler indices, 3 rows
        lora_logits(batch, first)
    with cpu_lora_fix.prompt_rows(cpu_lora_fix.row_slice(hidden, first)):
        fixed_first = lora_logits(batch, first)
    with cpu_lora_fix.prompt_rows(cpu_lora_fix.row_slice(hidden, second)):
        fixed_second = lora_logits(batch, second)
    # the same as vLLM computes for each request alone in its batch (one index, broadcast over the rows)
    assert torch.allclose(fixed_first, lora_logits(punica_with_batch((1, 1, 1), (1,)), first))
    assert torch.count_nonzero(fixed_first) > 0
    assert torch.count_nonzero(fixed_second) == 0  # base rows: no delta


def test_row_slice_finds_a_row_view_and_refuses_anything_else() -> None:
    hidden = torch.zeros(6, 4)
    assert cpu_lora_fix.row_slice(hidden, hidden[2:5]) == slice(2, 5)
    assert cpu_lora_fix.row_slice(hidden, hidden) == slice(0, 6)
    assert cpu_lora_fix.row_slice(hidden, hidden[2:5].clone()) is None
    assert cpu_lora_fix.row_slice(hidden, hidden[:, :2]) is None  # a column slice is no row view
    assert cpu_lora_fix.row_slice(hidden[1:], hidden[:2]) is None  # rows before the start


class FakeModel:
    def __init__(self) -> None:
        self.seen: list[slice | None] = []

    def compute_logits(self, rows: torch.Tensor) -> torch.Tensor:
        self.seen.append(cpu_lora_fix._PROMPT_ROWS.get())
        return rows


class FakeRunner:
    """The runner's loop in miniature: one ``compute_logits`` per request, over its slice of the rows."""

    def __init__(self) -> None:
        self.model = FakeModel()

    def _get_prompt_logprobs_dict(self, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> int:
        offset = 0
        for count in num_scheduled_tokens.values():
            self.model.compute_logits(hidden_states[offset:offset + count])
            offset += count
        return offset


def test_runner_patch_tells_each_compute_logits_call_its_rows_and_then_restores_the_model() -> None:
    FakeRunner._get_prompt_logprobs_dict = cpu_lora_fix.per_request_prompt_logits(  # type: ignore[method-assign]
        FakeRunner._get_prompt_logprobs_dict)
    runner = FakeRunner()
    assert runner._get_prompt_logprobs_dict(torch.zeros(5, 2), {"a": 3, "b": 2}) == 5
    assert runner.model.seen == [slice(0, 3), slice(3, 5)]
    assert "compute_logits" not in vars(runner.model)
    runner.model.compute_logits(torch.zeros(1, 2))
    assert runner.model.seen[-1] is None  # outside the prompt-logprobs loop: vLLM's own indices


def test_patch_on_import_patches_a_module_when_it_is_first_imported(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "loragate_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = cpu_lora_fix._PatchOnImport("loragate_probe_module", lambda module: setattr(module, "VALUE", 2))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "loragate_probe_module", raising=False)
    module = importlib.import_module("loragate_probe_module")
    assert module.VALUE == 2 and hook not in sys.meta_path


def test_apply_prompt_logits_fix_patches_the_installed_runner() -> None:
    pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    cpu_lora_fix.apply_prompt_logits_fix()
    runner = importlib.import_module(cpu_lora_fix.RUNNER_MODULE).CPUModelRunner
    assert getattr(runner._get_prompt_logprobs_dict, cpu_lora_fix._MARK, False)
    assert cpu_lora_fix.apply_prompt_logits_fix() is False  # once per process
