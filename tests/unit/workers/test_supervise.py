"""The worker supervisor of ``loragate up``: restarts with backoff, counts, log lines; the gateway's metric.

A fake worker process stands in for vLLM (the supervisor only needs start/exited/stop/kill); the
real-worker version (kill -9 under ``loragate up``) is in tests/integration/test_up.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.server.metrics import GatewayMetrics
from loragate.workers.launch import WorkerLaunch
from loragate.workers.supervise import Backoff, RestartCounts, Supervisor, describe_exit


class FakeWorker:
    def __init__(self, tmp_path: Path, port: int = 9) -> None:
        self.launch = WorkerLaunch(model=tmp_path, served_model_name="m", port=port)
        self.code: int | None = None
        self.starts = self.stops = 0
        self.start_threads: list[threading.Thread] = []
        self.pid: int | None = 1000

    def exited(self) -> int | None:
        return self.code

    def start(self) -> None:
        self.starts += 1
        self.code = None
        self.start_threads.append(threading.current_thread())

    def stop(self, grace: float = 15.0) -> None:
        self.stops += 1

    def kill(self) -> None:
        self.code = -9


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first_s=1.0, max_s=5.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exit_codes_read_as_signals_or_statuses() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with 1"


def test_restart_counts_round_trip_and_read_nothing_when_absent_or_broken(tmp_path: Path) -> None:
    counts = RestartCounts.in_data_dir(tmp_path)
    assert counts.read() == {}
    counts.write({"http://127.0.0.1:8100": 2})
    assert counts.read() == {"http://127.0.0.1:8100": 2}
    counts.path.write_text("{not json")
    assert counts.read() == {}
    counts.remove()
    assert not counts.path.exists()


def test_an_exited_worker_is_restarted_counted_logged_and_stopped_at_the_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    worker, steady = FakeWorker(tmp_path, 9), FakeWorker(tmp_path, 10)
    counts = RestartCounts.in_data_dir(tmp_path)
    supervisor = Supervisor([worker, steady], counts, Backoff(first_s=0.01), start_timeout_s=600, poll_s=0.01)
    caplog.set_level(logging.INFO, logger="loragate.workers.supervise")
    supervisor.start()
    try:
        assert counts.read() == {worker.launch.url: 0, steady.launch.url: 0}
        worker.code = -9
        eventually(lambda: worker.starts == 1)
        eventually(lambda: counts.read()[worker.launch.url] == 1)
        assert steady.starts == 0 and counts.read()[steady.launch.url] == 0
        assert worker.stops == 1  # what was left of its process group was reaped before the restart
        assert f"worker {worker.launch.url} killed by SIGKILL" in caplog.text
        eventually(lambda: "restarted (pid 1000, restart 1)" in caplog.text)  # logged after the count is written
        assert "restarting it in" in caplog.text
    finally:
        supervisor.stop()
    assert worker.start_threads[0].name == "loragate-supervisor"  # it also ends (and stops) the workers it started
    assert worker.stops == 2 and steady.stops == 1
    assert not counts.path.exists()


def test_quick_failures_back_off_and_a_long_run_resets_the_delay(tmp_path: Path) -> None:
    worker = FakeWorker(tmp_path)
    supervisor = Supervisor([worker], RestartCounts.in_data_dir(tmp_path),
                            Backoff(first_s=1.0, max_s=100, healthy_after_s=60.0), start_timeout_s=600)
    watch = supervisor._watches[0]
    now = watch.started
    for consecutive, delay in ((1, 1.0), (2, 2.0), (3, 4.0)):
        now += 5.0  # a run of 5 s: quick
        worker.code = 1
        supervisor._check(watch, now)
        assert (watch.consecutive, watch.restart_at) == (consecutive, now + delay)
        assert worker.starts == consecutive - 1  # not yet: it waits out the delay
        supervisor._check(watch, now + delay)
        assert worker.starts == consecutive
        now = watch.started = now + delay
        watch.ready = True
    worker.code = 1
    supervisor._check(watch, now + 61.0)  # that run lasted past healthy_after_s
    assert (watch.consecutive, watch.restart_at) == (1, now + 62.0)


def test_a_restarted_worker_that_never_gets_ready_is_killed_after_the_start_timeout(tmp_path: Path) -> None:
    worker = FakeWorker(tmp_path)  # port 9: nothing answers /health there
    supervisor = Supervisor([worker], RestartCounts.in_data_dir(tmp_path), start_timeout_s=5.0)
    watch = supervisor._watches[0]
    watch.ready = False
    supervisor._check(watch, watch.started + 1.0)
    assert worker.code is None
    supervisor._check(watch, watch.started + 6.0)
    assert worker.code == -9  # killed: the next check restarts it, with backoff


def test_the_gateway_exports_the_supervisors_counts(tmp_path: Path) -> None:
    counts = RestartCounts.in_data_dir(tmp_path)
    metrics = GatewayMetrics()
    metrics.watch_worker_restarts(counts.read)
    assert b"loragate_worker_restarts_total{" not in metrics.render()  # `serve`: no supervisor, no samples
    counts.write({"http://127.0.0.1:8100": 3})
    assert b'loragate_worker_restarts_total{worker="http://127.0.0.1:8100"} 3.0' in metrics.render()
