"""The learned auto's pure logic: decayed tallies, Beta posteriors, the context cap, exploit/explore, the
operators' views, and AutoPolicy against a fake of the router's Arms."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loragate.errors import InvalidRequest, UpstreamError
from loragate.router.auto import (
    OTHER,
    AutoConfig,
    AutoPolicy,
    AutoStats,
    Observation,
    Posterior,
    Signals,
    Tally,
    context_of,
    exploit,
    explore,
    rebuild,
    views,
)
from loragate.router.types import PolicySpec, RoutingDecision, RoutingQuery

HOUR = 3600.0
NOW = 1_000_000.0
ARMS = ("base", "select", "chain")
CONFIG = AutoConfig(arms=tuple(PolicySpec(a) for a in ARMS), half_life_s=HOUR)


def obs(arm: str, score: float, at: float = NOW, context: str = "a/single", served: bool = True,
        weight: float = 1.0) -> Observation:
    return Observation(context, arm, score, at, served, weight)


def fed(observations: list[Observation], config: AutoConfig = CONFIG) -> AutoStats:
    """The statistics after ``observations`` in the order given (live arrival order)."""
    stats = AutoStats()
    for o in observations:
        stats = stats.observe(o, config)
    return stats


def graded(arm: str, successes: int, failures: int, context: str = "a/single") -> list[Observation]:
    return [obs(arm, 1.0, context=context)] * successes + [obs(arm, 0.0, context=context)] * failures


# -- Tally ---------------------------------------------------------------------------------------

def test_a_half_life_halves_the_weight() -> None:
    tally = Tally().add(obs("base", 1.0, at=NOW), HOUR)
    later = tally.decayed(NOW + HOUR, HOUR)
    assert later.successes == pytest.approx(0.5) and later.failures == 0 and later.at == NOW + HOUR
    assert tally.decayed(NOW + 2 * HOUR, HOUR).successes == pytest.approx(0.25)
    assert tally.decayed(NOW - HOUR, HOUR) == tally  # never decays backwards
    older = Tally().add(obs("base", 1.0, at=NOW), HOUR).add(obs("base", 0.0, at=NOW - HOUR), HOUR)
    assert (older.successes, older.failures, older.at) == pytest.approx((1.0, 0.5, NOW))  # arrived late, still aged


def test_the_sums_do_not_depend_on_the_order_of_additions() -> None:
    rng = random.Random(7)
    observations = [obs("base", rng.choice([0.0, 0.3, 1.0]), at=NOW + rng.uniform(-5 * HOUR, 5 * HOUR))
                    for _ in range(60)]
    sums = []
    for _ in range(5):
        shuffled = rng.sample(observations, len(observations))
        tally = Tally()
        for o in shuffled:
            tally = tally.add(o, HOUR)
        at_end = tally.decayed(NOW + 6 * HOUR, HOUR)
        sums.append((at_end.successes, at_end.failures))
    for s, f in sums[1:]:
        assert s == pytest.approx(sums[0][0], abs=1e-9) and f == pytest.approx(sums[0][1], abs=1e-9)
    assert sums[0][0] > 0 and sums[0][1] > 0


def test_a_negative_weight_takes_an_observation_back() -> None:
    kept = Tally().add(obs("base", 0.0, at=NOW - HOUR), HOUR)
    both = kept.add(obs("base", 1.0, at=NOW - 2 * HOUR), HOUR).add(obs("base", 0.4, at=NOW), HOUR)
    undone = both.add(obs("base", 1.0, at=NOW - 2 * HOUR, weight=-1.0), HOUR)
    expected = kept.add(obs("base", 0.4, at=NOW), HOUR)
    assert undone.successes == pytest.approx(expected.successes, abs=1e-12)
    assert undone.failures == pytest.approx(expected.failures, abs=1e-12)
    assert undone.successes < both.successes


# -- Posterior -----------------------------------------------------------------------------------

def test_a_fractional_score_is_part_success_part_failure() -> None:
    stats = AutoStats().observe(obs("base", 0.7), CONFIG)
    tally = stats.cells[("a/single", "base")]
    assert (tally.successes, tally.failures) == pytest.approx((0.7, 0.3))
    posterior = stats.posterior("a/single", "base", NOW, CONFIG)
    assert (posterior.a, posterior.b, posterior.n) == pytest.approx((1.7, 1.3, 1.0))  # on the Beta(1, 1) prior
    assert posterior.mean == pytest.approx(1.7 / 3.0)


def test_the_interval_contains_the_mean_and_narrows_with_evidence() -> None:
    widths = []
    for n in (0, 4, 40, 400):
        p = Posterior(1 + 0.8 * n, 1 + 0.2 * n, n)
        low, high = p.interval(0.95)
        assert 0 <= low < p.mean < high <= 1
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 5
    p = Posterior(9.0, 3.0, 10.0)
    assert p.interval(0.99)[0] < p.interval(0.9)[0]


# -- contexts ------------------------------------------------------------------------------------

def test_contexts_beyond_the_cap_share_other() -> None:
    config = AutoConfig(arms=CONFIG.arms, max_contexts=2, half_life_s=HOUR)
    stats = fed([obs("base", 1.0, context="x"), obs("base", 1.0, context="y"), obs("base", 0.0, context="z"),
                 obs("base", 1.0, context="x")], config)
    assert stats.contexts == ("x", "y", OTHER)
    assert ("z", "base") not in stats.cells and stats.cells[(OTHER, "base")].failures == pytest.approx(1.0)
    assert stats.cells[("x", "base")].successes == pytest.approx(2.0)
    assert [stats.bucket(c, config) for c in ("x", "y", "z", "w", OTHER)] == ["x", "y", OTHER, OTHER, OTHER]
    assert AutoStats().bucket("z", config) == "z"


@pytest.mark.parametrize(("features", "candidates", "compositional", "context"), [
    (("nearest",), (("a", 0.9), ("b", 0.5)), False, "a"),
    (("nearest",), (("a", 0.2),), False, "none"),  # below min_score
    (("nearest",), (), None, "none"),
    (("compositional",), (("a", 0.9),), True, "compositional"),
    (("compositional",), (("a", 0.9),), False, "single"),
    (("compositional",), (), None, "unrouted"),
    (("pair",), (("b", 0.9), ("a", 0.5), ("c", 0.4)), True, "a+b"),  # the top two, sorted
    (("pair",), (("b", 0.9), ("a", 0.1)), False, "b"),  # the second is below min_score
    (("pair",), (("b", 0.1),), False, "none"),
    (("nearest", "compositional"), (("a", 0.9),), False, "a/single"),
    ((), (("a", 0.9),), False, "all"),
])
def test_context_of_each_feature(features: tuple[str, ...], candidates: tuple[tuple[str, float], ...],
                                 compositional: bool | None, context: str) -> None:
    assert context_of(features, Signals(candidates, compositional, min_score=0.3)) == context


# -- exploit / explore ---------------------------------------------------------------------------

def test_a_context_without_evidence_gets_the_default() -> None:
    stats = fed(graded("select", 10, 0, context="elsewhere"))
    assert exploit(stats, "a/single", ARMS, NOW, CONFIG) == ("base", "default")
    assert exploit(AutoStats(), "a/single", ARMS, NOW, CONFIG) == ("base", "default")


def test_a_clearly_better_arm_wins_after_evidence() -> None:
    stats = fed(graded("base", 2, 18) + graded("select", 18, 2) + graded("chain", 10, 10))
    assert exploit(stats, "a/single", ARMS, NOW, CONFIG) == ("select", "exploit")
    one_lucky = fed(graded("base", 5, 5) + graded("select", 1, 0))  # one outcome never switches
    assert exploit(one_lucky, "a/single", ARMS, NOW, CONFIG) == ("base", "exploit")


def test_the_cheapest_arm_not_worse_than_the_best_is_chosen() -> None:
    stats = fed(graded("select", 15, 5) + graded("chain", 15, 5) + graded("base", 0, 20))
    assert exploit(stats, "a/single", ARMS, NOW, CONFIG) == ("select", "exploit")
    assert exploit(stats, "a/single", ("chain", "select", "base"), NOW, CONFIG) == ("chain", "exploit")


def test_thompson_stays_within_the_arms_and_favours_the_better_posterior() -> None:
    stats = fed(graded("base", 3, 17) + graded("select", 17, 3))
    rng = random.Random(0)
    assert explore(stats, "a/single", [], NOW, CONFIG, rng) is None
    draws = Counter(explore(stats, "a/single", ["base", "select"], NOW, CONFIG, rng) for _ in range(500))
    assert set(draws) <= {"base", "select"} and draws["select"] > 400
    only = {explore(stats, "a/single", ["chain"], NOW, CONFIG, rng) for _ in range(20)}
    assert only == {"chain"}  # an arm without evidence is still drawn when it is the only one


def test_views_report_regret_against_the_best_arm() -> None:
    served = graded("base", 4, 6)  # auto's own choices: 40% success
    shadows = [obs("select", 1.0, served=False)] * 16 + [obs("select", 0.0, served=False)] * 4
    (view,) = views(fed(served + shadows), NOW, CONFIG)
    assert view.context == "a/single" and view.best_arm == "select"
    assert view.served == pytest.approx(10) and view.served_success == pytest.approx(5 / 12)  # on the Beta(1, 1) prior
    assert view.best_mean == pytest.approx(17 / 22)
    assert view.regret == pytest.approx(17 / 22 - 5 / 12)
    rows = {a.arm: a for a in view.arms}
    assert rows["select"].served == 0 and rows["select"].observations == pytest.approx(20)
    assert rows["chain"].observations == 0 and rows["chain"].mean == pytest.approx(0.5)
    assert (view.choice, view.reason) == ("select", "exploit")
    (unserved,) = views(fed(shadows), NOW, CONFIG)
    assert unserved.served_success is None and unserved.regret is None
    (failing,) = views(fed(graded("base", 0, 5)), NOW, CONFIG)  # untried arms sit at the prior's 0.5 ...
    assert failing.best_arm == "base" and failing.regret == pytest.approx(0.0)  # ... and are not the "best" arm


def test_rebuild_sorts_by_time_and_equals_the_live_sums() -> None:
    observations = [obs("base", 1.0, at=NOW - i * 60.0, context=f"c{i % 3}") for i in range(12)]
    live = fed(observations)
    rebuilt = rebuild(list(reversed(observations)), CONFIG)
    assert set(live.cells) == set(rebuilt.cells)
    for key, tally in live.cells.items():
        a, b = tally.decayed(NOW, HOUR), rebuilt.cells[key].decayed(NOW, HOUR)
        assert (a.successes, a.failures) == pytest.approx((b.successes, b.failures), abs=1e-9)
    assert rebuilt.contexts == ("c2", "c1", "c0")  # the oldest observation's context first


# -- AutoPolicy ----------------------------------------------------------------------------------

class FakeArms:
    """The router's side: ``select`` needs candidates; ``failing`` arms raise."""

    def __init__(self, failing: dict[str, Exception] | None = None) -> None:
        self.failing = failing or {}
        self.ran: list[str] = []

    def needs_candidates(self, spec: PolicySpec) -> bool:
        return spec.name == "select"

    async def run(self, query: RoutingQuery) -> RoutingDecision:
        arm = query.policy.text()
        self.ran.append(arm)
        if arm in self.failing:
            raise self.failing[arm]
        return RoutingDecision("auto", arm, candidates=query.candidates)


