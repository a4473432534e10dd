"""Semantic search for routing: one embedder and its descriptor index, or a cascade of two.

The router asks a :class:`Searcher` one question per routed request, :meth:`Searcher.find`: the prompt's
nearest adapters, plus the nearest adapters of each extra text the compositional detector wants
(its clauses). Everything heavy stays off the event loop: embedding runs on the embedder's worker
thread (micro-batched with other requests), and a large exact index is searched in a thread.

Two searchers, one interface:

* :class:`IndexSearcher` is one :class:`Tier` (an embedder and the index of its vectors).
* :class:`CascadeSearcher` is why this module exists. A static embedder costs ~0.05 ms a prompt and ranks
  most prompts as MiniLM does, but not all; MiniLM costs ~3 ms. The cascade asks the fast tier first
  and the precise tier only when the fast answer is ambiguous (:class:`Escalation`: the two best
  adapters too close, or the best too weak and no clearer than the rest), so most requests route at the
  static price and the hard ones at MiniLM's quality. The margin, floor and floor gap are chosen on a
  training split of the labelled routing set by ``bench/bench_routing.py`` and reported on a held-out set.

Detection always reads the fast tier (its clause vectors cost next to nothing), so the compositional
flag means the same thing whether or not a request escalated.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field

from loragate.adapters.types import AdapterRecord
from loragate.router.embedder import Embedder, EmbedderStats
from loragate.router.index import DescriptorIndex

Candidates = tuple[tuple[str, float], ...]

CASCADE = "cascade"
"""The ``embedder`` setting for two backends: ``cascade_fast`` first, ``cascade_precise`` when ambiguous."""


@dataclass(frozen=True, slots=True)
class Found:
    """What one search found, immutable: the deciding tier's candidates for the prompt, the detection tier's
    candidates for the prompt and for each extra text, which tier decided, and the time spent."""

    candidates: Candidates
    detected: Candidates
    parts: tuple[Candidates, ...] = ()
    tier: str = ""
    embed_s: float = 0.0
    search_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Escalation:
    """When the fast tier's answer is not good enough to route on.

    ``margin``: the best two adapters' fast scores closer than this (the ranking is a coin toss).
    ``floor``: the best fast score below this (static scores run higher than MiniLM's on unrelated prompts,
    so a weak static match cannot tell "this adapter" from "no adapter"; MiniLM decides against min_score).
    ``floor_gap``: the floor applies only while the best fast score also stands less than this above the mean
    of the other candidates'. An unrelated prompt matches every adapter about equally (on the training split
    no `none` prompt's best stands more than 0.15 above the rest), where a weak but on-topic one still singles
    its adapter out. Escalating those too cost accuracy (MiniLM re-ranked some right static answers wrong) and
    most of the escalations: on the training split (bench_routing, 2026-12-07) floor 0.5 alone escalates 42% of
    prompts at 95.8% nearest = label, with gap 0.11 11% at 97.5%. The gap reads the k candidates, so a registry
    much larger than the labelled sets' eight adapters has closer runners-up and escalates more (CPU, not
    accuracy); 2 turns it off.
    """

    margin: float = 0.0
    floor: float = -1.0
    floor_gap: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"cascade margin must be in [0, 2], got {self.margin}")
        if not -1.0 <= self.floor <= 1.0:
            raise ValueError(f"cascade floor must be in [-1, 1], got {self.floor}")
        if not 0.0 <= self.floor_gap <= 2.0:
            raise ValueError(f"cascade floor gap must be in [0, 2], got {self.floor_gap}")

    def ambiguous(self, candidates: Candidates) -> bool:
        if not candidates:
            return False  # no adapter has descriptors here: the precise tier has none either
        best = candidates[0][1]
        if len(candidates) > 1 and best - candidates[1][1] < self.margin:
            return True
        if best >= self.floor:
            return False
        others = [score for _, score in candidates[1:]]
        return not others or best - sum(others) / len(others) < self.floor_gap  # one adapter: no gap to read


@dataclass(frozen=True, slots=True)
class TierStats:
    """A searcher's counters since start: each tier's embedder and how many searches each tier decided."""

    embedders: Mapping[str, EmbedderStats]
    decided: Mapping[str, int] = field(default_factory=dict)


class Tier:
    """One embedder and the descriptor index of its vectors."""

    def __init__(self, name: str, embedder: Embedder, index: DescriptorIndex) -> None:
        self.name = name
        self.embedder = embedder
        self.index = index

    @property
    def size(self) -> int:
        return self.index.snapshot().size

    async def search(self, texts: Sequence[str], k: int, among: Container[str]
                     ) -> tuple[list[Candidates], float, float]:
        """Each text's ``k`` nearest adapters among ``among``, the texts embedded in one batch; (results,
        embed seconds, search seconds)."""
        started = time.perf_counter()
        vectors = await self.embedder.embed_many(texts)
        embed_s = time.perf_counter() - started
        index = self.index

        def search() -> tuple[list[Candidates], float]:
            begun = time.perf_counter()
            found = [tuple((n, s) for n, s in row if n in among) for row in index.search_many(vectors, k)]
            return found, time.perf_counter() - begun

        # a large exact index searches in a thread; a small one inline (index.THREAD_MIN_VECTORS)
        results, search_s = await asyncio.to_thread(search) if index.blocks_loop else search()
        return results, embed_s, search_s

    async def similarities(self, texts: Sequence[str], adapters: Sequence[str]) -> list[float | None]:
        """Each text against its adapter's own descriptor vectors, exact (not a nearest-k search), the texts
        embedded in one batch; None where the adapter has no descriptors."""
        index = self.index
        if not texts or not self.size:
            return [None] * len(texts)
        unique = list(dict.fromkeys(t if t.strip() else " " for t in texts))
        vectors = dict(zip(unique, await self.embedder.embed_many(unique), strict=True))

        def score() -> list[float | None]:
            return [index.similarity(vectors[t if t.strip() else " "], a) for t, a in zip(texts, adapters, strict=True)]

        return await asyncio.to_thread(score) if index.blocks_loop else score()


class Searcher(ABC):
    """The router's semantic search, built once at startup (see the module docstring)."""

    tiers: tuple[Tier, ...]

    def __init__(self) -> None:
        self._decided: dict[str, int] = {tier.name: 0 for tier in self.tiers}

    @abstractmethod
    async def find(self, prompt: str, extra: Sequence[str], k: int, among: Container[str]) -> Found:
        """The prompt's nearest adapters (``k``, among ``among``) and each extra text's, for detection."""

    @property
    def precise(self) -> Tier:
        """The tier whose scores other stages compare text against (``chain``'s step fit and route order)."""
        return self.tiers[-1]

    @property
    def identity(self) -> str:
        return "+".join(tier.embedder.identity for tier in self.tiers)

    @property
    def size(self) -> int:
        """Descriptor vectors searchable now (0: nothing is registered with descriptors yet)."""
        return self.tiers[0].size

    async def similarities(self, texts: Sequence[str], adapters: Sequence[str]) -> list[float | None]:
        return await self.precise.similarities(texts, adapters)

    async def sync(self, adapters: Mapping[str, AdapterRecord]) -> None:
        """Bring every tier's index in step with the registry."""
        for tier in self.tiers:
            await tier.index.sync(adapters)

    @property
    def embedded_on_last_sync(self) -> int:
        return max(tier.index.embedded_on_last_sync for tier in self.tiers)

    async def close(self) -> None:
        for tier in self.tiers:
            await tier.embedder.close()

    @property
    def decided(self) -> dict[str, int]:
        """Searches each tier decided since start (a copy)."""
        return dict(self._decided)

    def stats(self) -> TierStats:
        return TierStats({tier.name: tier.embedder.stats() for tier in self.tiers}, self.decided)

    def _count(self, tier: str) -> None:
        self._decided[tier] += 1


