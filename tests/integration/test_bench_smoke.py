"""The routing and merge benchmarks keep working (tiny sizes, written to a temp dir, never to docs/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import postgres_bin_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("module", "section", "headline"), [
    ("bench_routing", "routing.md", "nearest = label"),
    ("bench_mixed", "mixed.md", "pin p99 while select saturates"),
    ("bench_merge", "merge.md", "cat merge"),
    ("bench_shadow", "shadow.md", "shadow runs change"),
    ("bench_processes", "processes.md", "2 gateway processes"),
])
def test_benchmark_quick_run(tmp_path: Path, module: str, section: str, headline: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(headline)
    text = (tmp_path / section).read_text()
    assert "| " in text and "Run " in text
    for plot in re.findall(r"!\[[^]]*\]\((?:\./)?([^)]+\.png)\)", text):  # every plot the section shows was written
        assert (tmp_path / plot).stat().st_size > 0, plot


def test_fleet_benchmark_quick_run(tmp_path: Path) -> None:
    """bench_fleet starts its own PostgreSQL: the binaries are installed (or the test skipped) here first, as
    for the other PostgreSQL tests, so the benchmark's subprocess never has to."""
    postgres_bin_dir()
    test_benchmark_quick_run(tmp_path, "bench_fleet", "bench_fleet.md", "fleet on PostgreSQL")
    text = (tmp_path / "bench_fleet.md").read_text()
    for row in ("| 201 -> listed by replica 2 |", "| 32 | PostgreSQL |", "| 3 replicas via LB |"):
        assert row in text
    assert (tmp_path / "fleet_propagation.png").stat().st_size > 0


def test_the_detector_trainer_writes_a_model_the_gateway_loads(tmp_path: Path) -> None:
    from loragate.router.compositional import LearnedDetector

    out = tmp_path / "models.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_detector", "--embedders", "static", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    detector = LearnedDetector.for_embedder("static", out)
    assert 0 < detector.model.threshold < 1 and any(w != 0 for w in detector.model.weights)
