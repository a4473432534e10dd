"""The learned ``auto``: for each kind of query (a *context*), the policy (an *arm*) graded outcomes favour.

Contexts are what is known at routing time, small and explainable: the features in :data:`FEATURES`
(by default the nearest adapter and the compositional flag: "spouses/single"), joined by ``/``. The
number of contexts is capped; contexts seen after the cap share the ``other`` bucket.

Each (context, arm) keeps a Beta-Bernoulli posterior over graded outcomes: a success adds its score
(``X-Expected-Answer`` grading gives 0 or 1, ``/v1/feedback`` any score in [0, 1]), a failure
``1 - score``, on a ``Beta(prior)`` prior. Evidence decays with a half-life in *time*, not over a
window of the last N outcomes: an observation's weight then depends only on its own timestamp, so
the sums do not depend on the order observations arrive in, and statistics rebuilt from the outcome
log after a restart (or read by another process) equal the ones the live process kept.

The client's request gets :func:`exploit`: the *reference* arm is the one with the best lower 95%
bound (an interval's lower bound never switches to an arm on one lucky outcome: 1/1 loses to 9/10),
and the client gets the cheapest arm (arms are listed cheapest first) whose posterior mean is within
``margin`` of the reference's — practically as good as the most reliably good one. Exploring on a
client would make that client pay for the experiment; the cost order keeps ``select`` rather than a
``chain`` 2.8x slower where both answer single-hop questions.
Exploration is :func:`explore`: Thompson sampling over the other arms, run as a shadow of the same
request in an idle moment (server/shadows), graded like the primary.

Pure values and functions: the server's learner feeds observations in and publishes the immutable
:class:`AutoStats`; :class:`AutoPolicy` only reads it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol

from scipy.special import betaincinv

from loragate.errors import InvalidRequest, LoragateError
from loragate.router.types import AutoChoice, PolicySpec, RoutingDecision, RoutingQuery

OTHER = "other"
DEFAULT_ARMS = ("base", "select", "average;method=cat", "chain")
"""``auto_arms``' default, cheapest first: no adapter, one routed adapter, a merge of the nearest two, a chain."""


@dataclass(frozen=True, slots=True)
class Signals:
    """What routing knows of a request before any arm runs: the nearest adapters and the compositional flag."""

    candidates: tuple[tuple[str, float], ...]
    compositional: bool | None
    min_score: float


def _nearest(s: Signals) -> str:
    return s.candidates[0][0] if s.candidates and s.candidates[0][1] >= s.min_score else "none"


def _compositional(s: Signals) -> str:
    return "unrouted" if s.compositional is None else ("compositional" if s.compositional else "single")


def _pair(s: Signals) -> str:
    near = sorted(n for n, score in s.candidates[:2] if score >= s.min_score)
    return "+".join(near) or "none"


FEATURES: Mapping[str, Callable[[Signals], str]] = MappingProxyType({
    "nearest": _nearest,  # which adapter's domain the query is in
    "compositional": _compositional,  # whether it spans two (the router's detector)
    "pair": _pair,  # the top-2 adapters above min_score, unordered
})
"""Context features by name (``auto_features``): each maps a request's :class:`Signals` to a short label."""


