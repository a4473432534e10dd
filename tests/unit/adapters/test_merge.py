"""The algebra of each merge method, its refusals, the written PEFT dir and content addressing.

Factors are random (written as real PEFT dirs with numpy), so every equality below would fail for a
wrong scaling, a transposed block or a dropped module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from loragate.adapters.merge import (
    INFO_FILE,
    MERGE_METHODS,
    LoraFactors,
    build_merge,
    get_method,
    load_factors,
    merge_factors,
    plan_merge,
    write_peft_dir,
)
from loragate.adapters.peft_format import inspect_dir
from loragate.adapters.store import AdapterStore
from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest, Unprocessable
from tests.lora_files import write_lora

D, K = 24, 20  # small enough for dense checks, big enough that rank truncation matters


def lora(directory: Path, *, rank: int, alpha: int, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj"),
         rslora: bool = False, base: str = "tiny-llama", layers: int = 2, prefix: str = "base_model.model.",
         d: int = D, k: int = K, overrides: dict[str, object] | None = None) -> Path:
    """A PEFT dir with random A (r x k) and B (d x r) for each target in each layer."""
    return write_lora(directory, rank=rank, alpha=alpha, base=base, targets=targets, layers=layers, seed=seed,
                      prefix=prefix, in_dim=k, out_dim=d, config_overrides={"use_rslora": rslora, **(overrides or {})})


def record(directory: Path, name: str, **overrides: object) -> AdapterRecord:
    spec = inspect_dir(directory)
    sha, size = AdapterStore.content_hash(directory)
    fields: dict[str, object] = dict(
        name=name, base_model=spec.base_model, rank=spec.rank, alpha=spec.alpha, target_modules=spec.target_modules,
        use_rslora=spec.use_rslora, modules_to_save=spec.modules_to_save, sha256=sha, path=directory,
        size_bytes=size, created_at=0.0)
    fields.update(overrides)
    return AdapterRecord(**fields)  # type: ignore[arg-type]


def dense(adapter: LoraFactors, module: str) -> np.ndarray:
    f = adapter.modules[module]
    return adapter.scaling * f.b.astype(np.float64) @ f.a.astype(np.float64)


def weighted_sum(adapters: list[LoraFactors], weights: list[float], module: str) -> np.ndarray:
    return sum((w * dense(a, module) for a, w in zip(adapters, weights, strict=True) if module in a.modules),
               np.zeros((D, K)))


def product(merged_module) -> np.ndarray:  # type: ignore[no-untyped-def]
    return merged_module.b.astype(np.float64) @ merged_module.a.astype(np.float64)


@pytest.fixture
def three(tmp_path: Path) -> list[LoraFactors]:
    """Unequal ranks, one rsLoRA adapter, and a v_proj that only the first adapter has."""
    return [
        load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1)),
        load_factors(lora(tmp_path / "b", rank=2, alpha=3, seed=2, targets=("q_proj",), rslora=True)),
        load_factors(lora(tmp_path / "c", rank=3, alpha=6, seed=3, targets=("q_proj",))),
    ]


Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def test_factors_have_scaling_and_normalised_module_keys(three: list[LoraFactors]) -> None:
    a, b, _ = three
    assert a.scaling == 2.0 and b.scaling == pytest.approx(3 / math.sqrt(2))  # rsLoRA: alpha / sqrt(r)
    assert set(a.modules) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert a.modules[Q0].a.shape == (4, K) and a.modules[Q0].b.shape == (D, 4)


def test_cat_is_the_exact_weighted_sum_of_updates(three: list[LoraFactors]) -> None:
    weights = [0.6, 0.3, 0.1]
    merged = merge_factors(three, weights, "cat", max_rank=16)
    assert merged.rank == 4 + 2 + 3
    assert set(merged.modules) == set(three[0].modules)  # union; v_proj comes from the first adapter only
    for module, factors in merged.modules.items():
        assert factors.a.shape == (9, K) and factors.b.shape == (D, 9)
        np.testing.assert_allclose(product(factors), weighted_sum(three, weights, module), rtol=1e-5, atol=1e-4)
    v = merged.modules[V1]
    assert not v.a[4:].any() and not v.b[:, 4:].any()  # zero blocks where b and c lack v_proj
    np.testing.assert_allclose(v.a[:4], 0.6 * 2.0 * three[0].modules[V1].a, rtol=1e-6)


def test_svd_is_the_best_rank_r_approximation(three: list[LoraFactors]) -> None:
    weights = [0.5, 0.25, 0.25]
    for target, expected_rank in ((None, 4), (6, 6), (2, 2)):
        asked = {} if target is None else {"target_rank": target}
        merged = merge_factors(three, weights, "svd", max_rank=16, params=asked)
        assert merged.rank == expected_rank
        for module, factors in merged.modules.items():
            exact = weighted_sum(three, weights, module)
            u, s, vt = np.linalg.svd(exact)
            r = expected_rank
            truncated = (u[:, :r] * s[:r]) @ vt[:r]
            approx = product(factors)
            assert factors.a.shape == (r, K) and factors.b.shape == (D, r)
            best_error = math.sqrt(float(np.sum(s[r:] ** 2)))
            assert np.linalg.norm(exact - approx) == pytest.approx(best_error, rel=1e-4, abs=1e-3)
            np.testing.assert_allclose(approx, truncated, rtol=1e-4, atol=1e-3)
            # The sqrt of the singular values sits in both factors (balanced): equal row/column norms.
            np.testing.assert_allclose(np.linalg.norm(factors.b, axis=0), np.linalg.norm(factors.a, axis=1),
                                       rtol=1e-4)


def test_svd_pads_to_the_rank_when_the_update_has_fewer_components(tmp_path: Path) -> None:
    thin = [load_factors(lora(tmp_path / n, rank=3, alpha=3, seed=i, d=2, targets=("q_proj",), layers=1))
            for i, n in enumerate("xy")]
    merged = merge_factors(thin, [0.5, 0.5], "svd", max_rank=8, params={"target_rank": 5})
    factors = merged.modules["model.layers.0.self_attn.q_proj"]
    assert merged.rank == 5 and factors.a.shape == (5, K) and factors.b.shape == (2, 5)
    assert not factors.a[2:].any()  # rank(dW) <= d = 2; the rest are zero components
    exact = sum(0.5 * f.scaling * f.modules["model.layers.0.self_attn.q_proj"].b.astype(np.float64)
                @ f.modules["model.layers.0.self_attn.q_proj"].a for f in thin)
    np.testing.assert_allclose(product(factors), exact, rtol=1e-4, atol=1e-4)


def test_linear_averages_sqrt_scaled_factors_which_is_not_the_average_update(tmp_path: Path) -> None:
    a = load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1))
    b = load_factors(lora(tmp_path / "b", rank=4, alpha=2, seed=2, targets=("q_proj",), rslora=True))
    w = [0.7, 0.3]
    merged = merge_factors([a, b], w, "linear", max_rank=16)
    assert merged.rank == 4
    fa, fb, m = a.modules[Q0], b.modules[Q0], merged.modules[Q0]
    np.testing.assert_allclose(m.a, w[0] * math.sqrt(a.scaling) * fa.a + w[1] * math.sqrt(b.scaling) * fb.a,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.b, w[0] * math.sqrt(a.scaling) * fa.b + w[1] * math.sqrt(b.scaling) * fb.b,
                               rtol=1e-5, atol=1e-5)
    # v_proj: only a has it; b contributes zeros, so the result is (w0 sqrt(s) B)(w0 sqrt(s) A) = w0^2 dW.
    np.testing.assert_allclose(product(merged.modules[V1]), w[0] ** 2 * dense(a, V1), rtol=1e-5, atol=1e-4)
    # Cross terms are real: B A differs from sum(w_i dW_i) by exactly w0 w1 sqrt(s0 s1)(B0 A1 + B1 A0) ...
    average = weighted_sum([a, b], w, Q0)
    root = math.sqrt(a.scaling * b.scaling)
    cross = w[0] * w[1] * root * (fa.b.astype(np.float64) @ fb.a + fb.b.astype(np.float64) @ fa.a)
    squares = w[0] ** 2 * dense(a, Q0) + w[1] ** 2 * dense(b, Q0)
    np.testing.assert_allclose(product(m), squares + cross, rtol=1e-5, atol=1e-3)
    # ... and that difference is not small: linear is not an average of the updates.
    assert np.linalg.norm(product(m) - average) > 0.1 * np.linalg.norm(average)


def test_peft_linear_is_twice_ours_for_two_adapters_at_half_weight(tmp_path: Path) -> None:
    """PEFT's linear scales each factor by sqrt(w_i s_i) (tuners/lora/model.py), ours by w_i sqrt(s_i)."""
    a = load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1))
    b = load_factors(lora(tmp_path / "b", rank=4, alpha=4, seed=2))
    ours = product(merge_factors([a, b], [0.5, 0.5], "linear", max_rank=8).modules[Q0])
    peft_a = sum(math.sqrt(0.5 * f.scaling) * f.modules[Q0].a.astype(np.float64) for f in (a, b))
    peft_b = sum(math.sqrt(0.5 * f.scaling) * f.modules[Q0].b.astype(np.float64) for f in (a, b))
    peft_update = peft_b @ peft_a  # PEFT writes lora_alpha = r for the merge: scaling 1
    np.testing.assert_allclose(peft_update, 2 * ours, rtol=1e-5, atol=1e-3)


