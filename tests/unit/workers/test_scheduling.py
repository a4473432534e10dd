"""Strategies read immutable stats: lora-affinity tiers, load spill-over, deterministic ties."""

from __future__ import annotations

import pytest

from loragate.errors import InvalidRequest
from loragate.workers.scheduling import (
    STRATEGIES,
    AffinityStrategy,
    AffinityWeights,
    LeastLoadedStrategy,
    RoundRobinStrategy,
    make_strategy,
)
from loragate.workers.stats import EngineStats, WorkerStats


def worker(index: int, loaded: tuple[str, ...] = (), in_flight: int = 0, max_loras: int = 2,
           engine: EngineStats | None = None) -> WorkerStats:
    return WorkerStats(url=f"http://w{index}", index=index, healthy=True, in_flight=in_flight, loaded=loaded,
                       max_loras=max_loras, engine=engine or EngineStats())


def test_affinity_prefers_active_then_free_slot_then_evict() -> None:
    full = worker(0, loaded=("x", "y"))
    free = worker(1, loaded=("x",))
    active = worker(2, loaded=("a", "y"))
    strategy = AffinityStrategy()
    assert strategy.choose("a", [full, free, active]).index == 2
    assert strategy.choose("b", [full, free, active]).index == 1  # free slot beats evicting
    assert strategy.choose("b", [full]).index == 0  # evict when nothing else is left


def test_affinity_counts_adapters_vllm_reports_running() -> None:
    engine = EngineStats(running_adapters=frozenset({"a"}))
    assert AffinityStrategy().choose("a", [worker(0), worker(1, engine=engine)]).index == 1


def test_affinity_stays_until_load_outweighs_it() -> None:
    strategy = AffinityStrategy(AffinityWeights(active=1.0, free_slot=0.5, spill_load=16))
    idle_free = worker(0)
    assert strategy.choose("a", [idle_free, worker(1, loaded=("a",), in_flight=7)]).index == 1
    assert strategy.choose("a", [idle_free, worker(1, loaded=("a",), in_flight=9)]).index == 0  # spills over


def test_affinity_ties_go_to_the_first_configured_worker() -> None:
    strategy = AffinityStrategy()
    assert strategy.choose("a", [worker(0), worker(1), worker(2)]).index == 0
    assert strategy.choose(None, [worker(0, in_flight=1), worker(1), worker(2)]).index == 1


def test_least_loaded_uses_the_larger_of_gateway_and_vllm_load() -> None:
    busy_elsewhere = worker(0, engine=EngineStats(running=5))
    assert LeastLoadedStrategy().choose("a", [busy_elsewhere, worker(1, in_flight=2)]).index == 1
    assert LeastLoadedStrategy().choose("a", [worker(0), worker(1, loaded=("a",))]).index == 1  # tie: has it


def test_round_robin_cycles_in_configuration_order() -> None:
    strategy = RoundRobinStrategy()
    workers = [worker(0, loaded=("a",)), worker(1), worker(2)]
    assert [strategy.choose("a", workers).index for _ in range(5)] == [0, 1, 2, 0, 1]


def test_registry_lookup_lists_valid_names() -> None:
    assert set(STRATEGIES) == {"affinity", "least-loaded", "round-robin"}
    assert isinstance(make_strategy("round-robin"), RoundRobinStrategy)
    with pytest.raises(InvalidRequest, match="affinity") as info:
        make_strategy("random")
    assert info.value.status == 400


def test_affinity_evicts_where_the_victim_has_been_idle_longest() -> None:
    def full(index: int, idle: float) -> WorkerStats:
        return WorkerStats(url=f"http://w{index}", index=index, healthy=True, in_flight=0, loaded=("x", "y"),
                           max_loras=2, victim_idle_s=idle)

    assert AffinityStrategy().choose("new", [full(0, 1.0), full(1, 30.0), full(2, 5.0)]).index == 1
