"""Launch helpers: N workers on consecutive ports, and the resolver plugin's environment."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from loragate.workers.launch import (
    WorkerFleet,
    WorkerLaunch,
    confine_to_cpus,
    parse_cpu_list,
    resolver_env,
    split_cpus,
)
from tests.procs import process_group


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


def _forked_later(pid: int) -> int:
    """The stand-in worker's ``sleep 30``: forked 0.5 s after start, so surely after the test changed the
    worker (its ``sleep 0.5`` may be forked before that on a busy machine)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in _children(pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"30"]:
                    return child
        time.sleep(0.05)
    raise AssertionError(f"no 'sleep 30' child of {pid} within 10 s")


@pytest.mark.parametrize("nice", [10, 0])
def test_a_worker_session_gets_less_cpu_weight_and_its_children_inherit_it(nice: int) -> None:
    """A stand-in worker (a shell that forks later, as vLLM forks its engine) in its own session."""
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
        assert os.getpriority(os.PRIO_PROCESS, _forked_later(proc.pid)) == expected  # forked after: inherited
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller keeps its own priority


@pytest.mark.parametrize(("text", "cpus"), [("0", (0,)), ("0-2,5", (0, 1, 2, 5)), ("3,1, 1-2", (1, 2, 3))])
def test_cpu_lists_parse_like_taskset(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "2-1", "0,", "-1", "1-"])
def test_bad_cpu_lists_are_refused_with_the_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="CPU numbers and ranges"):
        parse_cpu_list(text)


def test_split_cpus_leaves_the_gateway_the_other_cpus_and_refuses_to_leave_none() -> None:
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="leave no CPU for the gateway"):
        split_cpus(allowed)
    with pytest.raises(ValueError, match="must be among"):
        split_cpus((max(allowed) + 1,))
    if len(allowed) > 1:
        assert split_cpus(allowed[:1]) == allowed[1:]


def test_a_worker_on_one_cpu_names_it_for_vllms_thread_binding(tmp_path: Path) -> None:
    one = WorkerLaunch(model=tmp_path, served_model_name="m", cpus=(1,)).environment()
    several = WorkerLaunch(model=tmp_path, served_model_name="m", cpus=(0, 1)).environment()
    assert one["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert several.get("VLLM_CPU_OMP_THREADS_BIND") == os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # vLLM's auto


def test_a_confined_worker_session_passes_its_cpus_to_children_it_forks_later() -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)
    proc = subprocess.Popen(["sh", "-c", "sleep 0.5; sleep 30"], start_new_session=True)
    try:
        confine_to_cpus(proc.pid, (cpu,))
        assert os.sched_getaffinity(proc.pid) == {cpu}
        assert os.sched_getaffinity(_forked_later(proc.pid)) == {cpu}
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert os.sched_getaffinity(0) == before  # the caller keeps its own CPUs


def _group_members(pgid: int) -> list[int]:
    return sorted(process_group(pgid))


def test_stopping_a_worker_whose_main_process_exited_still_reaps_its_group() -> None:
    """A crashed API server leaves vLLM's engine processes in its group: stop must not return early."""
    from loragate.workers.launch import stop_process_group

    proc = subprocess.Popen(["sh", "-c", "sleep 120 & echo $!"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    engine = int(proc.stdout.readline())
    proc.wait(timeout=30)  # the leader is gone, its "engine" is not
    assert _group_members(proc.pid) == [engine]
    stop_process_group(proc, grace=1.0)
    deadline = time.monotonic() + 30
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(proc.pid) == []
