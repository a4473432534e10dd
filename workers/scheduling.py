"""Scheduling as plugins: filters drop workers, weighted scorers rank the rest, a picker chooses one.

The shape is the Kubernetes Gateway API Inference Extension's endpoint picker (its scheduling
framework: Filter, Scorer and Picker plugins run by a named profile, LoRA affinity being one
scorer among others). Every plugin reads immutable :class:`~loragate.workers.stats.WorkerStats`
and one frozen :class:`SchedulingRequest`; none changes anything but its own state (a cursor, a
memory of groups), so each is testable alone and a profile is only a list of names and weights.

- **Filters** run in order and keep the workers fit for the request. One that leaves nothing
  raises the error the client should see (503 when no worker is in rotation, 502 when the
  adapter failed to load everywhere), so the reason is never lost in a generic "no worker".
- **Scorers** give every remaining worker a score, higher is better. Affinity and eviction cost
  are 0 or 1; load is ``1 - load / 16``, which keeps falling past 16 so that it still ranks
  workers that are all that busy. A profile sums ``weight * score``. A scorer that learns from
  what was picked (:class:`PickListener`, as the inference extension's prefix-cache scorer records
  where each prompt went) is told every cycle's outcome.
- **Pickers** choose among the scored workers. Ties go by configuration order
  (``WorkerStats.index``), never by dict or set order: the same inputs always pick the same worker.

The configured ``scheduling`` names a profile (:data:`PROFILES`); ``scheduling_weights``
overrides its weights. With the affinity profile's defaults, a worker holding the adapter keeps
it until it has 8 more requests than an idle worker with a free slot (the affinity gap of 0.5
against 1/16 per request): a load costs far less than that many queued requests on a GPU worker,
yet stickiness is what keeps loads per request low.

Requests that belong together (a chain's step generations and reference passes, see
server/chain.py) carry one ``affinity`` key, and ``session-affinity`` (weight 0.25 in both
scoring profiles) prefers the worker the first of them went to: vLLM then batches them, and its
prefix cache (kept per adapter) serves what they share: the base model's reference passes share
the step's prompt, and each candidate's next step extends its last one. The preference is only a
score, after the filters: a worker out of rotation, excluded or backing off is never forced, and
the group's worker keeps the group until it has 4 more requests than another (0.25 against 1/16
each). It is half the affinity gap, so at equal load a worker holding a request's adapter still
beats the group's worker that lacks it: the preference alone never costs a load. ``round-robin``
ignores it, as every score.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from loragate.errors import InvalidRequest, NoWorkerAvailable, WorkerRejected
from loragate.workers.stats import WorkerStats

__all__ = [
    "FILTERS",
    "PICKERS",
    "PROFILES",
    "SCORERS",
    "Filter",
    "PickListener",
    "Picker",
    "Profile",
    "ProfileSpec",
    "SchedulingRequest",
    "Scorer",
    "make_profile",
]


@dataclass(frozen=True, slots=True)
class SchedulingRequest:
    """What scheduling knows of one request: its adapter (None: the base model), the workers it
    must not use (those a retry already failed on), the moment it is scheduled (monotonic) and its
    ``affinity`` key (requests with one key prefer one worker; None: it belongs to no group)."""

    adapter: str | None
    exclude: frozenset[str] = frozenset()
    now: float = 0.0
    affinity: str | None = None


Scored = tuple[float, WorkerStats]


class Filter(Protocol):
    """Keeps the workers fit for ``request``, in the order given; raises when it would keep none."""

    name: ClassVar[str]

    def filter(self, request: SchedulingRequest, workers: Sequence[WorkerStats]) -> Sequence[WorkerStats]: ...


class Scorer(Protocol):
    """How well ``worker`` suits ``request``; higher is better (see the module docstring for the scale)."""

    name: ClassVar[str]

    def score(self, request: SchedulingRequest, worker: WorkerStats) -> float: ...


class Picker(Protocol):
    """One of ``scored`` (non-empty, in configuration order)."""

    name: ClassVar[str]

    def pick(self, scored: Sequence[Scored]) -> WorkerStats: ...


@runtime_checkable
class PickListener(Protocol):
    """A plugin told each cycle's outcome: ``kept`` (the workers the filters left) and the one picked."""

    def picked(self, request: SchedulingRequest, kept: Sequence[WorkerStats], chosen: WorkerStats) -> None: ...


# -- filters ------------------------------------------------------------------------------------------
def _no_worker(request: SchedulingRequest) -> NoWorkerAvailable:
    excluded = f" (excluded: {sorted(request.exclude)})" if request.exclude else ""
    return NoWorkerAvailable("no healthy worker is available" + excluded)


class HealthFilter:
    """Workers in rotation; when *none* is (in the whole fleet, excluded ones included), those taken
    out only because their probes went unanswered (panic routing, see :mod:`~loragate.workers.health`)."""

    name: ClassVar[str] = "health"

    def filter(self, request: SchedulingRequest, workers: Sequence[WorkerStats]) -> Sequence[WorkerStats]:
        kept = [w for w in workers if w.healthy]
        if not kept:
            kept = [w for w in workers if w.panic_eligible]
        if not kept:
            raise _no_worker(request)
        return kept


