"""Scheduling plugins read immutable stats: each filter, scorer and picker alone, then the named profiles
(lora-affinity tiers, load spill-over, deterministic ties) and their registry."""

from __future__ import annotations

import pytest

from loragate.errors import InvalidRequest, NoWorkerAvailable, WorkerRejected
from loragate.workers.scheduling import (
    FILTERS,
    PICKERS,
    PROFILES,
    SCORERS,
    EvictionCostScorer,
    ExcludeFilter,
    HealthFilter,
    LoadBackoffFilter,
    LoadScorer,
    LoraAffinityScorer,
    MaxScoreLruPicker,
    MaxScorePicker,
    RoundRobinPicker,
    SchedulingRequest,
    make_profile,
)
from loragate.workers.stats import EngineStats, LoadBackoff, WorkerStats


def worker(index: int, loaded: tuple[str, ...] = (), in_flight: int = 0, max_loras: int = 2,
           engine: EngineStats | None = None, *, healthy: bool = True, panic_eligible: bool = False,
           backoff: tuple[LoadBackoff, ...] = (), victim_idle_s: float | None = None) -> WorkerStats:
    return WorkerStats(url=f"http://w{index}", index=index, healthy=healthy, in_flight=in_flight, loaded=loaded,
                       max_loras=max_loras, engine=engine or EngineStats(), panic_eligible=panic_eligible,
                       backoff=backoff, victim_idle_s=victim_idle_s)


def req(adapter: str | None = "a", exclude: set[str] | None = None, now: float = 0.0) -> SchedulingRequest:
    return SchedulingRequest(adapter, frozenset(exclude or ()), now)


def choose(profile: str, adapter: str | None, workers: list[WorkerStats], **weights: float) -> int:
    return make_profile(profile, weights).schedule(req(adapter), workers).index


# -- filters -------------------------------------------------------------------------------------------
def test_health_filter_keeps_workers_in_rotation_and_panics_only_when_there_are_none() -> None:
    up, slow, down = worker(0), worker(1, healthy=False, panic_eligible=True), worker(2, healthy=False)
    assert HealthFilter().filter(req(), [up, slow, down]) == [up]
    assert HealthFilter().filter(req(), [slow, down]) == [slow]  # panic: only the unanswered-probe one
    with pytest.raises(NoWorkerAvailable, match="no healthy worker") as info:
        HealthFilter().filter(req(), [down])
    assert info.value.status == 503


def test_exclude_filter_drops_failed_workers_and_says_so_when_none_is_left() -> None:
    assert ExcludeFilter().filter(req(exclude={"http://w0"}), [worker(0), worker(1)]) == [worker(1)]
    with pytest.raises(NoWorkerAvailable, match=r"excluded: \['http://w0'\]"):
        ExcludeFilter().filter(req(exclude={"http://w0"}), [worker(0)])


def test_load_backoff_filter_skips_backing_off_workers_then_fails_fast() -> None:
    broken = LoadBackoff("a", count=1, retry_at=10.0, message="bad file")
    backing_off, fine = worker(0, backoff=(broken,)), worker(1)
    assert LoadBackoffFilter().filter(req("a", now=5.0), [backing_off, fine]) == [fine]
    assert LoadBackoffFilter().filter(req("b", now=5.0), [backing_off, fine]) == [backing_off, fine]
    assert LoadBackoffFilter().filter(req("a", now=11.0), [backing_off]) == [backing_off]  # expired
    with pytest.raises(WorkerRejected, match=r"on every worker; next attempt in 5\.0s.*bad file") as info:
        LoadBackoffFilter().filter(req("a", now=5.0), [backing_off])
    assert info.value.status == 502 and info.value.code == "adapter_load_failed"


