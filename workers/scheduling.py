"""Scheduling strategies: which healthy worker serves a request, chosen by name from a registry.

Every strategy reads immutable :class:`~loragate.workers.stats.WorkerStats` and returns one of
them; none mutates anything, so strategies are trivially testable and swappable by config.
Ties are broken by configuration order (``WorkerStats.index``), never by dict or set order, so
the same inputs always pick the same worker.

``affinity`` follows the Kubernetes Gateway API Inference Extension's lora-affinity scorer:
a worker that already has the adapter active scores highest, one with a free adapter slot next,
and one that would have to evict lowest; that score is combined with a load penalty so a hot
adapter spills over to another worker once its home worker is busy enough to be worth a load.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from loragate.errors import InvalidRequest
from loragate.workers.stats import WorkerStats


class Strategy(Protocol):
    """Picks one of ``candidates`` (all healthy, non-empty, in configuration order) for ``adapter``."""

    name: ClassVar[str]

    def choose(self, adapter: str | None, candidates: Sequence[WorkerStats]) -> WorkerStats: ...


@dataclass(frozen=True, slots=True)
class AffinityWeights:
    """Scores of the three affinity tiers and how much load outweighs them.

    With the defaults, a worker holding the adapter keeps it until it has ``spill_load * 0.5``
    (=8) more requests than an idle worker with a free slot. A load costs far less than that many
    queued requests on a GPU worker, yet stickiness is what keeps loads per request low.
    """

    active: float = 1.0
    free_slot: float = 0.5
    evict: float = 0.0
    spill_load: float = 16.0  # load that cancels one full point of affinity

    def affinity(self, worker: WorkerStats, adapter: str | None) -> float:
        """The lora-affinity tier score (the base model needs no slot: everyone is "active")."""
        if adapter is None or worker.has_adapter(adapter):
            return self.active
        return self.free_slot if worker.free_slots > 0 else self.evict

    def score(self, worker: WorkerStats, adapter: str | None) -> float:
        return self.affinity(worker, adapter) - worker.load / self.spill_load


class AffinityStrategy:
    """Highest affinity-minus-load score; ties go to the worker whose eviction victim has been idle
    longest (the fleet then behaves like one LRU cache rather than N small ones), then to the
    earlier-configured worker."""

    name: ClassVar[str] = "affinity"

    def __init__(self, weights: AffinityWeights | None = None) -> None:
        self.weights = weights or AffinityWeights()

    def choose(self, adapter: str | None, candidates: Sequence[WorkerStats]) -> WorkerStats:
        return max(candidates, key=lambda w: (self.weights.score(w, adapter), w.victim_idle_s or 0.0, -w.index))


class LeastLoadedStrategy:
    """Fewest queued + running requests; ties prefer a worker that has the adapter, then config order."""

    name: ClassVar[str] = "least-loaded"

    def choose(self, adapter: str | None, candidates: Sequence[WorkerStats]) -> WorkerStats:
        return min(candidates, key=lambda w: (w.load, adapter is not None and not w.has_adapter(adapter), w.index))


class RoundRobinStrategy:
    """Each request to the next healthy worker in configuration order, ignoring adapters and load.

    The baseline the benchmark compares affinity against. The cursor is the only state, and it
    is the strategy's own: the stats it reads stay untouched.
    """

    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, adapter: str | None, candidates: Sequence[WorkerStats]) -> WorkerStats:
        return candidates[next(self._counter) % len(candidates)]


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    AffinityStrategy.name: AffinityStrategy,
    LeastLoadedStrategy.name: LeastLoadedStrategy,
    RoundRobinStrategy.name: RoundRobinStrategy,
}


def make_strategy(name: str) -> Strategy:
    """A fresh strategy by registry name; the error lists the valid names (a config mistake is a 400)."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise InvalidRequest(f"unknown scheduling strategy {name!r}; valid: {sorted(STRATEGIES)}",
                             param="strategy", code="unknown_strategy") from None
    return factory()
