"""One observer interface: an observer overriding some events still gets those (none is dropped because
another method is missing), and the gateway's metrics implement every event."""

from __future__ import annotations

import inspect

from loragate.server.metrics import GatewayMetrics
from loragate.workers.observer import PoolObserver
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.unit.workers.fakes import FakeAdmin

EVENTS = [name for name, _ in inspect.getmembers(PoolObserver, inspect.isfunction) if not name.startswith("_")]


class EvictionsOnly(PoolObserver):
    def __init__(self) -> None:
        self.evicted: list[str] = []

    def adapter_evicted(self, worker: str, adapter: str) -> None:
        self.evicted.append(adapter)


async def test_a_partial_observer_receives_the_events_it_overrides() -> None:
    observer = EvictionsOnly()
    pool = WorkerPool(["http://w0"], FakeAdmin(), observer, PoolConfig(max_loras=1))
    for adapter in ("a", "b", "c"):
        async with pool.lease(adapter, f"/{adapter}"):
            pass
    pool.report_failure("http://w0")  # events it does not override are no-ops
    assert observer.evicted == ["a", "b"]


def test_the_base_observer_ignores_every_event() -> None:
    assert set(EVENTS) == {"adapter_loaded", "adapters_on_worker", "worker_health", "adapter_evicted",
                           "adapter_load_failed", "panic_routed", "worker_removed"}
    observer = PoolObserver()
    for name in EVENTS:
        parameters = list(inspect.signature(getattr(PoolObserver, name)).parameters)[1:]
        getattr(observer, name)(*["x"] * len(parameters))


def test_gateway_metrics_implement_every_event() -> None:
    missing = [name for name in EVENTS if getattr(GatewayMetrics, name) is getattr(PoolObserver, name)]
    assert missing == []