class ExcludeFilter:
    """Drops the workers the request already failed on before its first response byte."""

    name: ClassVar[str] = "exclude"

    def filter(self, request: SchedulingRequest, workers: Sequence[WorkerStats]) -> Sequence[WorkerStats]:
        if not request.exclude:
            return workers
        kept = [w for w in workers if w.url not in request.exclude]
        if not kept:
            raise _no_worker(request)
        return kept


class LoadBackoffFilter:
    """Drops workers where the request's adapter failed to load and is backed off; a broken adapter
    then fails fast (502 ``adapter_load_failed``) instead of being retried on every request."""

    name: ClassVar[str] = "load-backoff"

    def filter(self, request: SchedulingRequest, workers: Sequence[WorkerStats]) -> Sequence[WorkerStats]:
        adapter = request.adapter
        if adapter is None or not any(w.backoff for w in workers):
            return workers
        kept = [w for w in workers if not self._backing_off(w, adapter, request.now)]
        if not kept:
            failure = workers[0].backoff_for(adapter)
            assert failure is not None  # every worker is backing off
            raise WorkerRejected(f"adapter {adapter!r} failed to load on every worker; next attempt in "
                                 f"{failure.retry_at - request.now:.1f}s. Last error: {failure.message}",
                                 status=502, code="adapter_load_failed")
        return kept

    @staticmethod
    def _backing_off(worker: WorkerStats, adapter: str, now: float) -> bool:
        failure = worker.backoff_for(adapter)
        return failure is not None and failure.retry_at > now


# -- scorers ------------------------------------------------------------------------------------------
class LoraAffinityScorer:
    """1 where the adapter is already there (loaded or loading per this pool, running or waiting per
    vLLM's scrape), 0 elsewhere; every worker has the base model."""

    name: ClassVar[str] = "lora-affinity"

    def score(self, request: SchedulingRequest, worker: WorkerStats) -> float:
        return 1.0 if request.adapter is None or worker.has_adapter(request.adapter) else 0.0


class EvictionCostScorer:
    """1 where serving the request evicts nothing (the adapter is there, or a slot is free), 0 where
    another adapter would have to be unloaded for it."""

    name: ClassVar[str] = "eviction-cost"

    def score(self, request: SchedulingRequest, worker: WorkerStats) -> float:
        adapter = request.adapter
        return 1.0 if adapter is None or worker.free_slots > 0 or worker.has_adapter(adapter) else 0.0


class LoadScorer:
    """``1 - load / saturation``: requests queued or running (the larger of this gateway's in-flight
    count and vLLM's scraped running + waiting, see :attr:`WorkerStats.load`)."""

    name: ClassVar[str] = "load"
    saturation: ClassVar[float] = 16.0  # the load that costs one full point

    def score(self, request: SchedulingRequest, worker: WorkerStats) -> float:
        return 1.0 - worker.load / self.saturation


class SessionAffinityScorer:
    """1 on the worker that earlier requests with the same ``affinity`` key went to, 0 elsewhere.

    The key's worker is remembered from its first request, synchronously in the cycle that leases
    it, so requests started together (a step's candidates) already see it. It stays while it
    survives the filters for the group's requests; when it does not (out of rotation, excluded by
    a retry, removed), the group moves to where that request went. Nothing says when a group
    ends, so memory is bounded instead: a key idle for :attr:`idle_s` is forgotten, and beyond
    :attr:`capacity` keys the least recently used one is. A forgotten key only costs the
    preference: its next request is scheduled as any other and starts the group again.
    """

    name: ClassVar[str] = "session-affinity"
    idle_s: ClassVar[float] = 60.0  # a chain's steps follow one another within seconds
    capacity: ClassVar[int] = 4096  # groups remembered at once (a few hundred bytes each)

    def __init__(self) -> None:
        self._groups: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (worker URL, last use); LRU first

    def worker_for(self, key: str, now: float) -> str | None:
        """The worker ``key``'s group prefers at ``now``, if it is remembered."""
        entry = self._groups.get(key)
        return entry[0] if entry is not None and now - entry[1] <= self.idle_s else None

    def score(self, request: SchedulingRequest, worker: WorkerStats) -> float:
        key = request.affinity
        return 1.0 if key is not None and self.worker_for(key, request.now) == worker.url else 0.0

    def picked(self, request: SchedulingRequest, kept: Sequence[WorkerStats], chosen: WorkerStats) -> None:
        key = request.affinity
        if key is None:
            return
        url = self.worker_for(key, request.now)
        if url is None or all(w.url != url for w in kept):
            url = chosen.url
        self._groups[key] = (url, request.now)
        self._groups.move_to_end(key)
        while self._groups:  # oldest first: drop the idle and those over capacity
            oldest, (_, used) = next(iter(self._groups.items()))
            if len(self._groups) <= self.capacity and request.now - used <= self.idle_s:
                break
            del self._groups[oldest]