def policy(stats: AutoStats | None = None, **config: float) -> AutoPolicy:
    cfg = AutoConfig(arms=CONFIG.arms, half_life_s=HOUR, **config)  # type: ignore[arg-type]
    fixed = stats or AutoStats()
    return AutoPolicy(cfg, lambda: fixed, min_score=0.3, rng=random.Random(1), clock=lambda: NOW)


def query(candidates: tuple[tuple[str, float], ...] = (("a", 0.9),)) -> RoutingQuery:
    return RoutingQuery("q", PolicySpec("auto"), {}, candidates=candidates, compositional=False)


async def test_a_cold_start_runs_the_default_arm() -> None:
    arms = FakeArms()
    decision = await policy().decide(query(), arms)
    assert decision.policy_applied == "base" and arms.ran == ["base"]
    assert decision.auto is not None
    assert (decision.auto.context, decision.auto.arm, decision.auto.reason) == ("a/single", "base", "default")
    assert decision.auto.runnable == ARMS


async def test_evidence_moves_the_choice_and_an_arm_that_cannot_run_is_skipped() -> None:
    stats = fed(graded("base", 1, 19) + graded("select", 19, 1) + graded("chain", 18, 2))
    chosen = await policy(stats).decide(query(), FakeArms())
    assert chosen.auto is not None and (chosen.auto.arm, chosen.auto.reason) == ("select", "exploit")
    arms = FakeArms({"select": InvalidRequest("nothing to select")})
    decision = await policy(stats).decide(query(), arms)
    assert arms.ran == ["select", "chain"] and decision.policy_applied == "chain"
    assert decision.auto is not None and decision.auto.runnable == ("base", "chain")


