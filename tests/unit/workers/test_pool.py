"""The pool with a fake worker API: affinity, capacity and LRU eviction, health, failover, load failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import PurePath

import pytest

from loragate.errors import InvalidRequest, NoWorkerAvailable, UpstreamError, WorkerRejected
from loragate.workers.pool import PoolConfig, WorkerPool, WorkerSpec
from loragate.workers.stats import EngineStats
from tests.unit.workers.fakes import FakeAdmin, RecordingObserver

W0, W1, W2 = "http://w0:8100", "http://w1:8100", "http://w2:8100"


def make_pool(urls: list[str] | None = None, adoptable: dict[str, str] | None = None,
              **config: object) -> tuple[WorkerPool, FakeAdmin, RecordingObserver]:
    admin, observer = FakeAdmin(), RecordingObserver()
    dirs = {name: PurePath(path) for name, path in (adoptable or {}).items()}
    pool = WorkerPool(urls or [W0, W1], admin, observer, PoolConfig(**config),  # type: ignore[arg-type]
                      adoptable=dirs.get)
    return pool, admin, observer


async def until(condition: Callable[[], bool], wait_s: float = 10.0) -> None:
    """Yield to the loop until ``condition`` holds (bounded). A fixed sleep before an assert is a race on a
    busy machine: a process descheduled longer than the sleep resumes the test before the tasks it waits for."""
    for _ in range(int(wait_s / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"condition still false after {wait_s:.0f} s")


async def serve(pool: WorkerPool, adapter: str | None, **kwargs: object) -> str:
    async with pool.lease(adapter, f"/store/{adapter}" if adapter else None, **kwargs) as lease:  # type: ignore[arg-type]
        return lease.url


# -- configuration -------------------------------------------------------------------------------------
def test_worker_specs_from_urls_fragments_and_mappings() -> None:
    assert WorkerSpec.parse("http://h:8100/") == WorkerSpec("http://h:8100")
    assert WorkerSpec.parse("http://h:8100#max_loras=8") == WorkerSpec("http://h:8100", 8)
    assert WorkerSpec.parse({"url": "http://h:1", "max_loras": 3}) == WorkerSpec("http://h:1", 3)
    for bad in ("h:8100", "http://h#max_loras=x", "http://h#max_loras=0", {"url": 5}):
        with pytest.raises(InvalidRequest):
            WorkerSpec.parse(bad)  # type: ignore[arg-type]


def test_pool_config_is_validated() -> None:
    with pytest.raises(InvalidRequest, match="path"):
        PoolConfig(delivery="nfs")
    with pytest.raises(InvalidRequest, match="duplicate"):
        WorkerPool([W0, W0 + "/"], FakeAdmin(), RecordingObserver())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="affinity"):
        WorkerPool([W0], FakeAdmin(), RecordingObserver(), PoolConfig(strategy="nope"))  # type: ignore[arg-type]


def test_scheduling_profile_and_weights_are_checked_at_construction_and_used() -> None:
    with pytest.raises(InvalidRequest, match="unknown scheduling scorer 'cache'; valid:"):
        PoolConfig(scorer_weights={"cache": 1.0})
    pool, _, _ = make_pool(strategy="least-loaded", scorer_weights={"load": 2.0})
    assert pool.profile.name == "least-loaded" and pool.profile.weights == {"load": 2.0, "lora-affinity": 0.01,
                                                                            "session-affinity": 0.25}


def test_per_worker_cap_overrides_the_default() -> None:
    pool, _, _ = make_pool([W0 + "#max_loras=1", W1], max_loras=3)
    assert [v.max_loras for v in pool.views()] == [1, 3]


# -- affinity ------------------------------------------------------------------------------------------
async def test_requests_for_an_adapter_stay_where_it_is_loaded() -> None:
    pool, admin, _ = make_pool([W0, W1, W2])
    first = await serve(pool, "a")
    assert [await serve(pool, "a") for _ in range(10)] == [first] * 10
    assert admin.count("load") == 1


async def test_new_adapters_fill_free_slots_before_anyone_evicts() -> None:
    pool, admin, _ = make_pool([W0, W1], max_loras=1)
    assert await serve(pool, "a") == W0
    assert await serve(pool, "b") == W1  # W0 has no free slot, W1 has one
    assert admin.count("unload") == 0


async def test_base_model_requests_ignore_adapters_and_spread_by_load() -> None:
    pool, admin, _ = make_pool([W0, W1])
    async with pool.lease(None, None) as first, pool.lease(None, None) as second:
        assert (first.url, second.url) == (W0, W1)
    assert admin.calls == []


# -- capacity ------------------------------------------------------------------------------------------
async def test_lru_adapter_is_unloaded_beyond_the_cap() -> None:
    pool, admin, observer = make_pool([W0], max_loras=2)
    for adapter in ("a", "b", "a", "c"):  # a was used after b: b is least recently used
        await serve(pool, adapter)
    assert ("unload", W0, "b") in admin.calls
    assert pool.views()[0].loaded == ("a", "c")
    assert admin.loaded[W0] == {"a", "c"}
    assert ("evicted", W0, "b") in observer.events


async def test_an_adapter_with_requests_in_flight_is_never_evicted() -> None:
    pool, admin, _ = make_pool([W0], max_loras=2)
    async with pool.lease("a", "/a"):  # a is LRU but busy
        await serve(pool, "b")
        await serve(pool, "c")
        assert ("unload", W0, "a") not in admin.calls
        assert ("unload", W0, "b") in admin.calls
    async with pool.lease("a", "/a"), pool.lease("c", "/c"):
        await serve(pool, "d")  # both loaded adapters busy: load over the cap rather than break one
        assert admin.count("unload") == 1
        assert set(pool.views()[0].loaded) == {"a", "c", "d"}
    await serve(pool, "e")  # next load brings it back under the cap
    assert len(pool.views()[0].loaded) == 2


async def test_in_flight_is_tracked_per_worker_and_adapter() -> None:
    pool, _, _ = make_pool([W0])
    async with pool.lease("a", "/a"), pool.lease("a", "/a"), pool.lease("b", "/b"):
        view = pool.views()[0]
        assert view.in_flight == 3 and view.adapter_in_flight == (("a", 2), ("b", 1))
    assert pool.views()[0].adapter_in_flight == () and pool.views()[0].in_flight == 0


async def test_concurrent_first_requests_share_one_load() -> None:
    pool, admin, _ = make_pool([W0])
    admin.gate = asyncio.Event()
    tasks = [asyncio.create_task(serve(pool, "a")) for _ in range(5)]
    await until(lambda: pool.views()[0].loading == ("a",))
    admin.gate.set()
    assert await asyncio.gather(*tasks) == [W0] * 5
    assert admin.count("load") == 1


async def test_a_cancelled_client_does_not_cancel_the_shared_load() -> None:
    pool, admin, _ = make_pool([W0])
    admin.gate = asyncio.Event()
    leader = asyncio.create_task(serve(pool, "a"))
    follower = asyncio.create_task(serve(pool, "a"))
    await until(lambda: admin.count("load") == 1)  # the leader's load is in flight
    await asyncio.sleep(0.01)  # the follower joins it
    leader.cancel()
    admin.gate.set()
    assert await follower == W0
    assert pool.views()[0].loaded == ("a",)
    assert admin.count("load") == 1  # a follower that joined late must still not have needed a second load


async def test_reload_of_an_adapter_being_evicted_waits_for_the_unload() -> None:
    pool, admin, _ = make_pool([W0], max_loras=1)
    await serve(pool, "a")
    gate = asyncio.Event()
    unload = admin.unload_adapter
    unloading: list[str] = []

    async def slow_unload(url: str, name: str) -> bool:
        unloading.append(name)
        await gate.wait()
        return await unload(url, name)

    admin.unload_adapter = slow_unload  # type: ignore[method-assign]
    evicting = asyncio.create_task(serve(pool, "b"))
    await until(lambda: unloading == ["a"])
    reloading = asyncio.create_task(serve(pool, "a"))
    await asyncio.sleep(0.01)
    assert not reloading.done()
    gate.set()
    await asyncio.gather(evicting, reloading)
    kinds = [(k, n) for k, _, n in admin.calls]
    assert kinds.index(("unload", "a")) < len(kinds) - 1 - kinds[::-1].index(("load", "a"))
    assert "a" in admin.loaded[W0]


# -- load failures -------------------------------------------------------------------------------------
async def test_load_failures_are_reported_and_backed_off_not_retried_forever() -> None:
    pool, admin, observer = make_pool([W0, W1], load_backoff_s=60)
    admin.bad_adapters.add("broken")
    for _ in range(2):
        with pytest.raises(WorkerRejected):
            await serve(pool, "broken")
    with pytest.raises(WorkerRejected, match="failed to load on every worker") as info:
        await serve(pool, "broken")
    assert info.value.status == 502 and info.value.code == "adapter_load_failed"
    assert admin.count("load") == 2  # once per worker, then fail fast
    assert [e[1] for e in observer.of("load_failed")] == [W0, W1]
    assert observer.of("loaded") == [("loaded", W0, "broken", False), ("loaded", W1, "broken", False)]
    assert await serve(pool, "fine") == W0  # other adapters are unaffected


async def test_backoff_expires_and_success_clears_it() -> None:
    pool, admin, _ = make_pool([W0], load_backoff_s=0.02)
    admin.bad_adapters.add("flaky")
    with pytest.raises(WorkerRejected):
        await serve(pool, "flaky")
    admin.bad_adapters.clear()
    await asyncio.sleep(0.03)
    assert await serve(pool, "flaky") == W0


async def test_unreachable_worker_during_load_leaves_rotation() -> None:
    pool, admin, observer = make_pool([W0, W1])
    admin.down.add(W0)
    with pytest.raises(UpstreamError):
        await serve(pool, "a")
    assert [v.healthy for v in pool.views()] == [False, True]
    assert ("health", W0, False) in observer.events
    assert await serve(pool, "a") == W1


# -- health and failover -------------------------------------------------------------------------------
async def test_probes_move_workers_out_and_back_with_state_reset() -> None:
    pool, admin, observer = make_pool([W0, W1], healthy_after=2)
    await serve(pool, "a")
    admin.down.add(W0)
    await pool.probe_once()
    assert [v.healthy for v in pool.views()] == [False, True]
    assert await serve(pool, "a") == W1
    admin.down.clear()
    await pool.probe_once()
    assert not pool.views()[0].healthy  # one good probe is not enough: a restarting vLLM flaps
    await pool.probe_once()
    assert pool.views()[0].healthy and pool.views()[0].loaded == ()
    assert observer.of("health") == [("health", W0, False), ("health", W0, True)]


async def test_the_pool_counts_as_probed_only_after_a_probe_round() -> None:
    """Readiness (/ready) waits for this: before the first round, "healthy" is only an assumption."""
    pool, _, _ = make_pool([W0])
    assert not pool.probed and pool.views()[0].healthy
    await pool.probe_once()
    assert pool.probed


async def test_no_healthy_worker_is_a_503() -> None:
    pool, admin, _ = make_pool([W0])
    admin.down.add(W0)
    await pool.probe_once()
    with pytest.raises(NoWorkerAvailable) as info:
        await serve(pool, "a")
    assert info.value.status == 503


async def test_panic_routing_when_the_only_worker_just_did_not_answer_in_time() -> None:
    """A saturated gateway can time out its probe of a healthy worker: serving beats a 503 for everyone."""
    pool, admin, observer = make_pool([W0])
    admin.slow.add(W0)
    await pool.probe_once()
    assert not pool.views()[0].healthy
    assert await serve(pool, "a") == W0  # panic: out of rotation, yet the only candidate
    assert observer.of("panic") == [("panic", W0)]
    pool.report_failure(W0, "connection refused")  # the request path found it dead after all
    with pytest.raises(NoWorkerAvailable):
        await serve(pool, "a")
    admin.slow.clear()
    await pool.probe_once()
    await pool.probe_once()
    assert pool.views()[0].healthy and await serve(pool, "a") == W0
    assert observer.of("panic") == [("panic", W0)]  # in rotation again: no panic


async def test_no_panic_while_any_worker_is_in_rotation() -> None:
    pool, admin, observer = make_pool([W0, W1, W2])
    admin.slow.add(W0)
    admin.down.add(W1)
    await pool.probe_once()
    assert [await serve(pool, None) for _ in range(4)] == [W2] * 4
    with pytest.raises(NoWorkerAvailable, match="excluded"):  # W2 excluded by a retry: still no panic
        await serve(pool, None, exclude={W2})
    admin.slow.add(W2)
    await pool.probe_once()
    assert await serve(pool, None) in {W0, W2}
    assert await serve(pool, None, exclude={W0}) == W2
    with pytest.raises(NoWorkerAvailable):  # panic spares W1, which refused
        await serve(pool, None, exclude={W0, W2})
    assert {e[1] for e in observer.of("panic")} == {W0, W2}


async def test_retry_elsewhere_with_report_failure_and_exclude() -> None:
    pool, _, observer = make_pool([W0, W1])
    failed = await serve(pool, None)
    pool.report_failure(failed, "connect error")
    assert await serve(pool, None, exclude={failed}) == W1
    assert ("health", W0, False) in observer.events
    with pytest.raises(NoWorkerAvailable, match="excluded"):
        await serve(pool, None, exclude={W1})


async def test_background_probe_takes_a_dead_worker_out_quickly() -> None:
    pool, admin, _ = make_pool([W0, W1], probe_interval_s=0.02, scrape_interval_s=0.02)
    await pool.start()
    try:
        admin.down.add(W1)
        admin.engine[W0] = EngineStats(running=2, running_adapters=frozenset({"hot"}), scraped_at=1.0)
        await until(lambda: [v.healthy for v in pool.views()] == [True, False]
                    and pool.views()[0].engine.running_adapters == {"hot"})
        assert pool.views()[0].engine.running_adapters == {"hot"}
        assert pool.pick("hot").url == W0
    finally:
        await pool.stop()
    assert not pool.running


async def test_forget_unloads_everywhere_and_skips_dead_workers() -> None:
    pool, admin, _ = make_pool([W0, W1])
    await serve(pool, "a")
    admin.down.add(W1)
    await pool.forget("a")
    assert pool.views()[0].loaded == ()
    assert admin.loaded[W0] == set()


async def test_resolver_delivery_makes_the_worker_fetch_by_name() -> None:
    pool, admin, _ = make_pool([W0], delivery="resolver")
    await serve(pool, "a")
    assert admin.calls[0] == ("resolve", W0, "a")


async def test_round_robin_pool_loads_more_than_affinity() -> None:
    loads = {}
    for strategy in ("affinity", "round-robin"):
        pool, admin, _ = make_pool([W0, W1, W2], strategy=strategy, max_loras=2)
        for i in range(60):
            await serve(pool, "abcd"[i % 4])
        loads[strategy] = admin.count("load")
    assert loads["affinity"] == 4 and loads["round-robin"] > 4 * loads["affinity"]


# -- reconciling with what workers already hold ---------------------------------------------------------
async def test_reconcile_adopts_current_adapters_as_lru_and_leaves_the_rest_alone() -> None:
    pool, admin, _ = make_pool([W0], adoptable={"a": "/store/sha-a", "b": "/store/sha-b2"}, max_loras=2)
    await serve(pool, "mine")
    for name, root in (("a", "/elsewhere/sha-a"), ("b", "/store/sha-b1"), ("other", "/store/sha-o")):
        admin.loaded.setdefault(W0, set()).add(name)  # loaded by a gateway run before this one
        admin.roots[W0, name] = root
    assert await pool.reconcile(W0) == ["a"]  # same content (directory named by its sha256), wherever loaded from
    # "b" has other files than this gateway's "b", "other" is unknown here: either may be another gateway's
    assert admin.loaded[W0] == {"a", "b", "mine", "other"} and admin.count("unload") == 0
    assert pool.views()[0].loaded == ("a", "mine")  # adopted ones first in LRU order
    await serve(pool, "c")  # cap 2: the adopted adapter goes first
    assert pool.views()[0].loaded == ("mine", "c")
    assert await serve(pool, "mine") == W0 and admin.count("load") == 2


async def test_start_reconciles_and_a_returning_worker_keeps_its_adapters() -> None:
    pool, admin, _ = make_pool([W0, W1], adoptable={"a": "/store/a"}, healthy_after=1, probe_interval_s=60,
                               scrape_interval_s=60)
    admin.loaded[W1], admin.roots[W1, "a"] = {"a"}, "/store/a"
    await pool.start()
    try:
        await until(lambda: pool.views()[1].loaded == ("a",))  # a gateway restart finds what the worker still holds
        assert await serve(pool, "a") == W1 and admin.count("load") == 0
        admin.down.add(W1)
        await pool.probe_once()
        admin.down.clear()
        await pool.probe_once()  # a blip: back, state reset, then reconciled instead of forgotten
        await until(lambda: pool.views()[1].loaded == ("a",))
        assert admin.count("load") == 0
    finally:
        await pool.stop()


async def test_reconcile_of_an_unreachable_worker_changes_nothing() -> None:
    pool, admin, _ = make_pool([W0])
    await serve(pool, "a")
    admin.down.add(W0)
    assert await pool.reconcile(W0) == []
    assert pool.views()[0].loaded == ("a",)


async def test_an_adapter_that_vanished_from_a_worker_is_loaded_again() -> None:
    pool, admin, _ = make_pool([W0])
    await serve(pool, "a")
    admin.loaded[W0].discard("a")  # unloaded behind the pool's back
    pool.lost(W0, "a")
    assert pool.views()[0].loaded == ()
    await serve(pool, "a")
    assert admin.count("load") == 2 and admin.loaded[W0] == {"a"}
