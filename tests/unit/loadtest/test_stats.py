"""Percentiles, summaries and the throughput timeline of load-test results."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from loragate.loadtest.stats import (
    Distribution,
    RequestRecord,
    Summary,
    format_summary,
    paired_rate_ratio,
    percentile,
    success_by_policy,
    summarize,
    throughput_timeline,
)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [0.5, 3.0, 1.0, 7.5, 2.0, 9.0, 4.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([4.2], 99) == 4.2
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_is_ordered() -> None:
    d = Distribution.of([i / 100 for i in range(1, 101)])
    assert d.count == 100
    assert d.p50 <= d.p90 <= d.p99 <= d.max
    assert Distribution.of([]).count == 0


def _rec(i: int, latency: float, ok: bool = True, **kw: object) -> RequestRecord:
    return RequestRecord(index=i, start=i * 0.1, latency=latency, ok=ok, **kw)  # type: ignore[arg-type]


def test_summarize_counts_errors_by_type_and_excludes_them_from_latency() -> None:
    records = [_rec(0, 0.010, tokens=4), _rec(1, 0.020, tokens=4),
               _rec(2, 5.0, ok=False, status=503, error="http_503"), _rec(3, 1.0, ok=False, error="ReadTimeout")]
    s = summarize(records, elapsed_s=2.0)
    assert (s.requests, s.ok) == (4, 2)
    assert s.errors == {"ReadTimeout": 1, "http_503": 1}
    assert s.latency.max == pytest.approx(0.020)
    assert s.throughput_rps == pytest.approx(1.0)
    assert s.tokens_per_s == pytest.approx(4.0)
    assert s.ttft.count == 0
    assert s.to_json()["ttft"]["p50"] is None  # NaN is not JSON


def test_streaming_figures() -> None:
    records = [_rec(0, 0.1, ttft=0.02, inter_token=(0.01, 0.03)), _rec(1, 0.1, ttft=0.04, inter_token=(0.02,))]
    s = summarize(records, 1.0)
    assert s.ttft.p50 == pytest.approx(0.03)
    assert s.inter_token.count == 3
    assert "inter-token" in format_summary(s)


def test_success_by_policy_counts_failed_graded_requests_as_wrong() -> None:
    records = [_rec(0, 0.1, policy="select", correct=True), _rec(1, 0.1, policy="select", correct=False),
               _rec(2, 0.1, ok=False, error="http_502", policy="base", correct=False),
               _rec(3, 0.1, policy="base", correct=True), _rec(4, 0.1, policy="base")]  # ungraded: left out
    table = success_by_policy(records)
    assert table["select"] == {"graded": 2, "correct": 1, "rate": 0.5}
    assert table["base"]["graded"] == 2
    assert "success by policy" in format_summary(summarize(records, 1.0))


def test_throughput_timeline_buckets_by_completion() -> None:
    records = [RequestRecord(index=i, start=0.0, latency=t, ok=True) for i, t in enumerate([0.2, 0.5, 1.5, 3.1])]
    assert throughput_timeline(records) == [(0.0, 2.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]
    assert throughput_timeline([]) == []


def _round(tokens_per_s: float, elapsed_s: float = 10.0) -> Summary:
    """One round's summary that streamed ``tokens_per_s`` for ``elapsed_s`` seconds."""
    return replace(summarize([], elapsed_s), tokens_per_s=tokens_per_s)


def test_paired_rate_ratio_point_is_the_ratio_of_totals_and_the_interval_contains_it() -> None:
    direct = [_round(100.0), _round(110.0), _round(90.0), _round(105.0)]
    gateway = [_round(98.0), _round(107.0), _round(89.0), _round(101.0)]
    result = paired_rate_ratio(direct, gateway)
    assert result.point == pytest.approx((98 + 107 + 89 + 101) / (100 + 110 + 90 + 105))
    assert result.low <= result.point <= result.high
    assert result.rounds == 4
    assert result.within(0.03) and not result.within(0.02)


def test_paired_rate_ratio_weighs_rounds_by_their_duration() -> None:
    result = paired_rate_ratio([_round(100.0, 30.0), _round(100.0, 10.0)], [_round(50.0, 30.0), _round(100.0, 10.0)])
    assert result.point == pytest.approx((50 * 30 + 100 * 10) / (100 * 40))


def test_paired_rate_ratio_interval_narrows_with_steadier_rounds() -> None:
    noisy = paired_rate_ratio([_round(100.0)] * 6, [_round(v) for v in (90, 110, 95, 105, 92, 108)])
    steady = paired_rate_ratio([_round(100.0)] * 6, [_round(v) for v in (99, 101, 100, 100, 99, 101)])
    assert steady.high - steady.low < noisy.high - noisy.low
    assert steady.low == pytest.approx(steady.high, abs=0.02)


def test_paired_rate_ratio_refuses_unpaired_rounds() -> None:
    with pytest.raises(ValueError, match="same number"):
        paired_rate_ratio([_round(1.0)], [])