def _peft_model_with_two_loras(first_rslora: bool):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(K, D, bias=False)
            self.v_proj = nn.Linear(K, 6, bias=False)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    torch.manual_seed(0)
    # "one" covers q_proj and v_proj; "two" only q_proj, so v_proj is a module present in one adapter.
    model = peft.get_peft_model(Model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         use_rslora=first_rslora), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], use_rslora=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param))
    return torch, peft, model


def _export(peft, model, adapter: str, directory: Path, *, rank: int, alpha: int,  # type: ignore[no-untyped-def]
            targets: tuple[str, ...], rslora: bool) -> LoraFactors:
    """The adapter's real PEFT state dict keys and tensors, written as a PEFT dir and loaded back."""
    state = peft.utils.get_peft_model_state_dict(model, adapter_name=adapter)
    tensors = {key: value.detach().numpy().astype(np.float32) for key, value in state.items()}
    write_lora(directory, rank=rank, alpha=alpha, targets=targets, tensors=tensors,
               config_overrides={"use_rslora": rslora})
    return load_factors(directory)


def test_cat_equals_peft_add_weighted_adapter_cat(tmp_path: Path) -> None:
    torch, peft, model = _peft_model_with_two_loras(first_rslora=False)
    one = _export(peft, model, "one", tmp_path / "one", rank=4, alpha=8, targets=("q_proj", "v_proj"), rslora=False)
    two = _export(peft, model, "two", tmp_path / "two", rank=2, alpha=3, targets=("q_proj",), rslora=True)
    weights = [0.7, 0.3]
    model.add_weighted_adapter(["one", "two"], weights, "mix", combination_type="cat")
    ours = merge_factors([one, two], weights, "cat", max_rank=16)
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, ours.rank) == (6, 6, 6)  # both: rank sum, scaling 1
    compared = 0
    for name, module in model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer) or "mix" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        mine = ours.modules[key]
        with torch.no_grad():
            theirs = module.get_delta_weight("mix").numpy()
            # Same factors, block for block (PEFT leaves zero rows where an adapter lacks the module).
            np.testing.assert_allclose(module.lora_A["mix"].weight.numpy(), mine.a, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(module.lora_B["mix"].weight.numpy(), mine.b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(theirs, product(mine), rtol=1e-5, atol=1e-4)
        compared += 1
    assert compared == 4  # q_proj and v_proj in two layers


def test_peft_cat_of_rslora_adapters_against_ours(tmp_path: Path) -> None:
    """PEFT before 0.22 built the merged config with ``replace(config_of_first_adapter, r=R, lora_alpha=R)``.

    If the first adapter was rsLoRA the merged one was too, so its scaling was R/sqrt(R) = sqrt(R) and its
    update sqrt(R) times the weighted sum. PEFT 0.22 writes use_rslora false (scaling 1), as ours always
    has, and then the two updates are equal. Either way the factors and our update are what they were.
    """
    torch, peft, model = _peft_model_with_two_loras(first_rslora=True)
    one = _export(peft, model, "one", tmp_path / "one", rank=4, alpha=8, targets=("q_proj", "v_proj"), rslora=True)
    two = _export(peft, model, "two", tmp_path / "two", rank=2, alpha=3, targets=("q_proj",), rslora=True)
    model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha) == (6, 6)
    ours = merge_factors([one, two], [0.5, 0.5], "cat", max_rank=16)
    module = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        theirs = module.get_delta_weight("mix").numpy()
    peft_scale = math.sqrt(6) if config.use_rslora else 1.0  # PEFT < 0.22 copied rsLoRA from the first adapter
    np.testing.assert_allclose(theirs, peft_scale * product(ours.modules[Q0.removeprefix("model.")]),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("method", "weights", "max_rank", "kind", "fragments"), [
    ("linear", [0.5, 0.5], 16, Unprocessable, ["linear merge needs equal ranks", "a r=4", "b r=2"]),
    ("cat", [0.5, 0.5], 5, Unprocessable, ["4 + 2 = 6", "max LoRA rank 5"]),
    ("svd", [0.5, 0.5], 3, Unprocessable, ["svd merge rank 4", "max LoRA rank 3"]),
    ("cat", [0.5], 16, Unprocessable, ["1 weights for 2 adapters"]),
    ("cat", [0.5, -0.5], 16, Unprocessable, ["finite and non-negative"]),
    ("cat", [0.5, float("nan")], 16, Unprocessable, ["finite and non-negative"]),
    ("cat", [0.0, 0.0], 16, Unprocessable, ["must not all be zero"]),
    ("task_arithmetic", [0.5, 0.5], 16, InvalidRequest,
     ["unknown merge method 'task_arithmetic'", "cat, dare_linear, dare_ties, linear, svd, ties"]),
])
def test_refusals_name_the_problem(tmp_path: Path, method: str, weights: list[float], max_rank: int,
                                   kind: type[Exception], fragments: list[str]) -> None:
    a = load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1))
    b = load_factors(lora(tmp_path / "b", rank=2, alpha=4, seed=2))
    records = [record(tmp_path / "a", "a"), record(tmp_path / "b", "b")]
    for attempt in (lambda: merge_factors([a, b], weights, method, max_rank=max_rank),
                    lambda: plan_merge(records, weights, method, max_rank=max_rank)):
        with pytest.raises(kind) as caught:
            attempt()
        for fragment in fragments:
            assert fragment in str(caught.value)
        assert caught.value.status == (400 if kind is InvalidRequest else 422)  # type: ignore[attr-defined]


