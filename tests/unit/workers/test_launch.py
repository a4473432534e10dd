"""Launch helpers: N workers on consecutive ports, and the resolver plugin's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.workers.launch import WorkerFleet, WorkerLaunch, resolver_env


def test_fleet_uses_consecutive_ports_and_one_log_each(tmp_path: Path) -> None:
    fleet = WorkerFleet(WorkerLaunch(model=tmp_path, served_model_name="m", port=8100), 3, tmp_path / "logs")
    assert fleet.urls == ["http://127.0.0.1:8100", "http://127.0.0.1:8101", "http://127.0.0.1:8102"]
    assert [p.log_path.name for p in fleet.processes] == ["worker-8100.log", "worker-8101.log", "worker-8102.log"]
    with pytest.raises(ValueError):
        WorkerFleet(WorkerLaunch(model=tmp_path, served_model_name="m"), 0, tmp_path)


def test_resolver_env_reaches_the_worker_environment(tmp_path: Path) -> None:
    launch = WorkerLaunch(model=tmp_path, served_model_name="m",
                          env=resolver_env("http://gw:8000/", "tok", tmp_path / "cache"))
    env = launch.environment()
    assert env["LORAGATE_RESOLVER_URL"] == "http://gw:8000"
    assert env["LORAGATE_RESOLVER_TOKEN"] == "tok"
    assert env["LORAGATE_RESOLVER_CACHE"] == str(tmp_path / "cache")
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # resolvers only run with runtime updating on
