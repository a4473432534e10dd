"""The routing gate: routed requests take a bounded number of slots; the others never wait."""

from __future__ import annotations

import asyncio

import pytest

from loragate.server.gate import RoutingGate


async def test_routed_requests_beyond_the_limit_wait_and_the_others_pass() -> None:
    gate = RoutingGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, routed: bool) -> None:
        async with gate.admit(routed):
            order.append(f"{name} in")
            if name == "first":
                await release.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(request("first", True))
    await asyncio.sleep(0)
    second = asyncio.create_task(request("second", True))
    await asyncio.sleep(0)
    assert gate.waiting == 1 and order == ["first in"]
    await request("pinned", False)  # the gate is full, but a request that does not route passes
    assert order == ["first in", "pinned in", "pinned out"]
    release.set()
    await asyncio.gather(first, second)
    assert order[3:] == ["first out", "second in", "second out"] and gate.waiting == 0


async def test_a_slot_is_released_when_the_request_fails_or_is_cancelled() -> None:
    gate = RoutingGate(1)
    with pytest.raises(RuntimeError):
        async with gate.admit(True):
            raise RuntimeError("upstream down")
    async with gate.admit(True):
        waiter = asyncio.create_task(gate.admit(True).__aenter__())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0  # a client that gave up while waiting leaves the queue
    async with asyncio.timeout(1):
        async with gate.admit(True):  # both slots came back
            pass


async def test_no_limit_and_bad_limits() -> None:
    gate = RoutingGate(0)
    async with gate.admit(True), gate.admit(True):
        assert gate.waiting == 0
    with pytest.raises(ValueError):
        RoutingGate(-1)