def test_different_base_models_are_refused(tmp_path: Path) -> None:
    a = lora(tmp_path / "a", rank=4, alpha=8, seed=1)
    b = lora(tmp_path / "b", rank=4, alpha=8, seed=2, base="other-llama")
    with pytest.raises(Unprocessable, match=r"one base model.*'tiny-llama'.*'other-llama'") as caught:
        merge_factors([load_factors(a), load_factors(b)], [0.5, 0.5], "cat", max_rank=16)
    assert caught.value.code == "base_model_mismatch"
    with pytest.raises(Unprocessable, match="one base model"):
        plan_merge([record(a, "a"), record(b, "b")], [0.5, 0.5], "cat", max_rank=16)


def test_shape_mismatch_for_one_module_is_refused(tmp_path: Path) -> None:
    a = load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1))
    b = load_factors(lora(tmp_path / "b", rank=4, alpha=8, seed=2, d=D + 1))
    with pytest.raises(Unprocessable, match="different shapes"):
        merge_factors([a, b], [0.5, 0.5], "cat", max_rank=16)


def test_modules_to_save_and_embedding_changes_are_refused(tmp_path: Path) -> None:
    saved = lora(tmp_path / "saved", rank=4, alpha=8, seed=1, overrides={"modules_to_save": ["lm_head"]})
    plain = lora(tmp_path / "plain", rank=4, alpha=8, seed=2)
    with pytest.raises(Unprocessable, match=r"adapter saved has modules_to_save \['lm_head'\]"):
        load_factors(saved)
    with pytest.raises(Unprocessable, match="modules_to_save") as caught:
        plan_merge([record(plain, "plain"), record(saved, "saved")], [0.5, 0.5], "cat", max_rank=16)
    assert caught.value.status == 422
    # An embedding LoRA is saved as lora_embedding_A/B: not a lora_A/lora_B factor, so not mergeable.
    embedding = lora(tmp_path / "embedding", rank=4, alpha=8, seed=3)
    tensors = dict(safetensors.numpy.load_file(str(embedding / "adapter_model.safetensors")))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 10), np.float32)
    write_lora(embedding, rank=4, alpha=8, tensors=tensors)
    with pytest.raises(Unprocessable, match=r"embed_tokens\.lora_embedding_A is not a lora_A/lora_B factor"):
        load_factors(embedding)
    dora = lora(tmp_path / "dora", rank=4, alpha=8, seed=4, overrides={"use_dora": True})
    with pytest.raises(Unprocessable, match="DoRA"):
        load_factors(dora)


