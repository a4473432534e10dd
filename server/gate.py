"""The routing gate: a bound on routed requests in flight, so routing never crowds out pinned traffic.

One gateway process serves every request on one event loop. A routed request costs that loop more than a
pinned one (its share of embedding and search, the detector, the decision) and, at saturation, a loop's
ready queue serves everything in arrival order: with 32 routed clients, each step of a pinned request
waited behind 32 routed ones (pin p50 1.9 -> 55 ms in ``bench_mixed``). The gate lets at most
``route_max_concurrency`` routed requests decide at once; the others wait for a slot without touching the
loop, and requests that do not route (``base``, ``pin``, a named model) never wait. Routed throughput is
bounded by the loop either way; what the bound changes is who queues.

It covers the decision only, not the upstream call: once decided, a routed request costs the loop what a
pinned one does, and a slot held until the response (a first version held it to the first byte) would cap
routed traffic at ``route_max_concurrency`` per upstream latency, e.g. 4 non-streamed completions of
vLLM's few seconds each, and hold one through a whole ``chain``'s step loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RoutingGate:
    """``limit`` routed requests at once (0: no limit); :attr:`waiting` counts those queued for a slot."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"the routing gate's limit must be >= 0, got {limit}")
        self.limit = limit
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit) if limit else None

    @asynccontextmanager
    async def admit(self, routed: bool) -> AsyncIterator[None]:
        if not routed or self._slots is None:
            yield
            return
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
