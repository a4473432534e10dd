"""The two-hop builder's pure parts: the oracle's bounded retraining rule and what each result is measured on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from examples.twohop import world as w
from examples.twohop.build import ORACLE_EXTRA_ROUNDS, base_eval_sets, lora_eval_sets, train_until_holds


class FakeTrainer:
    """A model whose measured rate is read from a script; each training round advances it by one."""

    def __init__(self, rates: list[float]) -> None:
        self.rates, self.rounds = rates, list[int]()

    def measure(self) -> float:
        return self.rates[len(self.rounds)]

    def train_more(self, round_: int) -> None:
        self.rounds.append(round_)


def test_a_model_that_holds_is_not_trained_further() -> None:
    fake = FakeTrainer([0.9])
    assert train_until_holds(fake.measure, fake.train_more, 0.8, 3) == [0.9]
    assert fake.rounds == []  # the shipped seed's oracle (1.0) builds exactly as before the loop existed


def test_training_stops_at_the_first_round_that_holds() -> None:
    fake = FakeTrainer([0.77, 0.79, 0.8, 1.0])
    assert train_until_holds(fake.measure, fake.train_more, 0.8, 3) == [0.77, 0.79, 0.8]  # >= threshold holds
    assert fake.rounds == [1, 2]


def test_training_is_bounded_and_reports_a_control_that_never_holds() -> None:
    fake = FakeTrainer([0.5] * 10)
    history = train_until_holds(fake.measure, fake.train_more, 0.8, ORACLE_EXTRA_ROUNDS)
    assert fake.rounds == list(range(1, ORACLE_EXTRA_ROUNDS + 1))
    assert history == [0.5] * (ORACLE_EXTRA_ROUNDS + 1)  # the caller's control check then fails the build


def test_result_sets_are_what_the_report_counts() -> None:
    kit = w.make_kit(w.SMALL, 0)
    pools = w.pretraining_pools(kit)
    base = {k: len(v) for k, v in base_eval_sets(kit, pools).items()}
    people, held = w.SMALL.eval_people, w.SMALL.base_worlds * w.SMALL.people_per_world // 2
    assert base == {"own_facts": 2 * 3 * w.SMALL.base_worlds * w.SMALL.people_per_world,
                    "own_chains_taught_steps": 3 * held, "own_chains_unseen_steps": 3 * held,
                    "own_chains_unseen_direct": 3 * held, "eval_hop1": 3 * people, "eval_hop2": 3 * people,
                    "eval_twohop-direct": 3 * people, "eval_twohop-steps": 3 * people}
    oracle = lora_eval_sets(kit, pools, w.hop_examples(kit.evaluation, "hop1") + w.hop_examples(kit.evaluation, "hop2"))
    assert len(oracle["own_facts"]) == 2 * 3 * people and not any(e.kind.endswith("statement")
                                                                  for e in oracle["own_facts"])


def test_the_seed_benchmark_reports_each_control_per_seed_and_a_failed_one(tmp_path: Path) -> None:
    from loragate.loadtest import bench_kit

    def built(oracle: float, hop2: float) -> dict[str, Any]:
        controls = {"oracle_twohop_steps": {"measured": oracle, "threshold": 0.8, "ok": oracle >= 0.8},
                    "hop_own_facts": {"measured": 1.0, "threshold": 0.9, "ok": True}}
        return {"controls": controls, "results": {"base": {"eval_hop2": hop2}}, "counts": {"base": {"eval_hop2": 48}},
                "oracle_rounds": {"extra": 0 if oracle >= 0.8 else 3,
                                  "measured": [{"twohop_steps": oracle}] * (1 if oracle >= 0.8 else 4)}}

    headline = bench_kit.write([0, 7], [built(1.0, 0.125), built(0.77, 0.104)], tmp_path)
    assert headline.startswith("small kit at seeds [0, 7]: controls failed at seeds [7]")
    text = (tmp_path / "kit.md").read_text()
    assert "| oracle_twohop_steps | 0.8 | 1.000 | 0.770 | 0.770 | **no** |" in text
    assert "| oracle extra training rounds |  | 0 | 3 |  |  |" in text
    assert "| base | eval_hop2 | 48 | 0.125 | 0.104 | 0.021 | 0.046 |" in text
    assert "seed 0: 1.000; seed 7: 0.770 -> 0.770 -> 0.770 -> 0.770." in text
