"""Shadow runs: the same call under a second policy, off the client's path, as a completion-event subscriber.

A shadow is scheduled when a client's request ends with 200 — asked for by its
X-Adapter-Policy-Shadow header, sampled at ``rate`` for the configured policy, or else an arm the
learned auto explores (``explore``: server/auto) — and submitted
as a new call through the service's entry point, so it is routed, served, graded and recorded
like any request (kind ``shadow``, paired by ``shadow_of``). It runs only in a moment when no client
request is on a worker (the dispatcher's in-flight gauge), so that shadows use idle time instead of
competing with clients; one that finds no such moment within ``max_wait_s`` expires, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loragate.errors import LoragateError
from loragate.router.grammar import parse_policy
from loragate.router.types import AutoChoice, PolicySpec
from loragate.server.calls import CompletionCall, shadow_call
from loragate.server.metrics import GatewayMetrics
from loragate.server.recorder import CompletionEvent
from loragate.workers.dispatch import InFlight


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """Shadow runs: a configured policy sampled at ``rate`` (the header asks per request), bounded."""

    policy: str | None = None
    rate: float = 0.0
    max_concurrency: int = 4  # shadows running at once
    max_pending: int = 256  # shadows waiting for an idle moment; beyond this they are dropped
    max_wait_s: float = 30.0  # a shadow that finds no idle moment in this time expires (never competes)
    idle_s: float = 0.02  # an idle moment: no client request started or in flight for this long


class ShadowScheduler:
    """Subscribes to completion events; ``submit`` is the service's entry point for parsed calls."""

    def __init__(self, config: ShadowConfig, submit: Callable[[CompletionCall], Awaitable[object]],
                 in_flight: InFlight, metrics: GatewayMetrics, rng: random.Random | None = None,
                 explore: Callable[[CompletionEvent], tuple[PolicySpec, AutoChoice] | None] | None = None) -> None:
        self.config = config
        self.explore = explore
        self.submit = submit
        self.in_flight = in_flight
        self.metrics = metrics
        self._configured = parse_policy(config.policy, source="shadow") if config.policy else None
        self._random = rng or random.Random()
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Shadows scheduled and not finished (waiting for an idle moment or running)."""
        return self._pending

    def on_event(self, event: CompletionEvent) -> None:
        call = event.call
        if call is None or call.kind != "primary" or event.status != 200:
            return
        policy, auto = call.shadow, None
        if policy is None and self._configured is not None and self._random.random() < self.config.rate:
            policy = self._configured
        if policy is None and self.explore is not None and (exploring := self.explore(event)) is not None:
            policy, auto = exploring
        if policy is None:
            return
        if self._pending >= self.config.max_pending:
            self.metrics.shadow_run("dropped")  # never let shadow work pile up without bound
            return
        self._pending += 1
        task = asyncio.get_running_loop().create_task(self._run(call, policy, auto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: CompletionCall, policy: PolicySpec, auto: AutoChoice | None) -> None:
        try:
            if not await self._quiet_moment():
                self.metrics.shadow_run("expired")
                return
            async with self._slots:
                try:
                    # built now, so that its latencies start when it runs, not when it began waiting
                    await self.submit(shadow_call(call, policy, auto))  # recorded by the service like any call
                except LoragateError:
                    self.metrics.shadow_run("error")
                else:
                    self.metrics.shadow_run("done")
        finally:
            self._pending -= 1

    async def _quiet_moment(self) -> bool:
        """True once no client request has started for ``idle_s`` and none is in flight; False at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_wait_s
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.in_flight.idle.wait(), left)
            seen = self.in_flight.starts
            await asyncio.sleep(self.config.idle_s)
            if self.in_flight.active == 0 and self.in_flight.starts == seen:
                return True
        return False

    async def close(self) -> None:
        """Let scheduled shadows run (no clients are left, so they find their idle moment), bounded."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for task in self._tasks:
            task.cancel()
