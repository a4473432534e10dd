"""The pool's mutable bookkeeping of one worker, shared by the modules that compose the pool.

Loading and eviction (:mod:`~loragate.workers.pool`), health (:mod:`~loragate.workers.health`) and
reconciling (:mod:`~loragate.workers.reconcile`) each change their own fields of one
:class:`WorkerState`, only from the event loop. Scheduling never sees it: it reads the immutable
:class:`~loragate.workers.stats.WorkerStats` that :meth:`WorkerState.stats` publishes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loragate.workers.client import Probe
from loragate.workers.stats import EngineStats, LoadBackoff, WorkerStats

if TYPE_CHECKING:
    from loragate.workers.pool import WorkerSpec


@dataclass(slots=True)
class WorkerState:
    """Mutable per-worker bookkeeping, touched only from the event loop."""

    spec: WorkerSpec
    index: int
    max_loras: int
    healthy: bool = True
    in_flight: int = 0
    loaded: OrderedDict[str, float] = field(default_factory=OrderedDict)  # adapter -> last use; LRU first
    adapter_in_flight: Counter[str] = field(default_factory=Counter)
    loading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    unloading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    engine: EngineStats = field(default_factory=EngineStats)
    good_probes: int = 0
    bad_probes: int = 0
    last_failure: Probe = Probe.OK  # what took it out of rotation last: SLOW keeps it eligible for panic routing
    generation: int = 0  # bumped on reset: a load or reconcile that finishes after a reset is not recorded
    load_failures: dict[str, LoadBackoff] = field(default_factory=dict)
    admitted: bool = True  # False for a discovered worker until its first good probe: it joins on one
    removed: bool = False  # discovery dropped it: out of the pool, kept only until its requests in flight end

    @property
    def url(self) -> str:
        return self.spec.url

    def reset(self) -> None:
        """Forget what the worker had loaded: it may be a fresh vLLM process that has nothing."""
        self.generation += 1
        self.loaded.clear()
        self.load_failures.clear()
        self.engine = EngineStats()

    def stats(self) -> WorkerStats:
        victim = next((a for a in self.loaded if not self.adapter_in_flight[a]), None)
        return WorkerStats(url=self.url, index=self.index, healthy=self.healthy, in_flight=self.in_flight,
                           loaded=tuple(self.loaded), max_loras=self.max_loras, loading=tuple(sorted(self.loading)),
                           engine=self.engine,
                           adapter_in_flight=tuple(sorted((a, n) for a, n in self.adapter_in_flight.items() if n)),
                           victim_idle_s=None if victim is None else time.monotonic() - self.loaded[victim],
                           panic_eligible=not self.healthy and self.admitted and self.last_failure is Probe.SLOW,
                           backoff=tuple(self.load_failures.values()) if self.load_failures else ())
