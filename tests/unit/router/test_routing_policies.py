"""select and average on given candidates (the router's search is tested separately)."""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType

import pytest

from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest, NotFound
from loragate.router.grammar import parse_policy
from loragate.router.policies import POLICIES, round_weights, similarity_weights
from loragate.router.types import AdapterWeight, RouterConfig, RoutingQuery


def record(name: str) -> AdapterRecord:
    return AdapterRecord(name=name, base_model="tiny-llama", rank=8, alpha=16, target_modules=("q_proj",),
                         use_rslora=False, sha256="0" * 64, path=Path("/x"), size_bytes=1, created_at=0.0)


ADAPTERS = MappingProxyType({n: record(n) for n in ("spouses", "birthplaces", "cooking")})
CANDIDATES = (("spouses", 0.62), ("birthplaces", 0.58), ("cooking", 0.12))
CONFIG = RouterConfig(min_score=0.3, k=2, weight_step=0.05)


async def decide(text: str, candidates: tuple[tuple[str, float], ...] = CANDIDATES):  # type: ignore[no-untyped-def]
    spec = parse_policy(text, source="header")
    policy = POLICIES[spec.name](CONFIG)
    policy.check_params(spec)
    return await policy.decide(RoutingQuery("q", spec, ADAPTERS, candidates))


async def test_select_takes_the_top_adapter_above_min_score() -> None:
    decision = await decide("select")
    assert decision.adapters == (AdapterWeight("spouses", 1.0),) and not decision.fallback
    low = await decide("select;min_score=0.7")
    assert low.is_base and low.fallback


async def test_select_on_an_empty_registry_is_base_not_an_error() -> None:
    decision = await decide("select", candidates=())
    assert decision.is_base and decision.fallback


async def test_average_top_k_uniform_and_rounded_softmax() -> None:
    uniform = await decide("average;k=2;weights=uniform;method=cat")
    assert uniform.adapters == (AdapterWeight("spouses", 0.5), AdapterWeight("birthplaces", 0.5))
    assert uniform.method == "cat"
    soft = await decide("average;k=3;weights=softmax;temperature=0.05;min_score=0.0")
    weights = [a.weight for a in soft.adapters]
    assert math.isclose(sum(weights), 1.0)
    assert all(abs(w / 0.05 - round(w / 0.05)) < 1e-9 for w in weights), weights  # on the 0.05 grid
    assert [a.name for a in soft.adapters] == ["spouses", "birthplaces"]  # cooking rounds to 0 and is dropped


async def test_average_keeps_only_adapters_above_min_score() -> None:
    one = await decide("average;k=3;min_score=0.6")
    assert one.adapters == (AdapterWeight("spouses", 1.0),) and one.method is None
    none = await decide("average;min_score=0.9")
    assert none.is_base and none.fallback


async def test_average_explicit_adapters_and_weights() -> None:
    decision = await decide('average;adapters="cooking spouses";weights="3 1";method=linear')
    assert decision.adapters == (AdapterWeight("cooking", 0.75), AdapterWeight("spouses", 0.25))
    assert decision.method == "linear"


async def test_average_unknown_explicit_adapter_is_404() -> None:
    with pytest.raises(NotFound, match="'ghost'"):
        await decide('average;adapters="spouses ghost"')


