"""The benchmark helpers that need no servers: output paths, prompts, the LiteLLM setup, interleaving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import benchkit, report
from bench.bench_litellm import LiteLLMUnavailable, ensure_litellm, litellm_config
from loragate.loadtest.loadgen import LoadResult, LoadSpec
from loragate.loadtest.stats import RequestRecord


def test_output_dir_from_flag_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(benchkit.OUT_ENV, raising=False)
    assert benchkit.output_dir(None) is None
    assert benchkit.plot_file("x", None) == report.plot_path("x")
    assert benchkit.output_dir(tmp_path) == tmp_path
    monkeypatch.setenv(benchkit.OUT_ENV, str(tmp_path / "env"))
    assert benchkit.output_dir(None) == tmp_path / "env"
    assert benchkit.plot_file("cdf", tmp_path / "env") == tmp_path / "env" / "cdf.png"


def test_topical_prompts_are_distinct() -> None:
    prompts = benchkit.topical_prompts(500, seed=1)
    assert len({p.prompt for p in prompts}) == 500
    assert prompts == benchkit.topical_prompts(500, seed=1)


def test_litellm_config_points_at_the_stub() -> None:
    config = litellm_config("http://127.0.0.1:9", "tiny-llama")
    json.dumps(config)
    deployment = config["model_list"][0]  # type: ignore[index]
    assert deployment["litellm_params"]["api_base"] == "http://127.0.0.1:9/v1"
    assert config["litellm_settings"] == {"telemetry": False, "drop_params": True}


def test_missing_litellm_without_install_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LiteLLMUnavailable, match="does not exist"):
        ensure_litellm(tmp_path / "venv", install=False)


def test_measure_interleaved_reverses_the_order_every_other_round_and_keeps_each_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A B, B A, A B: steady drift cannot always favour the target that goes first; rounds stay paired."""
    order: list[str] = []

    async def fake_run_load(spec: LoadSpec, workload: object) -> LoadResult:
        order.append(spec.url)
        rate = 10.0 if spec.url.endswith("a") else 5.0  # tokens per second
        record = RequestRecord(index=0, start=0.0, latency=1.0, ok=True, status=200, tokens=int(rate * 2))
        return LoadResult(spec, (record,), elapsed_s=2.0)

    monkeypatch.setattr(benchkit, "run_load", fake_run_load)
    targets = [benchkit.Target("A", "http://x/a"), benchkit.Target("B", "http://x/b")]
    measured = benchkit.measure_interleaved(targets, 3, benchkit.topical_prompts(12), requests=3)
    assert order == ["http://x/a", "http://x/b", "http://x/b", "http://x/a", "http://x/a", "http://x/b"]
    assert [len(m.rounds) for m in measured.values()] == [3, 3]
    share = benchkit.paired_ratio(measured["A"], measured["B"])
    assert share.point == pytest.approx(0.5) and share.low == pytest.approx(0.5) and share.rounds == 3
