"""Resolve: a routing decision becomes what a worker loads — a registered adapter, or a cached merge.

This stage sits between the router and the workers. It reads the decision through a structural
type (:class:`Choice`) so that adapters/ keeps not importing router/, and returns a frozen
:class:`Servable` that says how it was obtained (a merge found or built, and how long that took).

Files are materialized before a path is handed on: with an object store a replica may not have an
adapter on its disk yet (it downloads and verifies it, once); the local store answers at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loragate.adapters.merge import NO_PARAMS, MergeParams
from loragate.adapters.merge_cache import MergeCache
from loragate.adapters.registry import AdapterRegistry


class Weighted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


class Choice(Protocol):
    """What resolving reads of a routing decision: the weighted adapters, the merge method and its parameters."""

    @property
    def adapters(self) -> Sequence[Weighted]: ...

    @property
    def method(self) -> str | None: ...

    @property
    def merge_params(self) -> Mapping[str, str | int | float | bool]: ...


@dataclass(frozen=True, slots=True)
class Servable:
    """The adapter a worker loads for a decision: its vLLM name and path (a merge has a method)."""

    name: str
    path: str
    method: str | None = None
    built: bool = False  # a merge built for this request (or the build it joined), not found in the cache
    build_s: float = 0.0  # the merge's build time when built, else its lookup time
    merge_s: float = 0.0  # what getting the merge cost this request, waiting included
    params: MergeParams = field(default_factory=lambda: NO_PARAMS)  # a merge's parameters (X-Adapter-Merge)


class Resolver:
    """Built once at startup with the registry, the merge cache and the merge defaults."""

    def __init__(self, registry: AdapterRegistry, merges: MergeCache, *, default_method: str, max_rank: int) -> None:
        self.registry = registry
        self.merges = merges
        self.default_method = default_method
        self.max_rank = max_rank

    async def resolve_adapter(self, name: str) -> Servable:
        """One registered adapter as it is (its files materialised where the store is remote)."""
        record = self.registry.get(name)
        return Servable(record.name, str(await self.registry.store.materialize(record.sha256)))

    async def resolve(self, choice: Choice) -> Servable | None:
        """None for the base model; one adapter as registered; several merged (reused, or built once)."""
        if not choice.adapters:
            return None
        if len(choice.adapters) == 1:
            return await self.resolve_adapter(choice.adapters[0].name)
        records = [self.registry.get(a.name) for a in choice.adapters]
        store = self.registry.store
        started = time.perf_counter()
        merged = await self.merges.get_or_build(records, [a.weight for a in choice.adapters],
                                                choice.method or self.default_method, self.max_rank,
                                                params=choice.merge_params, inputs=store)
        return Servable(merged.name, str(merged.path), merged.method, merged.built, merged.seconds,
                        time.perf_counter() - started, merged.params)
