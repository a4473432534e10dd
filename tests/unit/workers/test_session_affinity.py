"""The session-affinity scorer over immutable stats: requests with one affinity key prefer the worker the first
went to, as a soft preference (filters first, load and adapter affinity can outweigh it), with bounded memory.

The profile cycles here reproduce what the pool does for a chain's concurrent candidates: each pick is
reserved (its worker's in-flight count rises) before the next request is scheduled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from loragate.errors import NoWorkerAvailable
from loragate.workers.scheduling import PickListener, Profile, SchedulingRequest, SessionAffinityScorer, make_profile
from loragate.workers.stats import WorkerStats
from tests.unit.workers.test_scheduling import worker

W0, W1 = "http://w0", "http://w1"


def grouped(adapter: str | None = None, key: str | None = "chain-1", now: float = 0.0,
            exclude: frozenset[str] = frozenset()) -> SchedulingRequest:
    return SchedulingRequest(adapter, exclude, now, key)


def reserve(profile: Profile, requests: Sequence[SchedulingRequest], workers: list[WorkerStats]) -> list[int]:
    """Schedule ``requests`` one after another, each pick counted in flight before the next (as leases are)."""
    picked = []
    for request in requests:
        chosen = profile.schedule(request, workers)
        workers = [replace(w, in_flight=w.in_flight + 1) if w.url == chosen.url else w for w in workers]
        picked.append(chosen.index)
    return picked


# -- the scorer alone ------------------------------------------------------------------------------------
def test_the_first_pick_of_a_key_is_remembered_and_scores_one_there_only() -> None:
    scorer = SessionAffinityScorer()
    workers = [worker(0), worker(1)]
    assert [scorer.score(grouped(), w) for w in workers] == [0.0, 0.0]  # nothing remembered yet
    scorer.picked(grouped(), workers, workers[1])
    assert [scorer.score(grouped(), w) for w in workers] == [0.0, 1.0]
    scorer.picked(grouped(), workers, workers[0])  # a later pick elsewhere (outscored) does not move the group
    assert scorer.worker_for("chain-1", 0.0) == W1
    assert [scorer.score(grouped(key="chain-2"), w) for w in workers] == [0.0, 0.0]  # another group
    assert [scorer.score(grouped(key=None), w) for w in workers] == [0.0, 0.0]  # no group at all
    scorer.picked(grouped(key=None), workers, workers[0])
    assert scorer.worker_for("chain-1", 0.0) == W1 and len(scorer._groups) == 1  # ungrouped picks leave no trace
    assert isinstance(scorer, PickListener)


def test_a_group_whose_worker_did_not_pass_the_filters_moves_to_where_its_request_went() -> None:
    scorer = SessionAffinityScorer()
    scorer.picked(grouped(), [worker(0), worker(1)], worker(0))
    scorer.picked(grouped(), [worker(1)], worker(1))  # w0 filtered out (down, excluded, backing off)
    assert scorer.worker_for("chain-1", 0.0) == W1
    scorer.picked(grouped(), [worker(0), worker(1)], worker(0))  # w0 back: the group stays where it went
    assert scorer.worker_for("chain-1", 0.0) == W1


def test_memory_is_bounded_by_idle_time_and_by_count(monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = SessionAffinityScorer()
    w = [worker(0), worker(1)]
    scorer.picked(grouped(now=0.0), w, w[0])
    scorer.picked(grouped(now=50.0), w, w[1])  # used again within idle_s: kept, and its clock restarts
    assert scorer.worker_for("chain-1", 50.0 + scorer.idle_s) == W0
    assert scorer.worker_for("chain-1", 50.0 + scorer.idle_s + 1) is None  # idle too long: forgotten
    scorer.picked(grouped(key="other", now=200.0), w, w[1])  # any pick drops the idle ones
    assert list(scorer._groups) == ["other"]
    scorer.picked(grouped(now=200.0), w, w[1])  # a forgotten key starts its group again where it goes
    assert scorer.worker_for("chain-1", 200.0) == W1

    monkeypatch.setattr(SessionAffinityScorer, "capacity", 2)
    for key in ("a", "b", "c"):
        scorer.picked(grouped(key=key, now=300.0), w, w[0])
    assert list(scorer._groups) == ["b", "c"]  # the least recently used beyond capacity went first


# -- in a profile: soft preference -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["affinity", "least-loaded"])
def test_concurrent_requests_of_a_group_share_a_worker_that_ungrouped_ones_would_spread_over(name: str) -> None:
    idle = [worker(0), worker(1)]
    step = [grouped("a"), grouped("b"), grouped(None), grouped(None)]  # two adapters, the base, a reference pass
    assert reserve(make_profile(name), step, idle) == [0, 0, 0, 0]
    ungrouped = [replace(r, affinity=None) for r in step]
    assert reserve(make_profile(name), ungrouped, idle) == [0, 1, 0, 1]  # the load scorer spreads them


def test_the_preference_yields_to_load_beyond_four_requests() -> None:
    profile = make_profile("least-loaded")
    profile.schedule(grouped(), [worker(0), worker(1)])  # the group starts on w0
    assert profile.schedule(grouped(), [worker(0, in_flight=4), worker(1)]).index == 0
    assert profile.schedule(grouped(), [worker(0, in_flight=5), worker(1)]).index == 1  # over its limit: elsewhere
    assert profile.schedule(grouped(), [worker(0, in_flight=4), worker(1)]).index == 0  # still the group's
    # one step of twelve candidates on two idle workers: the group's worker takes them until 4 ahead, then they spread
    spread = reserve(make_profile("least-loaded"), [grouped(key="wide")] * 12, [worker(0), worker(1)])
    assert spread == [0] * 5 + [1, 0] * 3 + [1]


def test_an_unhealthy_or_excluded_group_worker_is_never_forced() -> None:
    profile = make_profile("affinity")
    profile.schedule(grouped(), [worker(0), worker(1)])
    assert profile.schedule(grouped(), [worker(0, healthy=False), worker(1)]).index == 1
    with pytest.raises(NoWorkerAvailable):  # no score brings a filtered-out worker back
        profile.schedule(grouped(exclude=frozenset({W1})), [worker(0, healthy=False), worker(1)])
    assert profile.schedule(grouped(), [worker(0), worker(1)]).index == 1  # the group moved with its request


def test_at_equal_load_a_worker_holding_the_adapter_beats_the_group_worker_that_lacks_it() -> None:
    profile = make_profile("affinity")
    profile.schedule(grouped(), [worker(0), worker(1)])  # the group is on w0
    holder = [worker(0), worker(1, loaded=("b",))]
    assert profile.schedule(grouped("b"), holder).index == 1  # 0.25 < the 0.5 affinity gap: no load for it
    assert profile.schedule(grouped(None), holder).index == 0  # the base model is everywhere: the group decides
    busy_holder = [worker(0), worker(1, loaded=("b",), in_flight=5)]
    assert profile.schedule(grouped("b"), busy_holder).index == 0  # 5 more requests there outweigh the load


def test_round_robin_and_a_zero_weight_ignore_groups() -> None:
    rr = make_profile("round-robin")
    assert rr.listeners == () and reserve(rr, [grouped()] * 4, [worker(0), worker(1)]) == [0, 1, 0, 1]
    off = make_profile("least-loaded", {"session-affinity": 0})
    assert off.listeners == () and reserve(off, [grouped()] * 4, [worker(0), worker(1)]) == [0, 1, 0, 1]
