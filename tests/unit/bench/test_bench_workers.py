"""The scheduling benchmark's parts: the Zipf workload, the clairvoyant lower bound, the counting observer."""

from __future__ import annotations

from collections import Counter

from bench.bench_workers import LoadCounts, optimal_loads, zipf_sequence
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.unit.workers.fakes import FakeAdmin


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    sequence = zipf_sequence(2000, 20, 1.1, seed=0)
    assert sequence == zipf_sequence(2000, 20, 1.1, seed=0)
    counts = Counter(sequence)
    assert counts["adapter-00"] > 3 * counts["adapter-05"] > 0


def test_belady_bound_counts_only_unavoidable_loads() -> None:
    assert optimal_loads(["a", "b", "a", "b"], 2) == 2
    assert optimal_loads(["a", "b", "c", "a"], 2) == 3  # evicts b (never used again), keeps a


async def test_the_benchmark_observer_counts_every_load_and_eviction() -> None:
    """The counter once missed a FleetObserver method, the pool sent it no fleet events, and the benchmark
    reported 0 evictions: counted against what the (fake) workers were actually asked to do."""
    admin, counts = FakeAdmin(), LoadCounts()
    pool = WorkerPool(["http://w0", "http://w1"], admin, counts, PoolConfig(max_loras=2))
    for adapter in zipf_sequence(200, 8, 1.1, seed=0):
        async with pool.lease(adapter, f"/adapters/{adapter}"):
            pass
    assert counts.evictions == admin.count("unload") > 0
    assert counts.loads == admin.count("load") > counts.evictions
