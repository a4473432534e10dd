"""The load generator's pure parts: Poisson schedules and the safety checks on a spec."""

from __future__ import annotations

import statistics

import pytest

from loragate.loadtest.loadgen import (
    MAX_REQUESTS,
    LoadSpec,
    LoadSpecError,
    is_loopback,
    planned_requests,
    poisson_arrivals,
    validate,
)


def test_poisson_schedule_has_the_requested_rate_and_is_seeded() -> None:
    arrivals = poisson_arrivals(50.0, count=20_000, seed=1)
    assert len(arrivals) == 20_000
    assert arrivals == sorted(arrivals)
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: stdev == mean
    assert poisson_arrivals(50.0, count=100, seed=1) == arrivals[:100]
    assert poisson_arrivals(50.0, count=100, seed=2) != arrivals[:100]


def test_poisson_schedule_by_duration() -> None:
    arrivals = poisson_arrivals(100.0, duration_s=10.0, seed=0)
    assert all(t < 10.0 for t in arrivals)
    assert 900 < len(arrivals) < 1100
    assert len(poisson_arrivals(100.0, count=5, duration_s=10.0)) == 5  # the first limit reached wins


def test_poisson_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, count=3)
    with pytest.raises(ValueError):
        poisson_arrivals(1.0)


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000", True), ("http://[::1]:8000", True),
    ("http://127.1.2.3", True), ("http://10.0.0.1:8000", False), ("https://api.openai.com", False),
])
def test_is_loopback(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_validate_refuses_remote_targets_unless_allowed() -> None:
    with pytest.raises(LoadSpecError, match="--allow-remote"):
        validate(LoadSpec(url="http://10.0.0.1:8000"))
    assert validate(LoadSpec(url="http://10.0.0.1:8000", allow_remote=True)).requests == 100


def test_validate_caps_and_defaults() -> None:
    assert validate(LoadSpec(url="http://127.0.0.1:1")).requests == 100  # neither limit: 100 requests
    assert validate(LoadSpec(url="http://127.0.0.1:1", duration_s=5)).requests is None
    with pytest.raises(LoadSpecError, match="--unbounded"):
        validate(LoadSpec(url="http://127.0.0.1:1", requests=MAX_REQUESTS + 1))
    assert validate(LoadSpec(url="http://127.0.0.1:1", requests=MAX_REQUESTS + 1, unbounded=True))
    with pytest.raises(LoadSpecError, match="--unbounded"):
        validate(LoadSpec(url="http://127.0.0.1:1", duration_s=10_000))
    for bad in (LoadSpec(url="http://127.0.0.1:1", mode="open"), LoadSpec(url="http://127.0.0.1:1", concurrency=0),
                LoadSpec(url="ftp://127.0.0.1"), LoadSpec(url="http://127.0.0.1:1", requests=0)):
        with pytest.raises(LoadSpecError):
            validate(bad)


def test_planned_requests() -> None:
    assert planned_requests(LoadSpec(url="x", requests=7)) == 7
    assert planned_requests(LoadSpec(url="x", mode="open", rate=10, duration_s=3)) == 30
    assert planned_requests(LoadSpec(url="x", duration_s=3)) is None