# -- scorers -------------------------------------------------------------------------------------------
def test_lora_affinity_scores_where_the_adapter_is_loaded_loading_or_active_in_vllm() -> None:
    scorer = LoraAffinityScorer()
    assert scorer.score(req("a"), worker(0, loaded=("a",))) == 1.0
    assert scorer.score(req("a"), worker(0, engine=EngineStats(waiting_adapters=frozenset({"a"})))) == 1.0
    assert scorer.score(req("a"), worker(0, loaded=("b",))) == 0.0
    assert scorer.score(req(None), worker(0)) == 1.0  # every worker has the base model


def test_eviction_cost_is_zero_only_where_an_adapter_would_be_unloaded() -> None:
    scorer = EvictionCostScorer()
    assert scorer.score(req("a"), worker(0, loaded=("x",))) == 1.0  # free slot
    assert scorer.score(req("a"), worker(0, loaded=("x", "a"))) == 1.0  # already there
    assert scorer.score(req("a"), worker(0, loaded=("x", "y"))) == 0.0
    assert scorer.score(req(None), worker(0, loaded=("x", "y"))) == 1.0


def test_load_scorer_counts_the_larger_of_gateway_and_vllm_load_and_keeps_ranking_past_saturation() -> None:
    scorer = LoadScorer()
    assert scorer.score(req(), worker(0)) == 1.0
    assert scorer.score(req(), worker(0, in_flight=4)) == 0.75
    assert scorer.score(req(), worker(0, in_flight=1, engine=EngineStats(running=6, waiting=2))) == 0.5
    assert scorer.score(req(), worker(0, in_flight=40)) < scorer.score(req(), worker(0, in_flight=20)) < 0


# -- pickers -------------------------------------------------------------------------------------------
def test_max_score_picker_breaks_ties_by_configuration_order() -> None:
    assert MaxScorePicker().pick([(0.5, worker(0)), (0.7, worker(1)), (0.7, worker(2))]).index == 1
    assert MaxScorePicker().pick([(1.0, worker(0)), (1.0, worker(1, victim_idle_s=9.0))]).index == 0


def test_max_score_lru_picker_breaks_ties_by_the_longest_idle_victim() -> None:
    scored = [(1.0, worker(0, victim_idle_s=1.0)), (1.0, worker(1, victim_idle_s=30.0)), (2.0, worker(2))]
    assert MaxScoreLruPicker().pick(scored).index == 2
    assert MaxScoreLruPicker().pick(scored[:2]).index == 1
    assert MaxScoreLruPicker().pick([(1.0, worker(0)), (1.0, worker(1))]).index == 0


def test_round_robin_picker_ignores_scores() -> None:
    picker = RoundRobinPicker()
    scored = [(9.0, worker(0)), (0.0, worker(1)), (0.0, worker(2))]
    assert [picker.pick(scored).index for _ in range(4)] == [0, 1, 2, 0]


# -- profiles ------------------------------------------------------------------------------------------
def test_affinity_prefers_active_then_free_slot_then_evict() -> None:
    full = worker(0, loaded=("x", "y"))
    free = worker(1, loaded=("x",))
    active = worker(2, loaded=("a", "y"))
    assert choose("affinity", "a", [full, free, active]) == 2
    assert choose("affinity", "b", [full, free, active]) == 1  # free slot beats evicting
    assert choose("affinity", "b", [full]) == 0  # evict when nothing else is left


def test_affinity_counts_adapters_vllm_reports_running() -> None:
    engine = EngineStats(running_adapters=frozenset({"a"}))
    assert choose("affinity", "a", [worker(0), worker(1, engine=engine)]) == 1


def test_affinity_stays_until_load_outweighs_it() -> None:
    idle_free = worker(0)
    assert choose("affinity", "a", [idle_free, worker(1, loaded=("a",), in_flight=7)]) == 1
    assert choose("affinity", "a", [idle_free, worker(1, loaded=("a",), in_flight=9)]) == 0  # spills over


