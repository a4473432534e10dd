"""The two-hop builder's pure parts: the oracle's bounded retraining rule and what each result is measured on."""

from __future__ import annotations

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