# -- pickers ------------------------------------------------------------------------------------------
class MaxScorePicker:
    """The highest total score; ties go to the earlier-configured worker."""

    name: ClassVar[str] = "max-score"

    def pick(self, scored: Sequence[Scored]) -> WorkerStats:
        return max(scored, key=lambda s: (s[0], -s[1].index))[1]


class MaxScoreLruPicker:
    """The highest total score; ties go to the worker whose next eviction victim has been idle
    longest (the fleet then behaves like one LRU cache rather than N small ones), then by
    configuration order."""

    name: ClassVar[str] = "max-score-lru"

    def pick(self, scored: Sequence[Scored]) -> WorkerStats:
        return max(scored, key=lambda s: (s[0], s[1].victim_idle_s or 0.0, -s[1].index))[1]


class RoundRobinPicker:
    """Each request to the next worker in configuration order, whatever the scores: the baseline the
    benchmark compares affinity against. The cursor is the picker's only state."""

    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: Sequence[Scored]) -> WorkerStats:
        return scored[next(self._counter) % len(scored)][1]


FILTERS: dict[str, Callable[[], Filter]] = {f.name: f for f in (HealthFilter, ExcludeFilter, LoadBackoffFilter)}
SCORERS: dict[str, Callable[[], Scorer]] = {s.name: s for s in (LoraAffinityScorer, EvictionCostScorer, LoadScorer,
                                                                  SessionAffinityScorer)}
PICKERS: dict[str, Callable[[], Picker]] = {p.name: p for p in (MaxScorePicker, MaxScoreLruPicker, RoundRobinPicker)}

_Plugin = TypeVar("_Plugin")


def _plugin(kind: str, registry: Mapping[str, Callable[[], _Plugin]], name: str) -> _Plugin:
    """A fresh plugin by registry name; the error lists the valid names."""
    try:
        return registry[name]()
    except KeyError:
        raise InvalidRequest(f"unknown scheduling {kind} {name!r}; valid: {sorted(registry)}",
                             param="scheduling", code=f"unknown_{kind}") from None


# -- profiles -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """A profile by plugin names: filters in order, scorer weights, one picker."""

    filters: tuple[str, ...]
    weights: tuple[tuple[str, float], ...]
    picker: str


_FILTERS = ("health", "exclude", "load-backoff")

PROFILES: dict[str, ProfileSpec] = {
    # LoRA affinity tiers (has it 1, free slot 0.5, would evict 0) minus load/16; a group's worker +0.25.
    "affinity": ProfileSpec(_FILTERS, (("lora-affinity", 0.5), ("eviction-cost", 0.5), ("load", 1.0),
                                       ("session-affinity", 0.25)), "max-score-lru"),
    # Fewest queued + running requests (a group's worker counts 4 fewer); affinity only breaks ties
    # (0.01 < the 1/16 of one request).
    "least-loaded": ProfileSpec(_FILTERS, (("load", 1.0), ("lora-affinity", 0.01), ("session-affinity", 0.25)),
                                "max-score"),
    # Next worker in turn, ignoring adapters, load and groups.
    "round-robin": ProfileSpec(_FILTERS, (), "round-robin"),
}


class Profile:
    """Runs one scheduling cycle: filters, then weighted scorers, then the picker."""

    def __init__(self, name: str, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]],
                 picker: Picker) -> None:
        self.name = name
        self.filters = tuple(filters)
        self.scorers = tuple((s, w) for s, w in scorers if w)  # a zero weight is no scorer
        self.picker = picker
        self.listeners = tuple(s for s, _ in self.scorers if isinstance(s, PickListener))

    @property
    def weights(self) -> dict[str, float]:
        return {scorer.name: weight for scorer, weight in self.scorers}

    def schedule(self, request: SchedulingRequest, workers: Sequence[WorkerStats]) -> WorkerStats:
        """The worker for ``request`` among ``workers`` (the whole fleet, in configuration order)."""
        for step in self.filters:
            workers = step.filter(request, workers)
        scored = []
        for worker in workers:
            total = 0.0
            for scorer, weight in self.scorers:
                total += weight * scorer.score(request, worker)
            scored.append((total, worker))
        chosen = self.picker.pick(scored)
        for listener in self.listeners:
            listener.picked(request, workers, chosen)
        return chosen


def make_profile(name: str, weights: Mapping[str, float] | None = None) -> Profile:
    """A fresh profile by name, ``weights`` overriding its scorer weights (adding a scorer, or
    removing one with 0). Errors name the valid profiles or scorers: the gateway checks its
    configuration with this at startup."""
    try:
        spec = PROFILES[name]
    except KeyError:
        raise InvalidRequest(f"unknown scheduling strategy {name!r}; valid: {sorted(PROFILES)}",
                             param="strategy", code="unknown_strategy") from None
    merged = dict(spec.weights)
    for scorer, weight in (weights or {}).items():
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidRequest(f"scheduling weight of {scorer!r} must be a finite number >= 0, not {weight!r}",
                                 param="scheduling_weights")
        merged[scorer] = weight
    return Profile(name, [_plugin("filter", FILTERS, f) for f in spec.filters],
                   [(_plugin("scorer", SCORERS, s), w) for s, w in merged.items()],
                   _plugin("picker", PICKERS, spec.picker))
