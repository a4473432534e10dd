"""The scheduling benchmark's pure parts: the Zipf workload and the clairvoyant lower bound."""

from __future__ import annotations

from collections import Counter

from loragate.loadtest.bench_workers import optimal_loads, zipf_sequence


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    sequence = zipf_sequence(2000, 20, 1.1, seed=0)
    assert sequence == zipf_sequence(2000, 20, 1.1, seed=0)
    counts = Counter(sequence)
    assert counts["adapter-00"] > 3 * counts["adapter-05"] > 0


def test_belady_bound_counts_only_unavoidable_loads() -> None:
    assert optimal_loads(["a", "b", "a", "b"], 2) == 2
    assert optimal_loads(["a", "b", "c", "a"], 2) == 3  # evicts b (never used again), keeps a