def test_empty_list_is_refused() -> None:
    with pytest.raises(Unprocessable, match="at least one adapter"):
        plan_merge([], [], "cat", max_rank=16)
    with pytest.raises(Unprocessable, match="at least one adapter"):
        merge_factors([], [], "cat", max_rank=16)


def test_target_rank_is_only_for_svd(tmp_path: Path) -> None:
    a = load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=1))
    with pytest.raises(InvalidRequest, match="'cat': does not take target_rank; its parameters: none"):
        merge_factors([a], [1.0], "cat", max_rank=16, params={"target_rank": 2})
    with pytest.raises(InvalidRequest, match="positive integer"):
        merge_factors([a], [1.0], "svd", max_rank=16, params={"target_rank": 0})


def test_methods_registry_lookup() -> None:
    assert sorted(MERGE_METHODS) == ["cat", "dare_linear", "dare_ties", "linear", "svd", "ties"]
    assert get_method("svd").name == "svd"
    with pytest.raises(InvalidRequest) as caught:
        get_method("average")
    assert caught.value.body()["error"]["param"] == "method" and "valid methods: cat, dare_linear" in str(caught.value)


def test_keys_of_one_module_match_across_peft_key_variants(tmp_path: Path) -> None:
    """``lora_A.<adapter>.weight`` without the wrapper prefix and the saved form name the same module."""
    a = load_factors(lora(tmp_path / "a", rank=2, alpha=2, seed=1))
    rng = np.random.default_rng(7)
    module = "model.layers.0.self_attn.q_proj"
    tensors = {f"{module}.lora_A.default.weight": rng.standard_normal((2, K)).astype(np.float32),
               f"{module}.lora_B.default.weight": rng.standard_normal((D, 2)).astype(np.float32)}
    b = load_factors(write_lora(tmp_path / "b", rank=2, alpha=2, targets=("q_proj",), tensors=tensors))
    assert set(b.modules) == {Q0}
    merged = merge_factors([a, b], [0.5, 0.5], "cat", max_rank=8)
    assert set(merged.modules) == set(a.modules)
    np.testing.assert_allclose(product(merged.modules[Q0]), weighted_sum([a, b], [0.5, 0.5], Q0), rtol=1e-5,
                               atol=1e-4)


