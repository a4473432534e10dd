"""Routing policies: a name -> class registry behind one async interface.

Each policy declares the parameters it accepts, so unknown parameters are rejected with a message
listing the valid ones, and an unknown policy name lists the registered policies. Policies read
a :class:`RoutingQuery` and return a :class:`RoutingDecision`; they never touch HTTP objects.
Searching policies (``select``, ``average``) get the nearest adapters precomputed by the router.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from loragate.adapters.merge import MERGE_PARAMS, get_method
from loragate.errors import InvalidRequest, NotFound
from loragate.router.types import (
    CHAIN_CONTRAST,
    CHAIN_DELIMITERS,
    CHAIN_SCORES,
    CHAIN_TOPIC,
    AdapterWeight,
    ChainPlan,
    ParamValue,
    PolicySpec,
    RouterConfig,
    RoutingDecision,
    RoutingQuery,
)

WEIGHTINGS = ("uniform", "score", "softmax")


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="X-Adapter-Policy", code="invalid_policy")


def number(spec: PolicySpec, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
           open_low: bool = False) -> float:
    """A numeric parameter within [lo, hi] (or (lo, hi] with ``open_low``); 400 naming the range otherwise."""
    value = spec.params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _bad(f"{spec.name}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not (lo < value <= hi if open_low else lo <= value <= hi) or math.isnan(value):
        bounds = f"({lo}, {hi}]" if open_low else f"[{lo}, {hi}]"
        raise _bad(f"{spec.name}: {key}={value} is out of range {bounds}")
    return value


def text(spec: PolicySpec, key: str, default: str) -> str:
    value = spec.params.get(key, default)
    if not isinstance(value, str):
        raise _bad(f"{spec.name}: {key} must be a token or string, got {value!r}")
    return value


class Policy(ABC):
    """One routing strategy. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()
    # only means something with nearest adapters found (select, average): refused without routing, skipped
    # by the learned auto when nothing was found. Whether the router searches at all is :meth:`search_for`.
    needs_candidates: ClassVar[bool] = False

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def search_for(self, spec: PolicySpec) -> bool:
        """Whether the router should embed and search for ``spec`` (when routing is configured at all)."""
        return self.needs_candidates

    def check_params(self, spec: PolicySpec) -> None:
        unknown = sorted(set(spec.params) - self.params)
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise _bad(f"policy {self.name!r} does not take {unknown}; its parameters: {allowed}")

    def decision(self, query: RoutingQuery, adapters: tuple[AdapterWeight, ...] = (), *,
                 method: str | None = None, merge_params: Mapping[str, ParamValue] | None = None) -> RoutingDecision:
        return RoutingDecision(policy_asked=query.policy.text(), policy_applied=self.name, adapters=adapters,
                               candidates=query.candidates, method=method,
                               merge_params=MappingProxyType(dict(merge_params or {})),
                               fallback=self.needs_candidates and not adapters)

    @abstractmethod
    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        """Choose the adapters for one request."""


class BasePolicy(Policy):
    """No adapter: the base model answers."""

    name = "base"

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        return self.decision(query)


def registered(query: RoutingQuery, name: str) -> str:
    if name not in query.adapters:
        raise NotFound(f"adapter {name!r} is not registered", param="adapter", code="adapter_not_found")
    return name


class PinPolicy(Policy):
    """Exactly the named adapter."""

    name = "pin"
    params = frozenset({"adapter"})

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        adapter = query.policy.params.get("adapter")
        if not isinstance(adapter, str) or not adapter:
            raise _bad('pin needs an adapter: pin;adapter="name"')
        return self.decision(query, (AdapterWeight(registered(query, adapter), 1.0),))


class SelectPolicy(Policy):
    """Dynamic selection: the nearest adapter when its score reaches ``min_score``, else the base."""

    name = "select"
    params = frozenset({"min_score"})
    needs_candidates = True

    def check_params(self, spec: PolicySpec) -> None:
        super().check_params(spec)
        number(spec, "min_score", self.config.min_score, -1.0, 1.0)

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        min_score = number(query.policy, "min_score", self.config.min_score, -1.0, 1.0)
        if query.candidates and query.candidates[0][1] >= min_score:
            return self.decision(query, (AdapterWeight(query.candidates[0][0], 1.0),))
        return self.decision(query)


def similarity_weights(scores: list[float], how: str, temperature: float) -> list[float]:
    """Turn similarity scores into weights that sum to 1."""
    if how == "uniform":
        return [1.0 / len(scores)] * len(scores)
    if how == "score":
        clipped = [max(s, 0.0) for s in scores]
        total = sum(clipped)
        return [c / total for c in clipped] if total > 0 else [1.0 / len(scores)] * len(scores)
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    return [e / sum(exps) for e in exps]


