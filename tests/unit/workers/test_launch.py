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


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("nice", [10, 0])
def test_a_worker_session_gets_less_cpu_weight_and_its_children_inherit_it(nice: int) -> None:
    """A stand-in worker (a shell that forks later, as vLLM forks its engine) in its own session."""
    import os
    import subprocess
    import time

    from loragate.workers.launch import lower_cpu_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, before + nice)
    proc = subprocess.Popen(["sh", "-c", "sleep 0.5; sleep 30"], start_new_session=True)
    try:
        lower_cpu_priority(proc.pid, nice)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == expected
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if nice and autogroup.exists():
            assert autogroup.read_text().split()[-1] == str(nice)  # "/autogroup-N nice 10"
        deadline = time.monotonic() + 10
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = _children(proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, child) == expected  # forked after: inherited
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller keeps its own priority
