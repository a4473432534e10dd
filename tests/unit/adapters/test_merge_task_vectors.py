"""ties, dare_linear and dare_ties on small random factors, each against its definition computed here.

The references below are written from the definitions in adapters/merge.py's docstring and the README,
entry by entry, without the module's helpers: per factor the task tensors are T_i = sqrt(s_i) X_i
(X = A or B); ties trims each T_i to its int(p * size) largest magnitudes, elects a sign per entry
and takes the weighted mean of the agreeing entries; DARE keeps each entry with probability p (masks
drawn from numpy's default generator seeded by [seed, crc32(module), 0 for A / 1 for B]) and rescales
the kept by 1/p. The merged update B A is compared with the product of the reference factors.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from loragate.adapters.merge import LoraFactors, build_merge, load_factors, merge_factors, plan_merge
from loragate.errors import InvalidRequest, Unprocessable
from tests.unit.adapters.test_merge import Q0, V1, D, K, lora, product, record


@pytest.fixture
def equal(tmp_path: Path) -> list[LoraFactors]:
    """Three rank-4 adapters with different scalings (one rsLoRA); v_proj only in the first."""
    return [
        load_factors(lora(tmp_path / "a", rank=4, alpha=8, seed=11)),
        load_factors(lora(tmp_path / "b", rank=4, alpha=2, seed=12, targets=("q_proj",), rslora=True)),
        load_factors(lora(tmp_path / "c", rank=4, alpha=4, seed=13, targets=("q_proj",))),
    ]


def tasks(adapters: list[LoraFactors], module: str, which: int) -> list[np.ndarray]:
    """T_i = sqrt(s_i) A_i (which=0) or sqrt(s_i) B_i (which=1); zeros where an adapter lacks the module."""
    shape = (4, K) if which == 0 else (D, 4)
    out = []
    for adapter in adapters:
        factors = adapter.modules.get(module)
        x = np.zeros(shape) if factors is None else (factors.a if which == 0 else factors.b).astype(np.float64)
        out.append(math.sqrt(adapter.scaling) * x)
    return out


def ref_trim(t: np.ndarray, density: float) -> np.ndarray:
    keep = int(density * t.size)
    order = np.argsort(-np.abs(t).reshape(-1), kind="stable")
    out = np.zeros(t.size)
    out[order[:keep]] = t.reshape(-1)[order[:keep]]
    return out.reshape(t.shape)


def ref_drop(ts: list[np.ndarray], density: float, seed: int, module: str, which: int) -> list[np.ndarray]:
    draws = np.random.default_rng([seed, zlib.crc32(module.encode()), which]).random((len(ts), *ts[0].shape))
    return [np.where(draws[i] < density, t / density, 0.0) for i, t in enumerate(ts)]


def ref_elect_and_mean(ts: list[np.ndarray], weights: list[float], majority: str) -> np.ndarray:
    """Entry by entry: the elected sign, then the weighted mean of the entries that carry it."""
    out = np.zeros(ts[0].shape)
    for index in np.ndindex(out.shape):
        values = [t[index] for t in ts]
        votes = sum(values) if majority == "total" else sum(np.sign(v) for v in values)
        elected = 1.0 if votes >= 0 else -1.0
        agree = [(w, v) for w, v in zip(weights, values, strict=True) if np.sign(v) == elected]
        if agree:
            out[index] = sum(w * v for w, v in agree) / sum(w for w, _ in agree)
    return out


def reference(adapters: list[LoraFactors], weights: list[float], method: str, module: str, *,
              density: float = 0.5, majority: str = "total", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    factors = []
    for which in (0, 1):
        ts = tasks(adapters, module, which)
        if method == "ties":
            factors.append(ref_elect_and_mean([ref_trim(t, density) for t in ts], weights, majority))
        elif method == "dare_linear":
            factors.append(sum(w * t for w, t in zip(weights, ref_drop(ts, density, seed, module, which),
                                                     strict=True)))
        else:
            factors.append(ref_elect_and_mean(ref_drop(ts, density, seed, module, which), weights, majority))
    return factors[0], factors[1]


CASES = [
    ("ties", {"density": 0.5, "majority": "total"}),
    ("ties", {"density": 0.3, "majority": "frequency"}),
    ("ties", {"density": 1.0, "majority": "total"}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.4, "majority": "total", "seed": 5}),
    ("dare_ties", {"density": 0.7, "majority": "frequency", "seed": 0}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_each_method_matches_its_definition(equal: list[LoraFactors], method: str, params: dict[str, object]) -> None:
    weights = [0.5, 0.3, 0.2]
    merged = merge_factors(equal, weights, method, max_rank=16, params=params)
    assert merged.rank == 4 and set(merged.modules) == set(equal[0].modules)
    for module, factors in merged.modules.items():
        ref_a, ref_b = reference(equal, weights, method, module, **params)  # type: ignore[arg-type]
        np.testing.assert_allclose(factors.a, ref_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(factors.b, ref_b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(product(factors), ref_b @ ref_a, rtol=1e-5, atol=1e-4)
        assert factors.a.any() and factors.b.any()


def test_ties_trims_elects_and_is_not_the_average_update(equal: list[LoraFactors]) -> None:
    merged = merge_factors(equal, [0.5, 0.3, 0.2], "ties", max_rank=16, params={"density": 0.25})
    a = merged.modules[Q0].a
    # Each trimmed T_i keeps int(0.25 * 80) = 20 entries of A: at most 60 survive the merge, not all 80.
    assert 0 < np.count_nonzero(a) <= 3 * 20 < a.size
    # v_proj: only the first adapter has it, so there ties is its own trim (the mean of one entry is itself).
    v = merged.modules[V1]
    np.testing.assert_allclose(v.a, ref_trim(math.sqrt(equal[0].scaling) * equal[0].modules[V1].a, 0.25),
                               rtol=1e-6)
    # Factor-space merging: B A is far from the weighted sum of the updates (cross terms, trims).
    exact = sum(w * f.scaling * f.modules[Q0].b.astype(np.float64) @ f.modules[Q0].a
                for f, w in zip(equal, [0.5, 0.3, 0.2], strict=True))
    assert np.linalg.norm(product(merged.modules[Q0]) - exact) > 0.1 * np.linalg.norm(exact)


def test_dare_is_deterministic_for_a_seed_and_differs_for_another(equal: list[LoraFactors]) -> None:
    def factors(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        merged = merge_factors(equal, [0.6, 0.3, 0.1], "dare_ties", max_rank=16, params={"density": 0.5, "seed": seed})
        return {m: (f.a, f.b) for m, f in merged.modules.items()}

    first, again, other = factors(1), factors(1), factors(2)
    for module in first:
        for x, y, z in zip(first[module], again[module], other[module], strict=True):
            np.testing.assert_array_equal(x, y)
            assert not np.array_equal(x, z)
    # The masks differ between modules too (the module name seeds them), and keep about density of the entries.
    single = merge_factors(equal[:1], [1.0], "dare_linear", max_rank=16, params={"density": 0.5, "seed": 9})
    kept = {m: f.a != 0 for m, f in single.modules.items()}
    assert len({mask.tobytes() for mask in kept.values()}) == len(kept)
    fraction = np.mean([mask.mean() for mask in kept.values()])
    assert 0.35 < fraction < 0.65
    a0 = math.sqrt(equal[0].scaling) * equal[0].modules[Q0].a
    survivors = kept[Q0]
    np.testing.assert_allclose(single.modules[Q0].a[survivors], a0[survivors] / 0.5, rtol=1e-6)  # rescaled by 1/p


def test_written_dare_merge_is_the_same_bytes_for_the_same_request(tmp_path: Path) -> None:
    a, b = (record(lora(tmp_path / n, rank=4, alpha=8, seed=s), n) for n, s in (("a", 1), ("b", 2)))
    plan = plan_merge([a, b], [0.5, 0.5], "dare_ties", max_rank=16, params={"density": 0.5, "seed": 4})
    first, _ = build_merge(plan, tmp_path / "one" / plan.key)
    second, _ = build_merge(plan, tmp_path / "two" / plan.key)
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_unequal_ranks_are_refused_with_the_reason(tmp_path: Path, method: str) -> None:
    a = lora(tmp_path / "a", rank=4, alpha=8, seed=1)
    b = lora(tmp_path / "b", rank=2, alpha=4, seed=2)
    for attempt in (lambda: merge_factors([load_factors(a), load_factors(b)], [0.5, 0.5], method, max_rank=16),
                    lambda: plan_merge([record(a, "a"), record(b, "b")], [0.5, 0.5], method, max_rank=16)):
        with pytest.raises(Unprocessable) as caught:
            attempt()
        assert caught.value.status == 422 and caught.value.code == "rank_mismatch"
        message = str(caught.value)
        assert f"{method} merge needs equal ranks" in message and "entry by entry" in message
        assert "a r=4" in message and "b r=2" in message and "use cat or svd" in message


@pytest.mark.parametrize(("method", "params", "fragment"), [
    ("ties", {"density": 0.0}, "density must be a number in (0, 1]"),
    ("ties", {"density": 1.01}, "density must be a number in (0, 1]"),
    ("ties", {"density": True}, "density must be a number"),
    ("ties", {"majority": "most"}, "majority must be one of total, frequency"),
    ("dare_linear", {"seed": -1}, "seed must be an integer"),
    ("dare_linear", {"seed": 2.0}, "seed must be an integer"),
    ("dare_linear", {"majority": "total"}, "does not take majority"),
    ("ties", {"seed": 0}, "does not take seed"),
    ("linear", {"density": 0.5}, "does not take density"),
])
def test_bad_parameters_are_400_naming_them(tmp_path: Path, method: str, params: dict[str, object],
                                            fragment: str) -> None:
    a = record(lora(tmp_path / "a", rank=4, alpha=8, seed=1), "a")
    b = record(lora(tmp_path / "b", rank=4, alpha=8, seed=2), "b")
    with pytest.raises(InvalidRequest) as caught:
        plan_merge([a, b], [0.5, 0.5], method, max_rank=16, params=params)
    assert caught.value.status == 400 and fragment in str(caught.value)
    assert caught.value.param == next(iter(params))


def test_every_parameter_enters_the_cache_key(tmp_path: Path) -> None:
    a = record(lora(tmp_path / "a", rank=4, alpha=8, seed=1), "a")
    b = record(lora(tmp_path / "b", rank=4, alpha=8, seed=2), "b")

    def key(method: str, **params: object) -> str:
        return plan_merge([a, b], [0.6, 0.4], method, max_rank=16, params=params).key

    ties = key("ties")
    assert ties == key("ties", density=0.5, majority="total")  # the defaults, named or not, are one merge
    assert len({ties, key("ties", density=0.4), key("ties", majority="frequency"), key("linear")}) == 4
    dare = key("dare_ties", density=0.5, seed=0)
    assert dare == key("dare_ties")
    assert len({dare, key("dare_ties", seed=1), key("dare_ties", density=0.6), key("dare_ties", majority="frequency"),
                key("dare_linear"), ties}) == 6
    plan = plan_merge([a, b], [0.6, 0.4], "dare_ties", max_rank=16, params={"seed": 3})
    assert dict(plan.params) == {"density": 0.5, "majority": "total", "seed": 3}
    assert plan.info()["params"] == {"density": 0.5, "majority": "total", "seed": 3}