def _write_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file by hand (8-byte header length, JSON header, data): numpy cannot hold bfloat16."""
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for key, value in tensors.items():
        blob = (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_bf16_weights_are_read_without_torch(tmp_path: Path) -> None:
    reference = lora(tmp_path / "f32", rank=2, alpha=4, seed=5, layers=1, targets=("q_proj",))
    tensors = dict(safetensors.numpy.load_file(str(reference / "adapter_model.safetensors")))
    directory = write_lora(tmp_path / "bf16", rank=2, alpha=4, targets=("q_proj",), tensors=tensors)
    _write_bf16(directory / "adapter_model.safetensors", tensors)
    loaded = load_factors(directory).modules[Q0]
    original = load_factors(reference).modules[Q0]
    np.testing.assert_allclose(loaded.a, original.a, rtol=1e-2)  # bf16 keeps 8 bits of mantissa
    assert not np.array_equal(loaded.a, original.a)  # ... and it really was truncated, then widened
    np.testing.assert_array_equal(loaded.b, (original.b.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_written_merge_is_a_valid_peft_dir_and_round_trips(tmp_path: Path, three: list[LoraFactors]) -> None:
    merged = merge_factors(three, [0.5, 0.3, 0.2], "cat", max_rank=16)
    path, created = write_peft_dir(merged, tmp_path / "out" / "merge", info={"method": "cat"})
    assert created and sorted(p.name for p in path.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", INFO_FILE])
    assert not [p for p in path.parent.iterdir() if p.name != "merge"]  # no staging leftovers
    spec = inspect_dir(path)  # the registry's validator
    assert (spec.rank, spec.alpha, spec.scaling, spec.use_rslora) == (9, 9.0, 1.0, False)
    assert spec.target_modules == ("q_proj", "v_proj") and spec.base_model == "tiny-llama"
    assert spec.module_paths[0] == "base_model.model.model.layers.0.self_attn.q_proj"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] is None
    back = load_factors(path)
    for module, factors in merged.modules.items():
        np.testing.assert_array_equal(back.modules[module].a, factors.a)
        np.testing.assert_array_equal(back.modules[module].b, factors.b)
    again, created_again = write_peft_dir(merged, path)
    assert again == path and not created_again  # an existing merge is kept, the new copy discarded


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_streamed_safetensors_match_the_library_for_every_method(tmp_path: Path, three: list[LoraFactors],
                                                                 method: str) -> None:
    """The writer streams module by module; the safetensors library must read back exactly the merge."""
    from safetensors.numpy import load_file

    from loragate.adapters.merge import CombinedModules, safetensors_intact, write_safetensors

    inputs = three[:1] * 2 if method == "linear" else three  # linear needs equal ranks
    merged = merge_factors(inputs, [0.6, 0.4] if method == "linear" else [0.5, 0.3, 0.2], method, max_rank=16,
                           params={"target_rank": 4} if method == "svd" else None)
    assert isinstance(merged.modules, CombinedModules)
    eager = {m: merged.modules[m] for m in merged.modules}  # combined in memory, the old way
    streamed, plain = tmp_path / "streamed.safetensors", tmp_path / "plain.safetensors"
    write_safetensors(streamed, merged.modules)
    write_safetensors(plain, eager)
    assert streamed.read_bytes() == plain.read_bytes()
    tensors = load_file(str(streamed))
    assert len(tensors) == 2 * len(eager)
    for module, factors in eager.items():
        np.testing.assert_array_equal(tensors[f"base_model.model.{module}.lora_A.weight"], factors.a)
        np.testing.assert_array_equal(tensors[f"base_model.model.{module}.lora_B.weight"], factors.b)
    assert safetensors_intact(streamed)
    with streamed.open("r+b") as handle:
        handle.truncate(streamed.stat().st_size - 4)
    assert not safetensors_intact(streamed)


def test_regex_targets_become_concrete_module_names(tmp_path: Path) -> None:
    a = load_factors(lora(tmp_path / "a", rank=2, alpha=2, seed=1,
                          overrides={"target_modules": r".*\.(q_proj|v_proj)"}))
    b = load_factors(lora(tmp_path / "b", rank=2, alpha=2, seed=2, targets=("q_proj",)))
    merged = merge_factors([a, b], [0.5, 0.5], "linear", max_rank=8)
    assert merged.target_modules == ("q_proj", "v_proj")


def test_plan_key_is_canonical_and_names_what_is_built(tmp_path: Path) -> None:
    a, b = record(lora(tmp_path / "a", rank=4, alpha=8, seed=1), "a"), record(
        lora(tmp_path / "b", rank=4, alpha=8, seed=2), "b")
    first = plan_merge([a, b], [0.6, 0.4], "cat", max_rank=16)
    assert first.name == f"merge-{first.key[:16]}" and len(first.key) == 64
    assert plan_merge([b, a], [0.4, 0.6], "cat", max_rank=16).key == first.key  # order does not matter
    assert plan_merge([a, b], [0.6 + 1e-9, 0.4], "cat", max_rank=16).key == first.key  # float noise does not
    assert plan_merge([a, b], [0.6, 0.4], "linear", max_rank=16).key != first.key
    assert plan_merge([a, b], [0.4, 0.6], "cat", max_rank=16).key != first.key
    renamed = record(tmp_path / "a", "a-again")
    assert plan_merge([renamed, b], [0.6, 0.4], "cat", max_rank=16).key == first.key  # content, not names
    same_twice = plan_merge([a, renamed, b], [0.3, 0.3, 0.4], "cat", max_rank=16)
    assert same_twice.key == first.key and same_twice.rank == 8  # duplicates summed, not stacked twice
    dropped = plan_merge([a, b], [1.0, 0.0], "cat", max_rank=16)
    assert [r.name for r, _ in dropped.inputs] == ["a"] and dropped.rank == 4
    svd_default = plan_merge([a, b], [0.6, 0.4], "svd", max_rank=16)
    assert svd_default.key == plan_merge([a, b], [0.6, 0.4], "svd", max_rank=16, params={"target_rank": 4}).key
    assert svd_default.key != plan_merge([a, b], [0.6, 0.4], "svd", max_rank=16, params={"target_rank": 6}).key


def test_build_merge_writes_the_plan_with_provenance(tmp_path: Path) -> None:
    a, b = record(lora(tmp_path / "a", rank=4, alpha=8, seed=1), "a"), record(
        lora(tmp_path / "b", rank=2, alpha=2, seed=2), "b")
    plan = plan_merge([a, b], [0.75, 0.25], "cat", max_rank=16)
    path, created = build_merge(plan, tmp_path / "merges" / plan.key)
    assert created and inspect_dir(path).rank == 6
    info = json.loads((path / INFO_FILE).read_text())
    assert info["key"] == plan.key and info["method"] == "cat" and "PEFT cat" in info["meaning"]
    assert {i["name"]: i["weight"] for i in info["inputs"]} == {"a": 0.75, "b": 0.25}
    fa, fb, merged = load_factors(a.path), load_factors(b.path), load_factors(path)
    np.testing.assert_allclose(product(merged.modules[Q0]), weighted_sum([fa, fb], [0.75, 0.25], Q0),
                               rtol=1e-5, atol=1e-4)