def test_affinity_ties_go_to_the_first_configured_worker() -> None:
    assert choose("affinity", "a", [worker(0), worker(1), worker(2)]) == 0
    assert choose("affinity", None, [worker(0, in_flight=1), worker(1), worker(2)]) == 1


def test_affinity_evicts_where_the_victim_has_been_idle_longest() -> None:
    def full(index: int, idle: float) -> WorkerStats:
        return worker(index, loaded=("x", "y"), victim_idle_s=idle)

    assert choose("affinity", "new", [full(0, 1.0), full(1, 30.0), full(2, 5.0)]) == 1


def test_least_loaded_uses_the_larger_of_gateway_and_vllm_load() -> None:
    busy_elsewhere = worker(0, engine=EngineStats(running=5))
    assert choose("least-loaded", "a", [busy_elsewhere, worker(1, in_flight=2)]) == 1
    assert choose("least-loaded", "a", [worker(0), worker(1, loaded=("a",))]) == 1  # tie: has it


def test_least_loaded_ties_otherwise_go_by_configuration_order_not_free_slots_or_idle_victims() -> None:
    full_idle = worker(0, loaded=("x", "y"), victim_idle_s=60.0)
    assert choose("least-loaded", "a", [full_idle, worker(1)]) == 0
    assert choose("least-loaded", "a", [worker(0, in_flight=1, loaded=("a",)), worker(1)]) == 1  # load first


def test_round_robin_cycles_in_configuration_order() -> None:
    profile = make_profile("round-robin")
    workers = [worker(0, loaded=("a",)), worker(1), worker(2)]
    assert [profile.schedule(req("a"), workers).index for _ in range(5)] == [0, 1, 2, 0, 1]


def test_every_profile_filters_before_it_scores() -> None:
    workers = [worker(0, loaded=("a",), healthy=False), worker(1), worker(2)]
    for name in PROFILES:
        profile = make_profile(name)
        assert {profile.schedule(req("a", exclude={"http://w1"}), workers).index for _ in range(3)} == {2}


def test_weights_override_the_profile() -> None:
    sticky = [worker(0), worker(1, loaded=("a",), in_flight=9)]
    assert choose("affinity", "a", sticky) == 0
    assert choose("affinity", "a", sticky, load=0.5) == 1  # load counts half: stays up to 16 more requests
    assert choose("least-loaded", "a", sticky, **{"lora-affinity": 1.0}) == 1
    assert make_profile("affinity", {"load": 0}).weights == {"lora-affinity": 0.5, "eviction-cost": 0.5,
                                                             "session-affinity": 0.25}


def test_registries_and_their_lookup_errors_list_valid_names() -> None:
    assert set(PROFILES) == {"affinity", "least-loaded", "round-robin"}
    assert set(FILTERS) == {"health", "exclude", "load-backoff"}
    assert set(SCORERS) == {"lora-affinity", "eviction-cost", "load", "session-affinity"}
    assert set(PICKERS) == {"max-score", "max-score-lru", "round-robin"}
    assert isinstance(make_profile("round-robin").picker, RoundRobinPicker)
    with pytest.raises(InvalidRequest, match="affinity") as info:
        make_profile("random")
    assert info.value.status == 400
    with pytest.raises(InvalidRequest, match=r"unknown scheduling scorer 'cache'; valid: \['eviction-cost', 'load'"):
        make_profile("affinity", {"cache": 1.0})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match="finite number >= 0"):
            make_profile("affinity", {"load": bad})


def test_every_profile_names_registered_plugins() -> None:
    """What startup relies on: each profile builds, and its defaults are what the docstrings promise."""
    for name, spec in PROFILES.items():
        profile = make_profile(name)
        assert [f.name for f in profile.filters] == list(spec.filters) == ["health", "exclude", "load-backoff"]
        assert profile.picker.name == spec.picker
    assert make_profile("affinity").weights == {"lora-affinity": 0.5, "eviction-cost": 0.5, "load": 1.0,
                                                "session-affinity": 0.25}
