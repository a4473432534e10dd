"""Summaries of a load test: percentiles, throughput, errors by type, success by policy.

Pure functions over :class:`RequestRecord` values, so every figure the CLI prints, the JSON holds
and the benchmarks put in docs/BENCHMARKS.md comes from the same code and is unit-tested.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request's outcome. Times are seconds; ``start`` is relative to the run's start.

    In open-loop runs ``start`` is the *scheduled* arrival, not when a connection became free, so a
    slow server cannot hide its queueing delay (coordinated omission).
    """

    index: int
    start: float
    latency: float
    ok: bool
    status: int | None = None
    error: str | None = None
    ttft: float | None = None
    inter_token: tuple[float, ...] = ()
    tokens: int = 0
    policy: str | None = None
    correct: bool | None = None

    @property
    def end(self) -> float:
        return self.start + self.latency


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    NaN for no values, so an empty series shows as missing rather than as a fake 0.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Count, mean and the standard percentiles of one series (seconds)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(values), sum(values) / len(values), percentile(values, 50), percentile(values, 90),
                   percentile(values, 99), max(values))


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything the summary table shows and ``--json`` writes (besides the raw records)."""

    requests: int
    ok: int
    errors: dict[str, int]
    elapsed_s: float
    throughput_rps: float
    tokens_per_s: float
    latency: Distribution
    ttft: Distribution
    inter_token: Distribution
    success_by_policy: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _finite(asdict(self))
        return out


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing figures become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def success_by_policy(records: Iterable[RequestRecord]) -> dict[str, dict[str, float]]:
    """Graded requests per policy: ``graded``, ``correct`` and ``rate``.

    The load generator marks a failed request that expected an answer as wrong (``correct=False``),
    so errors lower a policy's rate instead of silently leaving the sample.
    """
    graded: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if r.correct is not None:
            graded[r.policy or "(default)"].append(r.correct)
    return {policy: {"graded": len(marks), "correct": sum(marks), "rate": sum(marks) / len(marks)}
            for policy, marks in sorted(graded.items()) if marks}


def summarize(records: Sequence[RequestRecord], elapsed_s: float) -> Summary:
    """The summary of one run; latency percentiles cover successful requests only."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or f"http_{r.status}" for r in records if not r.ok)
    tokens = sum(r.tokens for r in ok)
    elapsed = max(elapsed_s, 1e-9)
    return Summary(
        requests=len(records), ok=len(ok), errors=dict(sorted(errors.items())), elapsed_s=elapsed_s,
        throughput_rps=len(ok) / elapsed, tokens_per_s=tokens / elapsed,
        latency=Distribution.of([r.latency for r in ok]),
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        inter_token=Distribution.of([gap for r in ok for gap in r.inter_token]),
        success_by_policy=success_by_policy(records),
    )


@dataclass(frozen=True, slots=True)
class RateRatio:
    """B's rate as a share of A's over paired rounds, with a 95% bootstrap interval over the rounds."""

    point: float
    low: float
    high: float
    rounds: int

    def within(self, tolerance: float) -> bool:
        """The point estimate is within ``tolerance`` (0.02 = 2%) of parity."""
        return abs(1.0 - self.point) <= tolerance


def paired_rate_ratio(a: Sequence[Summary], b: Sequence[Summary], rate: str = "tokens_per_s",
                      resamples: int = 4000, seed: int = 0) -> RateRatio:
    """Total rate of ``b`` over total rate of ``a``, where ``a[i]`` and ``b[i]`` ran back to back.

    Why an interval: on a shared 2-core machine one round's ratio moves by several percent, so a
    "within 2%" target read off a single ratio is a coin toss. The interval resamples whole rounds
    (each pair keeps its shared drift), and says how far the point estimate can be trusted.
    """
    if len(a) != len(b) or not a:
        raise ValueError("paired_rate_ratio needs the same number (> 0) of rounds on both sides")
    work = np.array([[getattr(s, rate) * s.elapsed_s, s.elapsed_s] for s in (*a, *b)]).reshape(2, len(a), 2)
    point = float(_rate(work[1].sum(0)) / _rate(work[0].sum(0)))
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    sampled = work[:, picks].sum(axis=2)  # (side, resample, [amount, seconds])
    ratios = _rate(sampled[1]) / _rate(sampled[0])
    low, high = np.quantile(ratios, [0.025, 0.975])
    return RateRatio(point, float(low), float(high), len(a))


def _rate(amount_and_seconds: np.ndarray) -> np.ndarray:
    rates: np.ndarray = amount_and_seconds[..., 0] / np.maximum(amount_and_seconds[..., 1], 1e-9)
    return rates


def throughput_timeline(records: Iterable[RequestRecord], bucket_s: float = 1.0) -> list[tuple[float, float]]:
    """Completed requests per second in ``bucket_s`` buckets by completion time: ``(bucket start, rps)``."""
    ends = [r.end for r in records if r.ok]
    if not ends:
        return []
    counts = Counter(int(end // bucket_s) for end in ends)
    last = max(counts)
    return [(b * bucket_s, counts.get(b, 0) / bucket_s) for b in range(last + 1)]


def _ms(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1000:.2f}"


def format_summary(summary: Summary) -> str:
    """The human summary table (milliseconds)."""
    lines = [
        f"requests {summary.requests}  ok {summary.ok}  errors {summary.requests - summary.ok}  "
        f"elapsed {summary.elapsed_s:.2f}s  throughput {summary.throughput_rps:.1f} req/s  "
        f"{summary.tokens_per_s:.1f} tokens/s",
        "",
        f"{'ms':14}{'count':>8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for name, dist in (("latency", summary.latency), ("ttft", summary.ttft), ("inter-token", summary.inter_token)):
        if dist.count:
            lines.append(f"{name:14}{dist.count:>8}{_ms(dist.mean):>10}{_ms(dist.p50):>10}{_ms(dist.p90):>10}"
                         f"{_ms(dist.p99):>10}{_ms(dist.max):>10}")
    if summary.errors:
        lines += ["", "errors by type:"] + [f"  {kind:30} {count}" for kind, count in summary.errors.items()]
    if summary.success_by_policy:
        lines += ["", f"{'success by policy':40}{'graded':>8}{'correct':>9}{'rate':>8}"]
        for policy, row in summary.success_by_policy.items():
            lines.append(f"{policy:40}{int(row['graded']):>8}{int(row['correct']):>9}{row['rate']:>8.1%}")
    return "\n".join(lines)
