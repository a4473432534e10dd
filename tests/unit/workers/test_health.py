"""The health monitor alone: hysteresis in and out of rotation, what a refused request changes, scrapes."""

from __future__ import annotations

from loragate.workers.health import HealthMonitor
from loragate.workers.pool import WorkerSpec
from loragate.workers.state import WorkerState
from loragate.workers.stats import EngineStats
from tests.unit.workers.fakes import FakeAdmin

W0, W1 = "http://w0", "http://w1"


def monitor(admin: FakeAdmin, *, unhealthy_after: int = 1,
            healthy_after: int = 2) -> tuple[HealthMonitor, list[WorkerState], list[tuple[str, bool]]]:
    workers = [WorkerState(WorkerSpec(url), i, 2) for i, url in enumerate((W0, W1))]
    changes: list[tuple[str, bool]] = []
    health = HealthMonitor(workers, admin, lambda w, healthy: changes.append((w.url, healthy)),
                           probe_interval_s=1, probe_timeout_s=1, scrape_interval_s=1,
                           unhealthy_after=unhealthy_after, healthy_after=healthy_after)
    return health, workers, changes


async def test_workers_leave_after_unhealthy_after_and_return_after_healthy_after_probes() -> None:
    admin = FakeAdmin(down={W0})
    health, workers, changes = monitor(admin, unhealthy_after=2, healthy_after=2)
    await health.probe_once()
    assert workers[0].healthy and changes == []  # one failed probe is not enough here
    await health.probe_once()
    assert not workers[0].healthy and changes == [(W0, False)]
    admin.down.clear()
    await health.probe_once()
    assert not workers[0].healthy
    await health.probe_once()
    assert workers[0].healthy and changes == [(W0, False), (W0, True)] and health.rounds == 4


async def test_unanswered_probes_keep_a_worker_panic_eligible_until_a_request_is_refused() -> None:
    health, workers, changes = monitor(FakeAdmin(slow={W0}))
    await health.probe_once()
    assert workers[0].stats().panic_eligible
    health.request_failed(workers[0], "connection refused")
    assert not workers[0].stats().panic_eligible and changes == [(W0, False)]  # one transition, not two
    health.request_failed(workers[1], "connection refused")
    assert not workers[1].healthy and changes == [(W0, False), (W1, False)]


async def test_a_failed_scrape_clears_stale_engine_stats_and_down_workers_are_not_scraped() -> None:
    admin = FakeAdmin(engine={W0: EngineStats(running=3, scraped_at=1.0)})
    health, workers, _ = monitor(admin)
    await health.scrape_once()
    assert workers[0].engine.running == 3
    admin.down.add(W0)
    await health.scrape_once()
    assert workers[0].engine == EngineStats()
    workers[1].healthy = False
    workers[1].engine = EngineStats(waiting=5)
    await health.scrape_once()
    assert workers[1].engine.waiting == 5


async def test_start_and_stop_the_loops() -> None:
    health, _, _ = monitor(FakeAdmin())
    health.start()
    tasks = list(health.tasks)
    health.start()  # idempotent
    assert health.tasks == tasks and len(tasks) == 2
    await health.stop()
    assert health.tasks == [] and all(t.done() for t in tasks)

