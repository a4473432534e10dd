"""The cascade's decision logic: when the fast tier decides, when the precise one re-ranks, what each reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from loragate.router.compositional import Probe, SegmentDetector
from loragate.router.grammar import parse_policy
from loragate.router.index import DescriptorIndex
from loragate.router.search import CascadeSearcher, Escalation, IndexSearcher, Tier
from loragate.router.service import Router, tail_words
from loragate.router.types import RouterConfig
from tests.unit.router.test_index import record


class TableEncoder:
    """Vectors from a table (2-d, normalised here); records which texts it was asked to embed."""

    def __init__(self, table: Mapping[str, Sequence[float]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        self.asked.extend(texts)
        rows = np.asarray([self.table[t] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


REGISTRY = {"a": record("a", "A"), "b": record("b", "B")}
DESCRIPTORS = {"A": (1.0, 0.0), "B": (0.0, 1.0)}
# the fast tier sees "tie" halfway between a and b; the precise one sees it as b
FAST = TableEncoder({**DESCRIPTORS, "clearly a": (1.0, 0.05), "tie": (1.0, 1.0), "weak": (1.0, -3.0),
                     "part a": (1.0, 0.0), "part b": (0.0, 1.0)})
PRECISE = TableEncoder({**DESCRIPTORS, "clearly a": (1.0, 0.0), "tie": (0.2, 0.98), "weak": (0.0, 1.0)})


async def cascade(tmp_path: Path, escalation: Escalation) -> tuple[CascadeSearcher, TableEncoder, TableEncoder]:
    fast, precise = TableEncoder(FAST.table), TableEncoder(PRECISE.table)
    tiers = [Tier(name, encoder, DescriptorIndex(encoder, tmp_path / name, name))  # type: ignore[arg-type]
             for name, encoder in (("static", fast), ("minilm", precise))]
    searcher = CascadeSearcher(tiers[0], tiers[1], escalation)
    await searcher.sync(REGISTRY)
    fast.asked.clear()
    precise.asked.clear()
    return searcher, fast, precise


def test_escalation_rule() -> None:
    rule = Escalation(margin=0.1, floor=0.4)
    assert not rule.ambiguous((("a", 0.9), ("b", 0.5)))  # clear and strong: the fast tier decides
    assert rule.ambiguous((("a", 0.9), ("b", 0.85)))  # the two best too close
    assert rule.ambiguous((("a", 0.35), ("b", 0.0)))  # the best too weak to tell an adapter from none
    assert not rule.ambiguous((("a", 0.45),))  # one adapter only: no margin to read
    assert not rule.ambiguous(())  # nothing has descriptors: the precise tier has nothing either
    assert not Escalation().ambiguous((("a", 0.1), ("b", 0.1)))  # margin 0, floor -1: never escalates
    for bad in ({"margin": -0.1}, {"margin": 3.0}, {"floor": 1.5}, {"floor_gap": -0.1}, {"floor_gap": 2.5}):
        with pytest.raises(ValueError):
            Escalation(**bad)


def test_the_floor_applies_only_to_a_best_adapter_no_clearer_than_the_rest() -> None:
    rule = Escalation(floor=0.5, floor_gap=0.1)
    assert rule.ambiguous((("a", 0.35), ("b", 0.3), ("c", 0.28)))  # weak and flat: maybe no adapter applies
    assert not rule.ambiguous((("a", 0.35), ("b", 0.2), ("c", 0.2)))  # weak but singled out: the fast tier decides
    assert not rule.ambiguous((("a", 0.6), ("b", 0.59)))  # above the floor, and no margin set
    assert rule.ambiguous((("a", 0.35),))  # one adapter: no gap to read, the floor alone decides
    assert Escalation(floor=0.5).ambiguous((("a", 0.35), ("b", 0.0)))  # gap 2 (the default): the floor alone


async def test_a_clear_prompt_never_reaches_the_precise_tier(tmp_path: Path) -> None:
    searcher, fast, precise = await cascade(tmp_path, Escalation(margin=0.1, floor=0.5))
    found = await searcher.find("clearly a", ["part a", "part b"], 5, REGISTRY)
    assert found.tier == "static" and found.candidates[0][0] == "a"
    assert found.detected == found.candidates  # detection reads the fast tier
    assert [p[0][0] for p in found.parts] == ["a", "b"]  # clauses searched in the same fast batch
    assert fast.asked == ["clearly a", "part a", "part b"] and precise.asked == []
    assert searcher.decided == {"static": 1, "minilm": 0}


async def test_an_ambiguous_prompt_is_re_ranked_by_the_precise_tier_alone(tmp_path: Path) -> None:
    searcher, _, precise = await cascade(tmp_path, Escalation(margin=0.1, floor=0.5))
    found = await searcher.find("tie", ["part a", "part b"], 5, REGISTRY)
    assert found.tier == "minilm" and found.candidates[0][0] == "b"
    assert found.detected[0][1] == pytest.approx(found.detected[1][1], abs=1e-5)  # the fast tier's near tie
    assert precise.asked == ["tie"]  # only the prompt: its clauses keep their fast results
    weak = await searcher.find("weak", [], 5, REGISTRY)  # fast best score below the floor
    assert weak.tier == "minilm" and weak.candidates[0] == ("b", pytest.approx(1.0, abs=1e-5))
    assert searcher.decided == {"static": 0, "minilm": 2}


async def test_candidates_are_limited_to_the_adapters_asked_for(tmp_path: Path) -> None:
    searcher, _, precise = await cascade(tmp_path, Escalation(margin=0.1, floor=0.5))
    found = await searcher.find("tie", [], 5, {"a": REGISTRY["a"]})
    assert [name for name, _ in found.candidates] == ["a"]
    assert precise.asked == []  # one candidate left: nothing to disambiguate


async def test_similarity_is_read_from_the_precise_tier(tmp_path: Path) -> None:
    searcher, _, precise = await cascade(tmp_path, Escalation())
    assert await searcher.similarities(["tie"], ["b"]) == [pytest.approx(0.98 / np.hypot(0.2, 0.98), abs=1e-5)]
    assert precise.asked == ["tie"]


async def test_the_router_reports_the_tier_and_detects_on_the_fast_tier(tmp_path: Path) -> None:
    searcher, _, _ = await cascade(tmp_path, Escalation(margin=0.1, floor=0.5))

    class Clauses(SegmentDetector):
        def probe(self, prompt: str) -> Probe:
            return Probe(prompt, (("part a", "part b"),))

    router = Router(parse_policy("base", source="default"), searcher=searcher, detector=Clauses(min_score=0.5))
    select = parse_policy("select;min_score=0.3", source="header")
    clear = await router.decide("clearly a", select, REGISTRY)
    assert (clear.tier, clear.adapters[0].name, clear.compositional) == ("static", "a", True)
    tie = await router.decide("tie", select, REGISTRY)
    assert (tie.tier, tie.adapters[0].name) == ("minilm", "b")
    assert (await router.decide("clearly a", parse_policy("pin;adapter=a", source="header"), REGISTRY)).tier == ""


async def test_one_tier_searches_prompt_and_clauses_in_one_batch(tmp_path: Path) -> None:
    encoder = TableEncoder(FAST.table)
    index = DescriptorIndex(encoder, tmp_path, "fast")  # type: ignore[arg-type]
    searcher = IndexSearcher(Tier("static", encoder, index))  # type: ignore[arg-type]
    await searcher.sync(REGISTRY)
    encoder.asked.clear()
    found = await searcher.find("tie", ["part b"], 5, REGISTRY)
    assert encoder.asked == ["tie", "part b"] and found.tier == "static" and found.parts[0][0][0] == "b"


def test_routing_reads_the_tail_of_a_long_prompt() -> None:
    assert tail_words("short prompt", 4) == "short prompt"
    assert tail_words("system: be nice. " * 10 + "who is X married to?", 6) == "nice. who is X married to?"
    assert tail_words("a" * 500, 4) == "a" * 500  # one long word is one word
    exactly = " ".join(["w"] * 20)
    assert tail_words(exactly, 20) == exactly


async def test_the_router_searches_and_detects_on_the_tail(tmp_path: Path) -> None:
    searcher, fast, _ = await cascade(tmp_path, Escalation(margin=0.1, floor=0.5))
    fast.table = {**fast.table, "history the end": (1.0, 0.05)}
    router = Router(parse_policy("base", source="default"), RouterConfig(max_words=3), searcher=searcher)
    decision = await router.decide("long long history the end", parse_policy("select", source="h"), REGISTRY)
    assert fast.asked == ["history the end"] and decision.adapters[0].name == "a"


async def test_chain_searches_for_its_candidates_unless_given_a_list(tmp_path: Path) -> None:
    """chain is not a searching policy (it runs without routing) but ranks its candidates by the index."""
    searcher, _, _ = await cascade(tmp_path, Escalation())
    router = Router(parse_policy("base", source="default"), searcher=searcher)
    assert router.searches(parse_policy("chain", source="h"))
    assert not router.searches(parse_policy('chain;adapters="a b"', source="h"))
    assert not router.searches(parse_policy("pin;adapter=a", source="h"))
    assert router.searches(parse_policy("select", source="h"))
    decision = await router.decide("clearly a", parse_policy("chain;k=1", source="h"), REGISTRY)
    assert decision.chain is not None and decision.chain.candidates == ("a",)
