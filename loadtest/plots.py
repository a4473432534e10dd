"""PNG plots of load-test results (matplotlib, headless Agg backend).

Latency CDFs show tails that a p99 alone hides, and overlaying several runs (direct vs through the
gateway) shows where overhead comes from; throughput over time shows warm-up and stalls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loragate.loadtest.stats import RequestRecord, Summary, throughput_timeline


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (imported on first use: plotting is never on a hot path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(series: Mapping[str, Sequence[float]], path: Path, title: str = "Latency CDF",
                log_x: bool = False) -> Path:
    """One CDF line per named series of latencies (seconds, plotted in ms)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in series.items():
        ordered = sorted(v * 1000 for v in values)
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_over_time(records: Sequence[RequestRecord], path: Path, bucket_s: float = 1.0) -> Path:
    """Completed requests per second over the run."""
    plt = pyplot()
    timeline = throughput_timeline(records, bucket_s)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step([t for t, _ in timeline], [rps for _, rps in timeline], where="post")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("completed requests/s")
    ax.set_title("Throughput over time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def success_by_policy(summary: Summary, path: Path) -> Path | None:
    """Bar chart of the graded success rate per policy; None when nothing was graded."""
    if not summary.success_by_policy:
        return None
    plt = pyplot()
    names = list(summary.success_by_policy)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [summary.success_by_policy[n]["rate"] for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate")
    ax.set_title("Success by policy")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(records: Sequence[RequestRecord], summary: Summary, directory: Path) -> list[Path]:
    """The CLI's ``--plot DIR``: latency CDF, throughput over time, success by policy (when graded)."""
    paths = [latency_cdf({"latency": [r.latency for r in records if r.ok]}, directory / "latency_cdf.png"),
             throughput_over_time(records, directory / "throughput.png")]
    graded = success_by_policy(summary, directory / "success_by_policy.png")
    return [*paths, graded] if graded else paths