class IndexSearcher(Searcher):
    """One tier: the prompt and the detector's texts embedded in one batch and searched."""

    def __init__(self, tier: Tier) -> None:
        self.tiers = (tier,)
        super().__init__()

    async def find(self, prompt: str, extra: Sequence[str], k: int, among: Container[str]) -> Found:
        tier = self.tiers[0]
        results, embed_s, search_s = await tier.search([prompt, *extra], k, among)
        self._count(tier.name)
        return Found(results[0], results[0], tuple(results[1:]), tier.name, embed_s, search_s)


class CascadeSearcher(Searcher):
    """The fast tier for every text; the precise tier re-ranks the prompt when :class:`Escalation` says so."""

    def __init__(self, fast: Tier, precise: Tier, escalation: Escalation) -> None:
        self.tiers = (fast, precise)
        self.escalation = escalation
        super().__init__()

    async def find(self, prompt: str, extra: Sequence[str], k: int, among: Container[str]) -> Found:
        fast, precise = self.tiers
        results, embed_s, search_s = await fast.search([prompt, *extra], k, among)
        detected = candidates = results[0]
        tier = fast
        if self.escalation.ambiguous(detected):
            tier = precise
            (candidates,), more_embed_s, more_search_s = await precise.search([prompt], k, among)
            embed_s, search_s = embed_s + more_embed_s, search_s + more_search_s
        self._count(tier.name)
        return Found(candidates, detected, tuple(results[1:]), tier.name, embed_s, search_s)
