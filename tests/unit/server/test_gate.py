"""The routing gate: routed requests take a bounded number of slots; the others never wait."""

from __future__ import annotations

import asyncio
import time

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


async def test_routing_yields_a_lagging_loop_to_pinned_traffic_and_only_then() -> None:
    """A stalled loop (a CPU-bound step) with pinned requests arriving: a routed request waits for the loop to
    catch up. The same stall with routed traffic alone, or with yielding off, makes nobody wait."""
    for pinned, yield_lag_s, expected in ((True, 0.002, 1), (False, 0.002, 0), (True, 0.0, 0)):
        gate = RoutingGate(4, yield_lag_s=yield_lag_s, probe_s=0.2)
        async with gate.admit(True):  # starts the lag watcher: its first probe wakes in 0.2 s
            pass
        await asyncio.sleep(0.01)  # the watcher is asleep in its probe
        if pinned:
            async with gate.admit(False):
                pass
        time.sleep(0.25)  # noqa: ASYNC251 (on purpose: the loop stalls past the probe, which wakes 50 ms late)
        await asyncio.sleep(0.001)  # the watcher measures the stall; its next probe is 0.2 s away
        async with asyncio.timeout(1), gate.admit(True):
            pass
        assert gate.yielded == expected, (pinned, yield_lag_s)
        assert gate.waiting == 0
        await gate.close()


async def test_a_yielding_request_decides_anyway_when_the_loop_never_catches_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loragate.server.gate.MAX_YIELD_S", 0.05)
    gate = RoutingGate(1, yield_lag_s=0.002, probe_s=0.005)
    gate._calm.clear()  # as if every probe came back late
    async with gate.admit(False):
        pass
    async with asyncio.timeout(1), gate.admit(True):
        assert gate.yielded == 1
    await gate.close()
    with pytest.raises(ValueError):
        RoutingGate(1, yield_lag_s=-1)


async def test_the_lag_watcher_stops_when_routing_goes_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loragate.server.gate.IDLE_S", 0.05)
    gate = RoutingGate(2, probe_s=0.005)
    async with gate.admit(True):
        pass
    watcher = gate._watcher
    assert watcher is not None
    async with asyncio.timeout(1):
        await watcher  # ends on its own once no routed request came for IDLE_S
    async with gate.admit(True):  # the next routed request starts it again
        assert gate._watcher is not watcher and not gate._watcher.done()
    await gate.close()


async def test_routed_requests_take_turns_while_pinned_traffic_arrives_and_get_their_slots_back_after() -> None:
    """Four slots for routed traffic alone; one while requests that do not route are arriving (FIFO); when the
    pinned traffic has gone, the next release hands the grown capacity on."""
    gate = RoutingGate(4, shared_limit=1, yield_lag_s=0.0)
    holding = asyncio.Event()

    async def routed() -> None:
        async with gate.admit(True):
            await holding.wait()

    first = [asyncio.create_task(routed()) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate._deciding == 2 and gate.waiting == 0  # alone: both decide at once
    async with gate.admit(False):  # a pinned request arrives
        pass
    later = [asyncio.create_task(routed()) for _ in range(3)]
    await asyncio.sleep(0)
    assert gate._deciding == 2 and gate.waiting == 3  # over the shared limit: they queue
    gate._others_at -= 10  # the pinned traffic stopped long ago
    holding.set()
    async with asyncio.timeout(1):
        await asyncio.gather(*first, *later)
    assert gate._deciding == 0 and gate.waiting == 0


async def test_a_waiter_given_a_slot_and_cancelled_before_taking_it_hands_it_on() -> None:
    gate = RoutingGate(1)
    async with gate.admit(True):
        first = asyncio.create_task(gate.admit(True).__aenter__())
        second = asyncio.create_task(gate.admit(True).__aenter__())
        await asyncio.sleep(0)
        assert gate.waiting == 2
    first.cancel()  # the release above gave it the slot; it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(1):
        await second  # the slot went on to the next waiter instead of leaking
    assert gate._deciding == 1
    with pytest.raises(ValueError):
        RoutingGate(4, shared_limit=0)
