"""Health monitoring: the probe and scrape loops, and when a worker leaves or re-enters rotation.

- A probe (``GET /health`` every ``probe_interval_s``) failing ``unhealthy_after`` times in a row,
  or the request path reporting a worker it could not reach, takes it out of rotation at once.
  It returns after ``healthy_after`` good probes in a row (a restarting vLLM flaps).
- **Panic routing** (Envoy's name) rests on what took a worker out: a probe that times out proves
  less than a refused one. A gateway saturated by its own clients reads a healthy worker's answer
  late, and with one worker that would turn a busy gateway into a 503 for everyone. So a worker out
  only for unanswered probes stays *panic-eligible* (the scheduler's health filter uses it when no
  worker is in rotation); a refused connection, from a probe or a request, ends that.
- The ``/metrics`` scrape feeds vLLM's running/waiting counts and active adapters to scheduling;
  a failed scrape clears them rather than leaving stale numbers.
- **Joining**: a worker discovery adds (not yet ``admitted``) starts out of rotation and enters on
  its *first* good probe. ``healthy_after`` guards against a vLLM that flaps while it restarts; a
  new address is one the DNS (a Kubernetes headless Service lists only ready pods) already vouches
  for, and a gateway started with only discovered workers should serve after one probe round,
  as one with static workers does. It is not panic-eligible before it was ever in rotation.

The worker list is the pool's own (membership changes in place); each round works on a copy of
it and skips workers removed while their probes were out.

The monitor only changes health fields and engine stats; what a transition means for the rest of
the pool (forget loaded adapters, reconcile, tell the observer) is the ``on_change`` callback's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loragate.workers.client import Probe, WorkerAdmin
from loragate.workers.state import WorkerState
from loragate.workers.stats import EngineStats

__all__ = ["HealthMonitor", "cancel_all", "every"]

log = logging.getLogger(__name__)


class HealthMonitor:
    """Probes and scrapes ``workers`` and applies health transitions to them."""

    def __init__(self, workers: Sequence[WorkerState], client: WorkerAdmin,
                 on_change: Callable[[WorkerState, bool], None], *, probe_interval_s: float,
                 probe_timeout_s: float, scrape_interval_s: float, unhealthy_after: int,
                 healthy_after: int) -> None:
        self._workers = workers  # the pool's list, not a copy: discovery adds and removes workers in it
        self._client = client
        self._on_change = on_change
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self.scrape_interval_s = scrape_interval_s
        self.unhealthy_after, self.healthy_after = unhealthy_after, healthy_after
        self.rounds = 0  # completed probe rounds
        self.tasks: list[asyncio.Task[None]] = []

    # -- loops ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the probe and scrape loops (idempotent; needs a running loop)."""
        if self.tasks:
            return
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(every(self.probe_interval_s, self.probe_once), name="probe"),
                      loop.create_task(every(self.scrape_interval_s, self.scrape_once), name="scrape")]

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        await cancel_all(tasks)

    # -- probes ---------------------------------------------------------------------------------------
    async def probe_once(self) -> None:
        """Probe every worker concurrently and apply health transitions."""
        workers = tuple(self._workers)
        results = await asyncio.gather(*(self._client.probe(w.url, self.probe_timeout_s) for w in workers))
        for worker, result in zip(workers, results, strict=True):
            if not worker.removed:
                self.probed(worker, result)
        self.rounds += 1

    def probed(self, worker: WorkerState, result: Probe) -> None:
        if result is Probe.OK:
            worker.good_probes, worker.bad_probes = worker.good_probes + 1, 0
            if not worker.healthy and worker.good_probes >= (self.healthy_after if worker.admitted else 1):
                worker.admitted = True
                self._set(worker, True)
        else:
            worker.bad_probes, worker.good_probes = worker.bad_probes + 1, 0
            worker.last_failure = result
            if worker.healthy and worker.bad_probes >= self.unhealthy_after:
                self._set(worker, False)

    def request_failed(self, worker: WorkerState, reason: str) -> None:
        """The request path could not reach ``worker``: out of rotation until probes pass again."""
        worker.last_failure = Probe.DOWN  # a refused request is proof: no panic routing to it either
        if worker.healthy:
            log.warning("worker %s out of rotation: %s", worker.url, reason)
            worker.bad_probes, worker.good_probes = self.unhealthy_after, 0
            self._set(worker, False)

    def _set(self, worker: WorkerState, healthy: bool) -> None:
        worker.healthy = healthy
        log.warning("worker %s is %s", worker.url, "back in rotation" if healthy else "out of rotation")
        self._on_change(worker, healthy)

    # -- scrapes --------------------------------------------------------------------------------------
    async def scrape_once(self) -> None:
        """Scrape every healthy worker's ``/metrics`` concurrently; a failed scrape clears its stats."""
        healthy = [w for w in self._workers if w.healthy]
        results = await asyncio.gather(*(self._client.engine_stats(w.url, self.probe_timeout_s) for w in healthy),
                                       return_exceptions=True)
        for worker, result in zip(healthy, results, strict=True):
            worker.engine = result if isinstance(result, EngineStats) else EngineStats()


async def every(interval: float, step: Callable[[], Awaitable[object]]) -> None:
    """Run ``step`` every ``interval`` seconds, measured start to start; errors are logged, never fatal."""
    while True:
        started = time.monotonic()
        try:
            await step()
        except Exception:
            log.exception("worker pool background step failed")
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for each to end."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
