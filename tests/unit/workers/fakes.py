"""A fake vLLM admin API for pool tests: records calls, injects faults, can hold a load open."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from loragate.errors import UpstreamError, WorkerRejected
from loragate.workers.client import Probe
from loragate.workers.observer import PoolObserver
from loragate.workers.stats import EngineStats


@dataclass
class FakeAdmin:
    """Per-URL adapter sets, like real workers; every call is appended to ``calls``."""

    loaded: dict[str, set[str]] = field(default_factory=dict)
    roots: dict[tuple[str, str], str] = field(default_factory=dict)  # (url, adapter) -> path it was loaded from
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # URLs that refuse connections
    slow: set[str] = field(default_factory=set)  # URLs whose health probes time out
    bad_adapters: set[str] = field(default_factory=set)  # adapters whose load fails (bad files)
    engine: dict[str, EngineStats] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # when set, loads wait on it (to hold a load in flight)

    def _reach(self, url: str) -> None:
        if url in self.down:
            raise UpstreamError(f"worker {url} unreachable: connection refused")

    async def load_adapter(self, base_url: str, name: str, path: str) -> bool:
        self.calls.append(("load", base_url, name))
        self._reach(base_url)
        if self.gate is not None:
            await self.gate.wait()
        if name in self.bad_adapters:
            raise WorkerRejected(f"worker {base_url} could not load adapter {name!r}: bad file", status=502,
                                 code="adapter_load_failed")
        added = name not in self.loaded.setdefault(base_url, set())
        self.loaded[base_url].add(name)
        self.roots[base_url, name] = path
        return added

    async def resolve_adapter(self, base_url: str, name: str) -> bool:
        self.calls.append(("resolve", base_url, name))
        return await self.load_adapter(base_url, name, "")

    async def unload_adapter(self, base_url: str, name: str) -> bool:
        self.calls.append(("unload", base_url, name))
        self._reach(base_url)
        had = name in self.loaded.get(base_url, set())
        self.loaded.get(base_url, set()).discard(name)
        return had

    async def list_adapters(self, base_url: str) -> dict[str, str]:
        self.calls.append(("list", base_url, ""))
        self._reach(base_url)
        return {name: self.roots.get((base_url, name), "") for name in sorted(self.loaded.get(base_url, set()))}

    async def probe(self, base_url: str, timeout_s: float = 2.0) -> Probe:
        return Probe.DOWN if base_url in self.down else Probe.SLOW if base_url in self.slow else Probe.OK

    async def engine_stats(self, base_url: str, timeout_s: float = 2.0) -> EngineStats:
        self._reach(base_url)
        return self.engine.get(base_url, EngineStats(scraped_at=0.0))

    def count(self, kind: str, url: str | None = None) -> int:
        return sum(1 for k, u, _ in self.calls if k == kind and (url is None or u == url))


class RecordingObserver(PoolObserver):
    """Overrides every PoolObserver event and keeps them all."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def adapter_loaded(self, worker: str, adapter: str, seconds: float, ok: bool) -> None:
        self.events.append(("loaded", worker, adapter, ok))

    def adapters_on_worker(self, worker: str, count: int) -> None:
        self.events.append(("count", worker, count))

    def worker_health(self, worker: str, healthy: bool) -> None:
        self.events.append(("health", worker, healthy))

    def adapter_evicted(self, worker: str, adapter: str) -> None:
        self.events.append(("evicted", worker, adapter))

    def adapter_load_failed(self, worker: str, adapter: str, message: str) -> None:
        self.events.append(("load_failed", worker, adapter))

    def panic_routed(self, worker: str) -> None:
        self.events.append(("panic", worker))

    def worker_removed(self, worker: str) -> None:
        self.events.append(("removed", worker))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [e for e in self.events if e[0] == kind]