def round_weights(weights: Sequence[float], step: float) -> list[float]:
    """Quantise similarity-derived weights to multiples of ``step`` that sum to exactly 1.

    Routing turns scores into weights with many decimals; two prompts that pick the same adapters
    with nearly the same scores should share one merged adapter (and one cache entry), so weights are
    snapped to a grid. Largest-remainder rounding keeps the sum at 1 *on* the grid (plain rounding
    then renormalising would leave the grid). When 1/step is not an integer there is no grid that
    sums to 1, so values are rounded and renormalised. Weights may round to 0: callers drop those.
    """
    if not (math.isfinite(step) and 0 < step <= 1):
        raise InvalidRequest(f"weight step must be in (0, 1], got {step!r}", param="weight_step",
                             code="invalid_weights")
    values = [float(w) for w in weights]
    total = sum(values)
    if not values or min(values) < 0 or not math.isfinite(total) or total <= 0:
        raise InvalidRequest(f"weights must be non-negative with a positive, finite sum, got {values}",
                             param="weights", code="invalid_weights")
    units = 1 / step
    whole = round(units)
    if abs(units - whole) > 1e-9:
        rounded = [round(v / total / step) * step for v in values]
        if sum(rounded) <= 0:
            rounded = [v / total for v in values]
        return [round(r / sum(rounded), 12) for r in rounded]
    exact = [v / total * whole for v in values]
    counts = [math.floor(x) for x in exact]
    remainders = sorted(range(len(values)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in remainders[: whole - sum(counts)]:
        counts[i] += 1
    return [c / whole for c in counts]


class AveragePolicy(Policy):
    """Parameter averaging: a weighted merge of the top-k adapters above ``min_score`` (or a given list).

    The merge method's own parameters (``density``, ``majority``, ``seed``, ``target_rank``) ride along in
    the decision and are validated by the method here, so a bad one is a 400 before anything is searched.
    """

    name = "average"
    params = frozenset({"k", "min_score", "method", "weights", "temperature", "adapters", *MERGE_PARAMS})
    needs_candidates = True

    def check_params(self, spec: PolicySpec) -> None:
        super().check_params(spec)
        number(spec, "k", self.config.k, 1, self.config.max_k, integer=True)
        number(spec, "min_score", self.config.min_score, -1.0, 1.0)
        number(spec, "temperature", self.config.temperature, 0.0, 100.0, open_low=True)
        self._merge(spec)
        weights = text(spec, "weights", self.config.weights)
        if weights not in WEIGHTINGS:
            explicit = self._explicit_weights(spec, weights)
            names = self._explicit_adapters(spec)
            if names is None or len(names) != len(explicit):
                raise _bad(f'average: explicit weights need adapters="a b" of the same length; valid weightings: '
                           f"{', '.join(WEIGHTINGS)} or numbers")

    def _merge(self, spec: PolicySpec) -> tuple[str, dict[str, ParamValue]]:
        """The merge method and its parameters as asked; 400 for an unknown method (listing them), a parameter
        the method does not take or one out of range (naming it)."""
        method = text(spec, "method", self.config.method)
        merge_params = {k: v for k, v in spec.params.items() if k in MERGE_PARAMS}
        try:
            get_method(method, merge_params)
        except InvalidRequest as exc:
            if exc.code == "unknown_merge_method":
                raise
            raise _bad(f"average: {exc.message}") from exc
        return method, merge_params

    @staticmethod
    def _explicit_adapters(spec: PolicySpec) -> list[str] | None:
        raw = spec.params.get("adapters")
        if raw is None:
            return None
        names = str(raw).split()
        if not names or len(set(names)) != len(names):
            raise _bad(f"average: adapters must list distinct names, got {raw!r}")
        return names

    @staticmethod
    def _explicit_weights(spec: PolicySpec, raw: str) -> list[float]:
        try:
            values = [float(w) for w in raw.split()]
        except ValueError as exc:
            raise _bad(f"average: weights must be one of {', '.join(WEIGHTINGS)} or numbers, got {raw!r}") from exc
        if not values or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise _bad(f"average: explicit weights must be non-negative with a positive sum, got {raw!r}")
        return [v / sum(values) for v in values]

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        spec = query.policy
        method, merge_params = self._merge(spec)
        how = text(spec, "weights", self.config.weights)
        names = self._explicit_adapters(spec)
        scores = dict(query.candidates)
        if names is not None:
            chosen = [(registered(query, n), scores.get(n, 0.0)) for n in names]
        else:
            k = int(number(spec, "k", self.config.k, 1, self.config.max_k, integer=True))
            min_score = number(spec, "min_score", self.config.min_score, -1.0, 1.0)
            chosen = [(n, s) for n, s in query.candidates[:k] if s >= min_score]
        if not chosen:
            return self.decision(query)
        if how in WEIGHTINGS:
            temperature = number(spec, "temperature", self.config.temperature, 0.0, 100.0, open_low=True)
            weights = similarity_weights([s for _, s in chosen], how, temperature)
            if self.config.weight_step > 0:  # nearby decisions then share one merged adapter
                weights = round_weights(weights, self.config.weight_step)
        else:
            weights = self._explicit_weights(spec, how)
        kept = tuple(AdapterWeight(n, w) for (n, _), w in zip(chosen, weights, strict=True) if w > 0)
        if len(kept) < 2:
            return self.decision(query, kept)
        return self.decision(query, kept, method=method, merge_params=merge_params)


class ChainPolicy(Policy):
    """Step-wise composition: the answer is generated one step at a time, choosing the adapter again at each.

    The decision only names the candidates (``adapters=`` as given, else the ``k`` nearest by the
    descriptor index, else the first ``k`` registered by name) and how to choose among them; the
    server's chain executor runs the steps. Nothing is merged. It searches when routing is
    configured and no list is given, but does not need routing (without it, registered names are used).
    """

    name = "chain"
    params = frozenset({"k", "choose", "max_steps", "adapters", "base", "delim", "score", "contrast", "topic"})
    CHOOSERS = ("likelihood", "route")
    MAX_K = 4
    MAX_STEPS = 32

    def search_for(self, spec: PolicySpec) -> bool:
        return "adapters" not in spec.params

    def check_params(self, spec: PolicySpec) -> None:
        super().check_params(spec)
        self._plan_params(spec)
        self._explicit(spec)

    def _plan_params(self, spec: PolicySpec) -> tuple[int, str, int, bool, tuple[str, ...], str, float, float]:
        k = int(number(spec, "k", min(self.config.k, self.MAX_K), 1, self.MAX_K, integer=True))
        choose = text(spec, "choose", "likelihood")
        if choose not in self.CHOOSERS:
            raise _bad(f"chain: choose must be one of {', '.join(self.CHOOSERS)}, got {choose!r}")
        max_steps = int(number(spec, "max_steps", 8, 1, self.MAX_STEPS, integer=True))
        base = spec.params.get("base", False)
        if not isinstance(base, bool):
            raise _bad(f"chain: base must be a boolean (base=?1 or base=?0), got {base!r}")
        delim = text(spec, "delim", "sentence")
        if delim not in CHAIN_DELIMITERS:
            raise _bad(f"chain: delim must be one of {', '.join(CHAIN_DELIMITERS)}, got {delim!r}")
        score = text(spec, "score", CHAIN_SCORES[0])
        if score not in CHAIN_SCORES:
            raise _bad(f"chain: score must be one of {', '.join(CHAIN_SCORES)}, got {score!r}")
        contrast = number(spec, "contrast", CHAIN_CONTRAST, 0.0, 1.0)
        topic = number(spec, "topic", CHAIN_TOPIC, 0.0, 1.0)
        return k, choose, max_steps, base, CHAIN_DELIMITERS[delim], score, contrast, topic

    def _explicit(self, spec: PolicySpec) -> list[str] | None:
        raw = spec.params.get("adapters")
        if raw is None:
            return None
        names = str(raw).split()
        if not names or len(set(names)) != len(names) or len(names) > self.MAX_K:
            raise _bad(f"chain: adapters must list 1 to {self.MAX_K} distinct names, got {raw!r}")
        return names

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        k, choose, max_steps, base, delimiters, score, contrast, topic = self._plan_params(query.policy)
        names = self._explicit(query.policy)
        if names is not None:
            candidates = tuple(registered(query, n) for n in names)
        elif query.candidates:
            candidates = tuple(n for n, _ in query.candidates[:k])
        else:
            candidates = tuple(sorted(query.adapters)[:k])
        if not candidates and not base:
            raise InvalidRequest("chain: no adapter is registered to choose from (add base=?1 to chain the base "
                                 "model alone)", param="X-Adapter-Policy", code="no_candidates")
        plan = ChainPlan(candidates, base=base, choose=choose, max_steps=max_steps, delimiters=delimiters,
                         score=score, contrast=contrast, topic=topic)
        return RoutingDecision(policy_asked=query.policy.text(), policy_applied=self.name,
                               candidates=query.candidates, chain=plan)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (BasePolicy, PinPolicy, SelectPolicy, AveragePolicy,
                                                              ChainPolicy)}
AUTO = "auto"


def policy_names() -> list[str]:
    return sorted([*POLICIES, AUTO])
