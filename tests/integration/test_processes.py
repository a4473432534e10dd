"""`processes=2`: two gateway processes share a port and a data dir; a registration in one reaches both."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from bench.benchkit import ADMIN_TOKEN, start_gateway, start_stub
from tests.lora_files import write_lora


def _until_both_processes_see_it(url: str, wait_s: float = 60.0) -> None:
    """Poll ``/health`` on new connections until two processes report the adapter (a bounded wait, not a sleep
    sized for an idle machine: a registry poll can take longer than its interval on a busy one)."""
    seen: set[int] = set()
    deadline = time.monotonic() + wait_s
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"after {wait_s:.0f} s only processes {seen} had the registration"
        health = httpx.get(f"{url}/health", headers={"connection": "close"}, timeout=5).json()
        if health.get("adapters", 0) >= 1:
            seen.add(health["pid"])
        time.sleep(0.05)


def test_two_processes_follow_each_others_registrations(tmp_path: Path) -> None:
    roots = tmp_path / "imports"
    adapter = write_lora(roots / "cooking")
    with start_stub(tmp_path / "logs") as stub, \
            start_gateway(tmp_path / "logs", tmp_path / "data", [stub.url], roots, embedder="static",
                          processes=2, registry_poll_s=0.2) as gateway:
        try:
            created = httpx.post(f"{gateway.url}/admin/adapters", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                                 json={"name": "cooking", "path": str(adapter), "description": "Cooking and recipes.",
                                       "examples": ["How long do I bake bread?"]}, timeout=60)
            assert created.status_code == 201, created.text
            _until_both_processes_see_it(gateway.url)
            pids, routed = set(), []
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                for i in range(40):
                    client.headers["connection"] = "close"  # new connections spread over both processes
                    response = client.post("/v1/completions", headers={"x-adapter-policy": "select;min_score=0.2"},
                                           json={"model": "tiny-llama", "prompt": f"how do I bake bread, take {i}"})
                    assert response.status_code == 200, response.text
                    routed.append(response.headers.get("x-adapters"))
                    pids.add(json.loads(httpx.get(f"{gateway.url}/health", timeout=5).text).get("pid"))
            assert routed == ['"cooking";w=1.0'] * 40
            assert len(pids) == 2, f"expected both processes to answer, saw {pids}"
        except (AssertionError, httpx.HTTPError) as exc:  # the gateway's log says why (e.g. a process failed to start)
            raise AssertionError(f"{exc}\n-- gateway log:\n{gateway.log_tail()}") from exc
