"""`loragate up`: the embedded default starts a worker and the gateway, and SIGTERM stops both; a worker
that dies is restarted; nothing of it outlives a SIGKILL of its API server or of `up` itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from loragate.workers.launch import free_port, wait_healthy
from tests.integration.conftest import Tiny
from tests.procs import process_group


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a restarted worker is a child of `up`'s supervisor thread)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            children += [int(p) for p in (task / "children").read_text().split()]
    return sorted(children)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_and_stops_its_worker_on_signal(tiny: Tiny, tmp_path: Path, sig: signal.Signals) -> None:
    port, worker_port = free_port(), free_port()
    cpus = sorted(os.sched_getaffinity(0))
    split = sig == signal.SIGINT and len(cpus) > 1  # one run also keeps the worker and the gateway apart
    proc = subprocess.Popen([sys.executable, "-m", "loragate.server.cli", "up", "--model", str(tiny.model),
                             "--worker-port", str(worker_port), "--max-loras", "1",
                             *(["--worker-cpus", str(cpus[0])] if split else []),
                             "--set", f"port={port}", "--set", f"data_dir={tmp_path / 'data'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 400, name="loragate up")
        if split:
            [worker] = _children(proc.pid)
            engine = _children(worker)
            assert engine and all(os.sched_getaffinity(pid) == {cpus[0]} for pid in [worker, *engine])
            assert os.sched_getaffinity(proc.pid) == set(cpus[1:])
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": "tiny-llama", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
        assert response.status_code == 200 and response.json()["choices"][0]["text"]
        # loopback + no token: admin is open for local use
        assert httpx.get(f"http://127.0.0.1:{port}/admin/workers").json()["data"][0]["healthy"] is True
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 128 + sig
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{worker_port}/health", timeout=2)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "stopping worker" in output
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_with_resolver_delivery_serves_adapters_the_workers_fetch_over_http(tiny: Tiny, tmp_path: Path) -> None:
    """The workers get the gateway's URL and a generated token, never a path: they fetch and verify."""
    port, worker_port, data = free_port(), free_port(), tmp_path / "data"
    alpha = tiny.adapter("alpha", 1)
    proc = subprocess.Popen([sys.executable, "-m", "loragate.server.cli", "up", "--model", str(tiny.model),
                             "--worker-port", str(worker_port), "--set", f"port={port}", "--set", f"data_dir={data}",
                             "--set", "adapter_delivery=resolver", "--set", f'import_roots=["{tiny.root}"]'])
    gateway = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{gateway}/health", proc, 400, name="loragate up")
        assert httpx.post(f"{gateway}/admin/adapters", json={"name": "alpha", "path": str(alpha)}).status_code == 201
        sha = httpx.get(f"{gateway}/admin/adapters/alpha").json()["sha256"]
        body = {"prompt": "the cat sat on the", "max_tokens": 4, "temperature": 0}
        via_resolver = httpx.post(f"{gateway}/v1/completions", json={"model": "alpha", **body}, timeout=120)
        assert via_resolver.status_code == 200, via_resolver.text
        base = httpx.post(f"{gateway}/v1/completions", json={"model": "tiny-llama", **body}, timeout=120)
        assert via_resolver.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
        fetched = data / "worker-cache" / sha
        weights = "adapter_model.safetensors"
        assert (fetched / weights).read_bytes() == (alpha / weights).read_bytes()
        served = httpx.get(f"http://127.0.0.1:{worker_port}/v1/models").json()["data"]
        assert {m["id"]: m["root"] for m in served if m.get("parent")} == {"alpha": str(fetched)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)


def _group(pgid: int) -> list[str]:
    """Live processes of process group ``pgid`` (a worker: its API server and vLLM's engine processes), by name."""
    return list(process_group(pgid).values())


def _eventually(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)


def test_up_restarts_a_dead_worker_and_leaves_no_process_behind(tiny: Tiny, tmp_path: Path) -> None:
    """kill -9 the worker's API server: its engine dies with it (no orphans), `up` restarts the worker, it
    serves again and the restart is a metric and a log line; then kill -9 `up`: no worker process is left."""
    port, worker_port = free_port(), free_port()
    gateway, worker_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{worker_port}"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        # a restart delay longer than the orphan check below, so the supervisor's own cleanup cannot mask it
        proc = subprocess.Popen([sys.executable, "-m", "loragate.server.cli", "up", "--model", str(tiny.model),
                                 "--worker-port", str(worker_port), "--max-loras", "1", "--set", f"port={port}",
                                 "--set", f"data_dir={tmp_path / 'data'}", "--set", "worker_restart_backoff_s=30",
                                 "--set", "worker_start_timeout_s=900"], stdout=out, stderr=subprocess.STDOUT)
    worker_groups: list[int] = []
    try:
        wait_healthy(f"{gateway}/health", proc, 600, name="loragate up")
        [first] = _children(proc.pid)
        worker_groups.append(first)
        assert "VLLM::EngineCor" in _group(first)  # comm is cut at 15 characters
        os.kill(first, signal.SIGKILL)  # the API server only, as a crash would
        _eventually(lambda: not _group(first), 20, "vLLM's engine processes outliving their API server")

        def restarts() -> float:
            found = re.search(rf'loragate_worker_restarts_total{{worker="{re.escape(worker_url)}"}} (\S+)',
                              httpx.get(f"{gateway}/metrics", timeout=30).text)
            return float(found.group(1)) if found else 0.0

        def serves() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.post(f"{gateway}/v1/completions", timeout=60, json={
                    "model": "tiny-llama", "prompt": "the cat", "max_tokens": 2}).status_code == 200
            return False

        _eventually(lambda: restarts() == 1.0, 120, "restart counted")
        _eventually(serves, 900, "restarted worker serving through the gateway")
        [second] = _children(proc.pid)
        assert second != first
        worker_groups.append(second)
        text = log.read_text()
        assert f"worker {worker_url} killed by SIGKILL" in text and f"worker {worker_url} restarted" in text
        assert _group(second)
        proc.kill()  # `up` itself, without a chance to stop anything
        proc.wait(timeout=30)
        _eventually(lambda: not _group(second), 30, "worker processes outliving a SIGKILLed `loragate up`")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{worker_url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pgid in worker_groups:  # never leave a worker to the rest of the suite, whatever failed above
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