@pytest.mark.parametrize(("text", "fragment"), [
    ("select;min_score=1.5", "out of range"),
    ("average;k=0", "out of range"),
    ("average;k=9", "out of range"),
    ("average;k=1.5", "must be an integer"),
    ("average;temperature=0", "out of range"),
    ("average;temperature=-1", "out of range"),
    ('average;weights="0.5 0.5"', "explicit weights need adapters"),
    ('average;adapters="spouses cooking";weights="1 -1"', "non-negative"),
    ('average;adapters="spouses cooking";weights="1"', "same length"),
    ("average;weights=magic", "uniform, score, softmax or numbers"),
    ('average;adapters="a a"', "distinct"),
    ("select;k=2", "does not take"),
    ("average;method=ties;density=0", r"density must be a number in \(0, 1\], got 0"),
    ("average;method=ties;density=1.5", "density must be a number in"),
    ("average;method=ties;density=half", "density must be a number in"),
    ("average;method=ties;majority=most", "majority must be one of total, frequency, got 'most'"),
    ("average;method=dare_ties;seed=-1", "seed must be an integer"),
    ("average;method=dare_linear;seed=1.5", "seed must be an integer"),
    ("average;method=ties;seed=0", "'ties': does not take seed; its parameters: density, majority"),
    ("average;method=cat;density=0.5", "'cat': does not take density; its parameters: none"),
    ("average;method=linear;target_rank=4", "does not take target_rank"),
    ("average;method=svd;target_rank=0", "target_rank must be a positive integer"),
    ("average;method=ties;top=3", "does not take"),
])
async def test_out_of_range_parameters_are_400(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment) as caught:
        await decide(text)
    assert caught.value.status == 400


async def test_average_carries_the_merge_parameters_it_was_asked_for() -> None:
    ties = await decide("average;k=2;method=ties;weights=uniform;density=0.5;majority=frequency")
    assert ties.method == "ties" and dict(ties.merge_params) == {"density": 0.5, "majority": "frequency"}
    dare = await decide("average;k=2;method=dare_ties;weights=uniform;density=0.3;seed=7")
    assert dict(dare.merge_params) == {"density": 0.3, "seed": 7}
    plain = await decide("average;k=2;method=cat;weights=uniform")
    assert dict(plain.merge_params) == {}
    single = await decide("average;k=3;min_score=0.6;method=ties;density=0.5")  # one adapter: nothing merges
    assert single.method is None and dict(single.merge_params) == {}


def test_similarity_weights() -> None:
    assert similarity_weights([0.6, 0.2], "score", 1) == pytest.approx([0.75, 0.25])
    assert similarity_weights([-0.5, -0.2], "score", 1) == pytest.approx([0.5, 0.5])
    soft = similarity_weights([0.6, 0.5], "softmax", 0.05)
    assert soft[0] / soft[1] == pytest.approx(math.exp(2.0))


async def test_weight_step_zero_keeps_exact_softmax_weights() -> None:
    spec = parse_policy("average;k=2;weights=softmax;temperature=0.05", source="header")
    policy = POLICIES["average"](RouterConfig(weight_step=0.0))
    decision = await policy.decide(RoutingQuery("q", spec, ADAPTERS, CANDIDATES))
    assert [a.weight for a in decision.adapters] == pytest.approx(similarity_weights([0.62, 0.58], "softmax", 0.05))


def test_round_weights_snaps_to_the_grid_and_sums_to_one() -> None:
    for raw in ([0.33, 0.33, 0.34], [0.62, 0.38], [0.9, 0.07, 0.03], [5.0, 3.0, 2.0], [1.0]):
        out = round_weights(raw, 0.05)
        assert sum(out) == pytest.approx(1.0, abs=1e-12)
        assert all(abs(w / 0.05 - round(w / 0.05)) < 1e-9 for w in out), out
    assert round_weights([0.62, 0.38], 0.05) == [0.6, 0.4]
    assert round_weights([0.5, 0.5], 0.05) == [0.5, 0.5]
    assert round_weights([0.98, 0.02], 0.05) == [1.0, 0.0]  # a negligible adapter drops out
    assert round_weights([0.612, 0.388], 0.05) == round_weights([0.59, 0.41], 0.05)  # nearby decisions share
    assert round_weights([0.5, 0.5], 0.3) == [0.5, 0.5]  # no grid sums to 1: round, then renormalise
    with pytest.raises(InvalidRequest, match="weight step"):
        round_weights([0.5, 0.5], 0.0)
