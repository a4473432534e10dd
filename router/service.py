"""The router service: resolves ``auto``, searches for searching policies, asks the policy.

Built once at startup. For ``select``/``average`` it asks the :class:`~loragate.router.search.Searcher` for
the prompt's nearest adapters (one embedder, or the static -> MiniLM cascade), runs compositional
detection on what it found, then hands the policy an immutable :class:`RoutingQuery`. ``base`` and
``pin`` never pay for an embedding.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest
from loragate.router.auto import AutoPolicy
from loragate.router.compositional import Detector
from loragate.router.policies import AUTO, POLICIES, Policy, policy_names
from loragate.router.search import Searcher
from loragate.router.types import PolicySpec, RouterConfig, RoutingDecision, RoutingQuery


def resolve_policy(policies: Mapping[str, Policy], spec: PolicySpec, *, routing: bool) -> Policy:
    """The policy ``spec`` names, checked: registered, servable here (``routing``: an embedder and an
    index exist), parameters it takes. The router asks this per request; startup asks it of the
    configured policies before anything is built (:func:`check_policy`)."""
    policy = policies.get(spec.name)
    if policy is None:
        raise InvalidRequest(f"unsupported adapter policy {spec.name!r}; supported: {', '.join(policy_names())}",
                             param="X-Adapter-Policy", code="unsupported_policy")
    if policy.needs_candidates and not routing:
        raise InvalidRequest(f"policy {spec.name!r} needs semantic routing, which is not configured here",
                             param="X-Adapter-Policy", code="unsupported_policy")
    policy.check_params(spec)
    return policy


def check_policy(spec: PolicySpec, config: RouterConfig, *, routing: bool) -> None:
    """What :meth:`Router.resolve` would refuse of a configured policy, without building a router."""
    if spec.name == AUTO:
        raise InvalidRequest("a configured policy cannot itself be 'auto' (auto means the default_policy)",
                             code="unsupported_policy")
    resolve_policy({name: cls(config) for name, cls in POLICIES.items()}, spec, routing=routing)


def tail_words(text: str, max_words: int) -> str:
    """The last ``max_words`` words of ``text``: what routing reads of a long prompt.

    A chat's routing text is every message joined, system prompt first, and what a request is about sits
    at its end (the latest user turn). MiniLM reads only its first 256 word pieces, so without this a long
    history would be routed by its system prompt; and embedding cost grows with length while the
    question does not. Shorter texts pass unchanged.
    """
    if len(text) <= max_words * 2:  # fewer characters than words x 2: cannot have too many words
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[-max_words:])


def _auto_takes_no_params(spec: PolicySpec) -> None:
    if spec.name == AUTO and spec.params:
        raise InvalidRequest(f"auto takes no parameters, got {sorted(spec.params)}", param="X-Adapter-Policy",
                             code="invalid_policy")


class Router:
    """Holds one instance of every registered policy and the search machinery they share."""

    def __init__(self, default_policy: PolicySpec, config: RouterConfig | None = None, *,
                 searcher: Searcher | None = None, detector: Detector | None = None,
                 auto: AutoPolicy | None = None) -> None:
        self.config = config or RouterConfig()
        self._policies: dict[str, Policy] = {name: cls(self.config) for name, cls in POLICIES.items()}
        if default_policy.name == AUTO:
            raise ValueError("the default policy cannot itself be 'auto'")
        self.default_policy = default_policy
        self.searcher = searcher
        self.detector = detector
        self.auto = auto  # the learned auto (None: auto is the default policy)
        self.resolve(default_policy)  # fail at startup, not on the first request
        for arm in auto.config.arms if auto is not None else ():
            self.resolve(arm)

    @property
    def routing(self) -> bool:
        return self.searcher is not None

    def resolve(self, spec: PolicySpec) -> tuple[Policy, PolicySpec]:
        """The policy object and effective spec for a request (``auto`` becomes the default)."""
        if spec.name == AUTO:
            spec = self.default_policy
        return resolve_policy(self._policies, spec, routing=self.routing), spec

    def check(self, spec: PolicySpec) -> None:
        """What :meth:`decide` would refuse of ``spec`` before routing (a request's policy: a 400 while parsing)."""
        _auto_takes_no_params(spec)
        self.resolve(spec)

    def searches(self, spec: PolicySpec) -> bool:
        """Whether deciding ``spec`` embeds and searches here (the learned auto always does: it needs the
        nearest adapter and the compositional flag); the pipeline's routing gate admits only these."""
        if self.searcher is None:
            return False
        if spec.name == AUTO and self.auto is not None:
            return True
        effective = self.default_policy if spec.name == AUTO else spec
        policy = self._policies.get(effective.name)
        return policy is not None and policy.search_for(effective)  # chain searches for its candidates too

    def needs_candidates(self, spec: PolicySpec) -> bool:
        """Whether ``spec`` (an arm of the learned auto) can only run with nearest adapters found: ``select`` and
        ``average``. Not :meth:`searches`: ``chain`` searches for its candidates but runs without them."""
        return self._policies[spec.name].needs_candidates

    async def run(self, query: RoutingQuery) -> RoutingDecision:
        """An arm of the learned auto: its policy decides on the query the router already searched for."""
        policy, _ = self.resolve(query.policy)
        return await policy.decide(query)

    async def nearest(self, text: str, among: Sequence[str]) -> tuple[tuple[str, float], ...]:
        """``among`` ranked by their descriptors' similarity to ``text``, best first (``chain;choose=route``
        asks this at every step); empty without routing or descriptors, so the caller's order decides."""
        if not text.strip():
            return ()
        scores = await self._similarities([text] * len(among), among)
        found = [(name, score) for name, score in zip(among, scores, strict=True) if score is not None]
        return tuple(sorted(found, key=lambda kv: (-kv[1], kv[0])))

    async def fit(self, texts: Sequence[str], adapters: Sequence[str]) -> list[float]:
        """Each text's similarity to its adapter's own descriptors, embedded in one batch (``chain;topic=``
        weighs a step by it); 0.0 without routing or for an adapter without descriptors."""
        return [score or 0.0 for score in await self._similarities(texts, adapters)]

    async def _similarities(self, texts: Sequence[str], adapters: Sequence[str]) -> list[float | None]:
        """Each text against its adapter's own descriptor vectors (the precise tier's, exact); None where
        there is no routing or the adapter has no descriptors."""
        if self.searcher is None:
            return [None] * len(texts)
        return await self.searcher.similarities(texts, adapters)

    async def decide(self, prompt: str, spec: PolicySpec,
                     adapters: Mapping[str, AdapterRecord]) -> RoutingDecision:
        decide_started = time.perf_counter()
        _auto_takes_no_params(spec)  # the rest of check() is resolve(), once, below
        learned = self.auto if spec.name == AUTO else None
        policy, effective = self.resolve(spec)
        candidates: tuple[tuple[str, float], ...] = ()
        compositional: bool | None = None
        embed_s = search_s = 0.0
        tier = ""
        searcher, detector = self.searcher, self.detector
        if self.searches(spec) and prompt.strip() and searcher and searcher.size:
            text = tail_words(prompt, self.config.max_words)
            probe = detector.probe(text) if detector else None
            found = await searcher.find(text, probe.texts if probe else [], self.config.candidates, adapters)
            candidates, embed_s, search_s, tier = found.candidates, found.embed_s, found.search_s, found.tier
            compositional = detector.detect(probe, found.detected, found.parts) if detector and probe else None
        query = RoutingQuery(prompt=prompt, policy=effective, adapters=adapters, candidates=candidates,
                             compositional=compositional)
        decision = await (learned.decide(query, self) if learned is not None else policy.decide(query))
        # keep what the client asked for ("auto"), not what it resolved to, in the record
        return replace(decision, policy_asked=spec.text(), compositional=compositional, embed_s=embed_s,
                       search_s=search_s, tier=tier, decide_s=time.perf_counter() - decide_started)
