"""The routing gate: routing takes bounded slots, and yields the event loop to pinned traffic when it lags.

One gateway process serves every request on one event loop. A routed request costs that loop more than a
pinned one (its share of embedding and search, the detector, the decision) and, at saturation, a loop's
ready queue serves everything in arrival order: with 32 routed clients, each step of a pinned request
waited behind 32 routed ones (pin p50 1.9 -> 55 ms in ``bench_mixed``). Two rules, both on the decision
only, never on the upstream call:

- **Slots.** At most ``route_max_concurrency`` routed requests decide at once, and at most
  ``route_shared_concurrency`` while requests that do not route are arriving (one seen in the last
  ``PRESENT_S``); the others wait for a slot, first come first served, without touching the loop. Requests
  that do not route (``base``, ``pin``, a named model) never wait. With one slot, routed decisions take
  turns, so the loop's ready queue holds at most one decision's work ahead of a pinned request's next step.
- **Yielding.** While requests that do not route are arriving and the loop lags more than
  ``route_yield_lag_ms`` (a watcher measures how late its own short sleeps wake), a routed request waits
  to decide until the lag is back under the bound, or ``MAX_YIELD_S`` at most, so routing cannot starve.
  Routed traffic alone is never slowed by either rule, and neither is a gateway whose loop keeps up: with
  a real upstream, the loop mostly waits on sockets.

A first version held the slot until the response's first byte. That capped routed traffic at
``route_max_concurrency`` per upstream latency (4 non-streamed completions of vLLM's few seconds each)
and held one through a whole ``chain``'s step loop; the yield rule protects pinned requests without it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

PRESENT_S = 1.0
"""A request that does not route, seen this recently, means pinned traffic is present."""

MAX_YIELD_S = 0.5
"""The longest a routed request yields to a lagging loop before it decides anyway."""

IDLE_S = 5.0
"""The lag watcher stops this long after the last routed request (the next one starts it again), so an idle
gateway does not wake 200 times a second."""


class RoutingGate:
    """``limit`` routed decisions at once (0: no gate at all), ``shared_limit`` while requests that do not route
    are arriving; :attr:`waiting` counts those queued for a slot or yielding; :attr:`yielded` counts the routed
    requests that waited for the loop to catch up."""

    def __init__(self, limit: int, *, shared_limit: int | None = None, yield_lag_s: float = 0.002,
                 probe_s: float = 0.005) -> None:
        if limit < 0:
            raise ValueError(f"the routing gate's limit must be >= 0, got {limit}")
        if shared_limit is not None and shared_limit < 1:
            raise ValueError(f"the routing gate's shared limit must be >= 1, got {shared_limit}")
        if yield_lag_s < 0 or probe_s <= 0:
            raise ValueError("the routing gate's yield lag must be >= 0 and its probe interval > 0")
        self.limit = limit
        self.shared_limit = limit if shared_limit is None else min(shared_limit, limit)
        self.yield_lag_s = yield_lag_s
        self.probe_s = probe_s
        self.waiting = 0
        self.yielded = 0
        self.lag_s = 0.0  # the loop's lag at the watcher's last wake-up
        self._deciding = 0  # routed requests holding a slot
        self._queue: deque[asyncio.Future[None]] = deque()  # ... and those waiting for one, in arrival order
        self._calm = asyncio.Event()
        self._calm.set()
        self._others_at = -PRESENT_S  # loop time a request that does not route was last admitted
        self._routed_at = 0.0  # ... and a routed one
        self._watcher: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def admit(self, routed: bool) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if not routed or not self.limit:
            if not routed:
                self._others_at = loop.time()
            yield
            return
        self._routed_at = loop.time()
        self._watch()
        self.waiting += 1
        try:
            await self._acquire(loop)
            try:
                await self._yield_to_others(loop)
            except BaseException:
                self._release(loop)
                raise
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._release(loop)

    def _capacity(self, loop: asyncio.AbstractEventLoop) -> int:
        return self.shared_limit if loop.time() - self._others_at <= PRESENT_S else self.limit

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._queue and self._deciding < self._capacity(loop):
            self._deciding += 1
            return
        turn = loop.create_future()
        self._queue.append(turn)
        try:
            await turn  # _release counted the slot as ours before waking us
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release(loop)  # given a slot, then cancelled before taking it: hand it on
            else:
                self._queue.remove(turn)
            raise

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give a slot back and hand free ones on in arrival order. A waiter exists only while a slot is held,
        so a capacity that grew back when pinned traffic stopped is handed on at the next release."""
        self._deciding -= 1
        capacity = self._capacity(loop)
        while self._queue and self._deciding < capacity:
            turn = self._queue.popleft()
            if not turn.done():
                self._deciding += 1
                turn.set_result(None)

    async def _yield_to_others(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._calm.is_set() or loop.time() - self._others_at > PRESENT_S:
            return
        self.yielded += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._calm.wait(), MAX_YIELD_S)

    def _watch(self) -> None:
        if self.yield_lag_s > 0 and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._measure(), name="loragate-loop-lag")

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - self._routed_at < IDLE_S:
            started = loop.time()
            await asyncio.sleep(self.probe_s)
            self.lag_s = max(0.0, loop.time() - started - self.probe_s)
            if self.lag_s > self.yield_lag_s:
                self._calm.clear()
            else:
                self._calm.set()
        self._calm.set()  # no routed traffic to hold back; the next routed request measures afresh

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