async def test_a_searching_arm_is_not_runnable_without_candidates() -> None:
    stats = fed(graded("base", 1, 19, context="none/single") + graded("select", 19, 1, context="none/single"))
    arms = FakeArms()
    decision = await policy(stats).decide(query(candidates=()), arms)
    assert "select" not in arms.ran and decision.auto is not None
    assert decision.auto.context == "none/single" and "select" not in decision.auto.runnable


async def test_explore_rate_one_serves_a_thompson_draw() -> None:
    decision = await policy(explore_rate=1.0).decide(query(), FakeArms())
    assert decision.auto is not None and decision.auto.reason == "explore" and decision.auto.arm in ARMS


async def test_no_runnable_arm_is_a_400_and_a_5xx_is_not_skipped() -> None:
    everything = FakeArms({a: InvalidRequest("no") for a in ARMS})
    with pytest.raises(InvalidRequest, match="none of the configured arms") as refused:
        await policy().decide(query(), everything)
    assert refused.value.status == 400 and everything.ran == ["base", "select", "chain"]
    broken = FakeArms({"base": UpstreamError("down")})
    with pytest.raises(UpstreamError):
        await policy().decide(query(), broken)
    assert broken.ran == ["base"]


def test_evidence_only_of_arms_the_request_cannot_run_is_still_a_cold_start() -> None:
    stats = fed(graded("select", 5, 0))  # known: select, which this request cannot run (no candidates)
    assert exploit(stats, "a/single", ["base", "chain"], NOW, CONFIG) == ("base", "default")
    assert exploit(stats, "a/single", ["base", "select", "chain"], NOW, CONFIG) == ("select", "exploit")
