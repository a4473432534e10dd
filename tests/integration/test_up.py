"""`loragate up`: the embedded default starts a worker and the gateway, and SIGTERM stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from examples.stack import free_port, wait_for
from tests.integration.conftest import Tiny


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


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
        wait_for(f"http://127.0.0.1:{port}/health", proc, timeout=400)
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
        wait_for(f"{gateway}/health", proc, timeout=400)
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