def check_features(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise InvalidRequest(f"unknown auto features {unknown}; valid: {', '.join(FEATURES)}", param="auto_features")
    return tuple(names)


def context_of(features: Sequence[str], signals: Signals) -> str:
    """The context label of a request: its feature values joined by ``/`` (``all`` with no features)."""
    return "/".join(FEATURES[f](signals) for f in features) or "all"


@dataclass(frozen=True, slots=True)
class AutoConfig:
    """The learned auto's parameters (from the gateway's settings)."""

    arms: tuple[PolicySpec, ...]  # the default policy first (what a context with no data gets), cheapest first
    features: tuple[str, ...] = ("nearest", "compositional")
    max_contexts: int = 32
    half_life_s: float = 86_400.0
    prior: tuple[float, float] = (1.0, 1.0)
    confidence: float = 0.95
    margin: float = 0.05  # a cheaper arm whose posterior mean is this close to the reference arm's is served
    explore_rate: float = 0.0  # share of client requests served by a Thompson draw (for feedback-only traffic)
    shadow_rate: float = 1.0  # share of graded auto requests that get an exploring shadow

    @property
    def default(self) -> PolicySpec:
        return self.arms[0]


@dataclass(frozen=True, slots=True)
class Observation:
    """One graded outcome of an arm in a context (``weight`` -1 takes back an earlier one: a regrade)."""

    context: str
    arm: str
    score: float  # success in [0, 1]; an error counts as 0
    at: float  # when it was graded (unix seconds)
    served: bool  # a client's request (auto's own choice), not a shadow
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Tally:
    """Decayed success and failure sums, as of time ``at``."""

    successes: float = 0.0
    failures: float = 0.0
    at: float = 0.0

    def decayed(self, now: float, half_life_s: float) -> Tally:
        if now <= self.at:
            return self
        factor = 0.5 ** ((now - self.at) / half_life_s)
        return Tally(self.successes * factor, self.failures * factor, now)

    def add(self, obs: Observation, half_life_s: float) -> Tally:
        """Plus ``obs``, weighted by its age: the result does not depend on the order of additions."""
        base = self.decayed(obs.at, half_life_s) if self.successes or self.failures else replace(self, at=obs.at)
        factor = obs.weight * 0.5 ** (max(base.at - obs.at, 0.0) / half_life_s)
        return Tally(max(base.successes + factor * obs.score, 0.0),
                     max(base.failures + factor * (1.0 - obs.score), 0.0), base.at)

    @property
    def n(self) -> float:
        return self.successes + self.failures


@dataclass(frozen=True, slots=True)
class Posterior:
    """Beta(a, b) of one arm in one context, with the decayed evidence behind it."""

    a: float
    b: float
    n: float

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        tail = (1 - confidence) / 2
        return float(betaincinv(self.a, self.b, tail)), float(betaincinv(self.a, self.b, 1 - tail))


@dataclass(frozen=True, slots=True)
class AutoStats:
    """Every (context, arm) tally, all graded outcomes (``cells``) and auto's own served ones (``served``)."""

    cells: Mapping[tuple[str, str], Tally] = field(default_factory=lambda: MappingProxyType({}))
    served: Mapping[tuple[str, str], Tally] = field(default_factory=lambda: MappingProxyType({}))
    contexts: tuple[str, ...] = ()  # in order of first observation; at most max_contexts (+ other)

    def bucket(self, context: str, config: AutoConfig) -> str:
        """``context``, or ``other`` once the cap is reached by other contexts."""
        if context in self.contexts or context == OTHER or len(self.contexts) < config.max_contexts:
            return context
        return OTHER

    def observe(self, obs: Observation, config: AutoConfig) -> AutoStats:
        context = self.bucket(obs.context, config)
        contexts = self.contexts if context in self.contexts else (*self.contexts, context)
        key = (context, obs.arm)
        cells = dict(self.cells)
        cells[key] = cells.get(key, Tally()).add(obs, config.half_life_s)
        served = self.served
        if obs.served:
            served = dict(served)
            served[key] = served.get(key, Tally()).add(obs, config.half_life_s)
            served = MappingProxyType(served)
        return AutoStats(MappingProxyType(cells), served, contexts)

    def posterior(self, context: str, arm: str, now: float, config: AutoConfig) -> Posterior:
        tally = self.cells.get((context, arm), Tally()).decayed(now, config.half_life_s)
        return Posterior(config.prior[0] + tally.successes, config.prior[1] + tally.failures, tally.n)

    def evidence(self, context: str, now: float, config: AutoConfig, arms: Sequence[str] | None = None) -> float:
        """Decayed graded outcomes in ``context`` over ``arms`` (every arm: None)."""
        return sum(t.decayed(now, config.half_life_s).n for (c, a), t in self.cells.items()
                   if c == context and (arms is None or a in arms))


def rebuild(observations: Sequence[Observation], config: AutoConfig) -> AutoStats:
    """The statistics from outcome records, oldest first (the order contexts are admitted under the cap)."""
    stats = AutoStats()
    for obs in sorted(observations, key=lambda o: o.at):
        stats = stats.observe(obs, config)
    return stats


def exploit(stats: AutoStats, context: str, arms: Sequence[str], now: float, config: AutoConfig) -> tuple[str, str]:
    """The client's arm and why: ``default`` (no evidence in the context) or ``exploit``: the cheapest arm (``arms``
    are in cost order, the default first) whose posterior mean is within ``margin`` of the mean of the arm with
    the best lower bound."""
    if stats.evidence(context, now, config, arms) <= 0:  # nothing known of the arms this request can run
        return arms[0], "default"
    posteriors = [stats.posterior(context, arm, now, config) for arm in arms]
    reference = max(posteriors, key=lambda p: p.interval(config.confidence)[0])
    for arm, posterior in zip(arms, posteriors, strict=True):
        if posterior.mean >= reference.mean - config.margin:
            return arm, "exploit"
    return arms[0], "exploit"  # unreachable: the reference arm itself qualifies


def explore(stats: AutoStats, context: str, arms: Sequence[str], now: float, config: AutoConfig,
            rng: random.Random) -> str | None:
    """Thompson sampling: the arm whose draw from its posterior is highest (None without arms)."""
    best, best_draw = None, -math.inf
    for arm in arms:
        p = stats.posterior(context, arm, now, config)
        draw = rng.betavariate(p.a, p.b)
        if draw > best_draw:
            best, best_draw = arm, draw
    return best


@dataclass(frozen=True, slots=True)
class ArmView:
    arm: str
    observations: float
    served: float
    mean: float
    ci95: tuple[float, float]


@dataclass(frozen=True, slots=True)
class ContextView:
    """One context as operators see it: every arm's posterior, the client's current choice, and the regret."""

    context: str
    choice: str
    reason: str
    arms: tuple[ArmView, ...]
    served: float  # auto's own graded outcomes in this context
    served_success: float | None  # their posterior mean success, on the arms' prior (None: none yet)
    best_arm: str  # the tried arm with the best posterior mean (an untried one sits at the prior: not "best")
    best_mean: float | None

    @property
    def regret(self) -> float | None:
        """The best tried arm's posterior mean minus that of auto's own choices (None before both exist): both
        on the same prior, so an arm with a lucky few is not compared raw with a long record."""
        if self.served_success is None or self.best_mean is None:
            return None
        return self.best_mean - self.served_success


def views(stats: AutoStats, now: float, config: AutoConfig) -> tuple[ContextView, ...]:
    """Every context seen, as :class:`ContextView` (what ``GET /admin/auto``, the CLI and the metrics show)."""
    arms = [a.text() for a in config.arms]
    out = []
    for context in stats.contexts:
        rows = []
        for arm in arms:
            posterior = stats.posterior(context, arm, now, config)
            low, high = posterior.interval(config.confidence)
            served = stats.served.get((context, arm), Tally()).decayed(now, config.half_life_s).n
            rows.append(ArmView(arm, posterior.n, served, posterior.mean, (low, high)))
        tallies = [t.decayed(now, config.half_life_s) for (c, _), t in stats.served.items() if c == context]
        n = sum(t.n for t in tallies)
        served_mean = (config.prior[0] + sum(t.successes for t in tallies)) / (sum(config.prior) + n)
        choice, reason = exploit(stats, context, arms, now, config)
        tried = [r for r in rows if r.observations > 0]
        best = max(tried, key=lambda r: r.mean) if tried else None
        out.append(ContextView(context, choice, reason, tuple(rows), n, served_mean if n > 0 else None,
                               best.arm if best else "-", best.mean if best else None))
    return tuple(out)


class Arms(Protocol):
    """How :class:`AutoPolicy` runs the arm it chose (the router: its policy registry)."""

    def needs_candidates(self, spec: PolicySpec) -> bool:
        """Whether ``spec`` only means something with nearest adapters found (``select``, ``average``)."""

    async def run(self, query: RoutingQuery) -> RoutingDecision:
        """The decision of ``query.policy`` (an arm) on ``query``."""


class AutoPolicy:
    """``auto`` as a policy: the context from the router's signals, an arm by :func:`exploit` (or, at
    ``explore_rate``, :func:`explore`), then the arm's own policy decides. An arm that cannot run the
    request (a searching policy with nothing found, a 4xx from its policy) is left out and the next chosen."""

    def __init__(self, config: AutoConfig, stats: Callable[[], AutoStats], *, min_score: float,
                 rng: random.Random | None = None, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.stats = stats
        self.min_score = min_score
        self.rng = rng or random.Random()
        self.clock = clock or time.time
        self.arms = {a.text(): a for a in config.arms}

    def context(self, query: RoutingQuery) -> str:
        stats = self.stats()
        return stats.bucket(context_of(self.config.features, Signals(query.candidates, query.compositional,
                                                                      self.min_score)), self.config)

    async def decide(self, query: RoutingQuery, arms: Arms) -> RoutingDecision:
        stats, now = self.stats(), self.clock()
        context = self.context(query)
        runnable = [arm for arm, spec in self.arms.items() if query.candidates or not arms.needs_candidates(spec)]
        explore_now = self.config.explore_rate > 0 and self.rng.random() < self.config.explore_rate
        while runnable:
            if explore_now:
                arm, reason = explore(stats, context, runnable, now, self.config, self.rng) or runnable[0], "explore"
            else:
                arm, reason = exploit(stats, context, runnable, now, self.config)
            try:
                decision = await arms.run(replace(query, policy=self.arms[arm]))
            except LoragateError as exc:
                if exc.status >= 500:
                    raise
                runnable.remove(arm)  # e.g. chain with nothing registered: the request cannot run it
                continue
            return replace(decision, auto=AutoChoice(context, arm, reason, tuple(runnable)))
        raise InvalidRequest("auto: none of the configured arms can run this request", param="X-Adapter-Policy",
                             code="no_runnable_arm")

