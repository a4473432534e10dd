"""The learned auto's live side on a real SQLite outcome log: the statistics kept live equal the ones a restart
rebuilds from the log; the configuration's validation; the arm a shadow explores; the `loragate auto` report."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from loragate.errors import ConfigError
from loragate.router.auto import AutoConfig, AutoStats, Tally
from loragate.router.types import AutoChoice, PolicySpec, RoutingDecision
from loragate.server.app import router_config
from loragate.server.auto import AutoLearner, auto_config, format_auto
from loragate.server.calls import CompletionCall
from loragate.server.outcomes import Feedback, OutcomeLog, OutcomeRecord, observation
from loragate.server.recorder import CompletionEvent
from loragate.server.settings import Settings
from tests.unit.server.test_outcomes import record

ARMS = ("base", "select", "chain")
CONFIG = AutoConfig(arms=tuple(PolicySpec(a) for a in ARMS))


def auto_record(rid: str, context: str, arm: str, **fields: Any) -> OutcomeRecord:
    return dataclasses.replace(record(rid, arm, **fields), auto_context=context, auto_arm=arm)


def assert_same(live: AutoStats, rebuilt: AutoStats, at: float) -> None:
    """Every (context, arm) tally equal within 1e-9, compared at one time (a cell emptied live counts as absent)."""
    for live_cells, rebuilt_cells in ((live.cells, rebuilt.cells), (live.served, rebuilt.served)):
        for key in set(live_cells) | set(rebuilt_cells):
            a = live_cells.get(key, Tally()).decayed(at, CONFIG.half_life_s)
            b = rebuilt_cells.get(key, Tally()).decayed(at, CONFIG.half_life_s)
            assert (a.successes, a.failures) == pytest.approx((b.successes, b.failures), abs=1e-9), key


async def test_the_live_statistics_equal_a_rebuild_from_the_log(tmp_path: Path) -> None:
    log = OutcomeLog(tmp_path / "o.sqlite3")
    learner = AutoLearner(CONFIG)
    log.observe(learner.observe)
    log.add(auto_record("g1", "a/single", "select", result="success"))  # graded by X-Expected-Answer
    log.add(auto_record("g2", "a/single", "base", result="failure"))
    log.add(auto_record("e5", "a/single", "chain", status=502))  # ungraded 5xx: the arm failed
    log.add(auto_record("u1", "b/compositional", "chain"))  # ungraded: nothing yet
    log.add(auto_record("sh", "a/single", "chain", kind="shadow", shadow_of="g1", result="success"))
    log.add(record("plain", "select", result="success"))  # auto did not choose: nothing
    stats = learner.stats
    assert ("b/compositional", "chain") not in stats.cells
    assert stats.cells[("a/single", "chain")].successes == pytest.approx(1.0, rel=1e-6)  # the shadow
    assert stats.cells[("a/single", "chain")].failures == pytest.approx(1.0, rel=1e-6)  # the 5xx
    assert ("a/single", "chain") in stats.served and stats.served[("a/single", "chain")].successes == 0
    assert sum(t.n for t in stats.served.values()) == pytest.approx(3.0, rel=1e-6)  # g1, g2, e5: not the shadow

    await log.feedback(Feedback.parse({"request_id": "u1", "score": 0.7}))
    await log.feedback(Feedback.parse({"request_id": "g2", "score": 0.9, "overwrite": True}))
    await log.feedback(Feedback.parse({"request_id": "e5", "success": True}))  # a late grade replaces the 5xx
    stats = learner.stats
    comp = stats.cells[("b/compositional", "chain")]
    assert (comp.successes, comp.failures) == pytest.approx((0.7, 0.3), rel=1e-6)
    base = stats.cells[("a/single", "base")]
    assert (base.successes, base.failures) == pytest.approx((0.9, 0.1), rel=1e-6)  # the expected grade taken back
    chain = stats.cells[("a/single", "chain")]
    assert (chain.successes, chain.failures) == pytest.approx((2.0, 0.0), abs=1e-6)
    assert set(stats.contexts) == {"a/single", "b/compositional"}

    restarted = AutoLearner(CONFIG)
    assert await restarted.rebuild(log) == 5  # g1, g2, e5, u1 and the shadow
    latest = max(t.at for t in (*stats.cells.values(), *restarted.stats.cells.values()))
    assert_same(stats, restarted.stats, latest)
    await log.close()


def settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(data_dir=tmp_path, **fields)


def arms_of(s: Settings) -> list[str]:
    config = auto_config(s, router_config(s))
    assert config is not None
    return [a.text() for a in config.arms]


def test_auto_config_puts_the_default_first_once_and_drops_what_cannot_run(tmp_path: Path) -> None:
    assert auto_config(settings(tmp_path, auto_arms=[]), router_config(settings(tmp_path))) is None
    assert arms_of(settings(tmp_path)) == ["base", "select", "average;method=cat", "chain"]
    assert arms_of(settings(tmp_path, default_policy="select", auto_arms=["base", "select", "chain", "base"])) == [
        "select", "base", "chain"]
    assert arms_of(settings(tmp_path, embedder="none")) == ["base", "chain"]  # default arms: routing ones dropped
    # ... also when the default list arrives explicitly, as a child gateway process gets every setting (env)
    child = settings(tmp_path, embedder="none", auto_arms=["base", "select", "average;method=cat", "chain"])
    assert "auto_arms" in child.model_fields_set and arms_of(child) == ["base", "chain"]
    s = settings(tmp_path, auto_features=["pair"], auto_max_contexts=4, auto_half_life_s=60.0,
                 auto_shadow_rate=0.5, auto_explore_rate=0.1)
    config = auto_config(s, router_config(s))
    assert config is not None
    assert (config.features, config.max_contexts, config.half_life_s, config.shadow_rate, config.explore_rate) == (
        ("pair",), 4, 60.0, 0.5, 0.1)


@pytest.mark.parametrize(("fields", "param", "fragment"), [
    ({"auto_arms": ["base", "bogus"]}, "auto_arms", "bogus"),
    ({"auto_arms": ["select;colour=1"]}, "auto_arms", "colour"),
    ({"auto_arms": ["select"], "embedder": "none"}, "auto_arms", "select"),  # explicit: must run here
    ({"auto_arms": ["auto"]}, "auto_arms", "auto"),
    ({"auto_features": ["nearest", "colour"]}, "auto_features", "colour"),
])
def test_auto_config_refuses_what_it_cannot_use(tmp_path: Path, fields: dict[str, Any], param: str,
                                                fragment: str) -> None:
    s = settings(tmp_path, **fields)
    with pytest.raises(ConfigError, match=fragment) as refused:
        auto_config(s, router_config(s))
    assert refused.value.param == param


def auto_event(choice: AutoChoice | None, expected: str | None = "Paris") -> CompletionEvent:
    call = CompletionCall(route="completions", body={"prompt": "p"}, prompt="p", policy=PolicySpec("auto"),
                          request_id="r1", outcome_id="o1", received_at=0.0, expected=expected)
    arm = choice.arm if choice is not None else "base"
    return CompletionEvent("completions", 0.0, 200, call, RoutingDecision("auto", arm, auto=choice))


SERVED = AutoChoice("a/single", "base", "default", ARMS)


def test_exploration_draws_another_runnable_arm_with_the_same_context() -> None:
    learner = AutoLearner(CONFIG, rng=random.Random(3))
    drawn = set()
    for _ in range(40):
        exploring = learner.exploration(auto_event(SERVED))
        assert exploring is not None
        spec, choice = exploring
        assert spec.text() == choice.arm != "base" and choice.arm in ARMS
        assert (choice.context, choice.reason, choice.runnable) == ("a/single", "explore", ARMS)
        drawn.add(choice.arm)
    assert drawn == {"select", "chain"}
    narrowed = dataclasses.replace(SERVED, runnable=("base", "chain"))
    assert {learner.exploration(auto_event(narrowed))[1].arm for _ in range(10)} == {"chain"}  # type: ignore[index]


def test_no_exploration_without_a_grade_an_auto_choice_or_another_arm() -> None:
    learner = AutoLearner(CONFIG, rng=random.Random(3))
    assert learner.exploration(auto_event(SERVED, expected=None)) is None  # nothing would grade the shadow
    assert learner.exploration(auto_event(None)) is None  # not chosen by auto
    assert learner.exploration(auto_event(dataclasses.replace(SERVED, runnable=("base",)))) is None
    assert learner.exploration(CompletionEvent("completions", 0.0, 200)) is None
    never = AutoLearner(dataclasses.replace(CONFIG, shadow_rate=0.0), rng=random.Random(3))
    assert all(never.exploration(auto_event(SERVED)) is None for _ in range(20))


def test_the_report_renders_each_context() -> None:
    learner = AutoLearner(CONFIG)
    assert "no graded auto outcomes yet" in format_auto(learner.report())
    for rid, arm, result in (("1", "select", "success"), ("2", "select", "success"), ("3", "base", "failure")):
        obs = observation(auto_record(rid, "a/single", arm, result=result).fields())
        assert obs is not None
        learner.observe(obs)
    report = learner.report()
    (context,) = report["contexts"]
    assert context["context"] == "a/single" and {a["arm"] for a in context["arms"]} == set(ARMS)
    text = format_auto(report)
    assert "context a/single" in text and "select" in text and "chain" in text and "regret" in text
    assert "auto is off" in format_auto({"enabled": False, "default": "base"})



async def test_a_refresh_rebuilds_from_another_process_records_and_keeps_what_arrived_during_the_read(
        tmp_path: Path) -> None:
    """Two processes on one log: a refresh reads the other's records; an observation recorded live while the
    refresh reads is applied on top of the rebuilt statistics, not lost."""
    path = tmp_path / "o.sqlite3"
    mine, theirs = OutcomeLog(path), OutcomeLog(path)
    learner = AutoLearner(CONFIG)
    mine.observe(learner.observe)
    theirs.add(auto_record("t1", "a/single", "select", result="success"))
    await theirs.flush()
    assert ("a/single", "select") not in learner.stats.cells  # not seen live: another process wrote it
    real = mine.observations

    async def slow_read(since: float, limit: int = 200_000) -> list[Any]:
        found = await real(since, limit)
        mine.add(auto_record("m1", "a/single", "base", result="failure"))  # recorded while the read runs
        return found

    mine.observations = slow_read  # type: ignore[method-assign]
    assert await learner.rebuild(mine) == 1
    cells = learner.stats.cells
    assert cells[("a/single", "select")].successes == pytest.approx(1.0, rel=1e-6)
    assert cells[("a/single", "base")].failures == pytest.approx(1.0, rel=1e-6)
    await mine.close()
    await theirs.close()
