"""`loragate loadtest` against the stub behind a real gateway, and every benchmark at a tiny size.

Smoke only: counts, zero errors, ordered percentiles, files written. No timing is asserted (timed
expectations belong to `make bench`, not the test suite). Benchmarks write to a temp dir, never docs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import benchkit
from bench.bench_litellm import VENV as LITELLM_VENV
from tests.integration.conftest import Tiny
from tests.lora_files import write_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stub and `loragate serve` in front of it, each its own process, with one adapter registered."""
    work = tmp_path_factory.mktemp("loadtest-smoke")
    adapter = write_lora(work / "adapters" / "alpha", rank=8)
    with benchkit.start_stub(work / "logs") as stub, \
            benchkit.start_gateway(work / "logs", work / "data", [stub.url], work / "adapters",
                                   embedder="none") as gw:
        benchkit.register(gw.url, {"alpha": adapter})
        yield gw.url


def _loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loragate.server.cli", "loadtest", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _check(results: dict[str, object], requests: int) -> dict[str, object]:
    summary = results["summary"]
    assert isinstance(summary, dict)
    assert summary["requests"] == requests
    assert summary["ok"] == requests
    assert summary["errors"] == {}
    latency = summary["latency"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert len(results["records"]) == requests  # type: ignore[arg-type]
    return summary


def test_closed_loop_graded_workload(gateway: str, tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps(item) for item in [
        {"prompt": "the cat sat on", "policy": "base", "expected": "cat sat"},  # the stub answers "the cat sat ..."
        {"prompt": "where is the dog", "policy": 'pin;adapter="alpha"', "expected": "dog"},
    ]) + "\n")
    out = tmp_path / "results.json"
    done = _loadtest("--url", gateway, "-n", "20", "-c", "4", "--workload", str(workload), "--json", str(out),
                     "--plot", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    assert "p99" in done.stdout and "success by policy" in done.stdout
    summary = _check(json.loads(out.read_text()), 20)
    assert summary["success_by_policy"] == {
        "base": {"graded": 10, "correct": 10, "rate": 1.0},
        'pin;adapter="alpha"': {"graded": 10, "correct": 0, "rate": 0.0},
    }
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"latency_cdf.png", "throughput.png",
                                                                "success_by_policy.png"}


def test_open_loop_streaming(gateway: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = _loadtest("--url", gateway, "-n", "20", "--rate", "50", "--stream", "--max-tokens", "5",
                     "--policy", 'pin;adapter="alpha"', "--json", str(out))
    assert done.returncode == 0, done.stderr
    summary = _check(json.loads(out.read_text()), 20)
    assert summary["ttft"]["count"] == 20
    assert summary["inter_token"]["count"] == 20 * 4
    assert summary["ttft"]["p50"] <= summary["latency"]["p50"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_route_through_the_gateway(gateway: str, tmp_path: Path, stream: bool) -> None:
    workload = tmp_path / "chat.jsonl"
    workload.write_text(json.dumps({"prompt": "the cat sat on", "expected": "cat sat"}) + "\n")
    out = tmp_path / "results.json"
    done = _loadtest("--url", gateway, "--route", "chat", "-n", "12", "-c", "3", "--max-tokens", "4",
                     "--policy", 'pin;adapter="alpha"', "--workload", str(workload), "--json", str(out),
                     *(["--stream"] if stream else []))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    summary = _check(results, 12)
    assert results["spec"]["route"] == "chat"
    assert summary["success_by_policy"] == {'pin;adapter="alpha"': {"graded": 12, "correct": 12, "rate": 1.0}}
    if stream:
        assert summary["ttft"]["count"] == 12


def _bench(module: str, out: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_bench_overhead_quick(tiny: Tiny, worker: str, tmp_path: Path) -> None:
    headline = _bench("bench_overhead", tmp_path, "--tiny-dir", str(tiny.root), "--worker-url", worker)
    assert headline.startswith("loragate overhead over a direct instant upstream")
    assert "streamed tokens/s" in headline
    section = (tmp_path / "overhead.md").read_text()
    assert "| loragate pin |" in section and "Real vLLM-CPU worker" in section
    # paced stub, real worker on shared cores and (with two CPUs or more) on its own core: each with its interval
    split = len(os.sched_getaffinity(0)) > 1
    assert section.count("95% interval over the") == 2 + split
    assert ("Real vLLM-CPU worker on its own core" in section) == split
    assert (tmp_path / "overhead_cdf.png").exists()


@pytest.mark.skipif(not (LITELLM_VENV / "bin" / "litellm").exists(), reason=f"{LITELLM_VENV} is absent")
def test_bench_litellm_quick(tiny: Tiny, tmp_path: Path) -> None:
    headline = _bench("bench_litellm", tmp_path, "--tiny-dir", str(tiny.root), "--no-install")
    assert headline.startswith("loragate pin vs LiteLLM")
    assert "| LiteLLM proxy |" in (tmp_path / "litellm.md").read_text()
