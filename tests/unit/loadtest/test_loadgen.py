"""The load generator's pure parts: Poisson schedules and the safety checks on a spec."""

from __future__ import annotations

import json
import statistics

import pytest

from loragate.loadtest.loadgen import (
    MAX_REQUESTS,
    LoadSpec,
    LoadSpecError,
    is_loopback,
    planned_requests,
    poisson_arrivals,
    validate,
)


def test_poisson_schedule_has_the_requested_rate_and_is_seeded() -> None:
    arrivals = poisson_arrivals(50.0, count=20_000, seed=1)
    assert len(arrivals) == 20_000
    assert arrivals == sorted(arrivals)
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: stdev == mean
    assert poisson_arrivals(50.0, count=100, seed=1) == arrivals[:100]
    assert poisson_arrivals(50.0, count=100, seed=2) != arrivals[:100]


def test_poisson_schedule_by_duration() -> None:
    arrivals = poisson_arrivals(100.0, duration_s=10.0, seed=0)
    assert all(t < 10.0 for t in arrivals)
    assert 900 < len(arrivals) < 1100
    assert len(poisson_arrivals(100.0, count=5, duration_s=10.0)) == 5  # the first limit reached wins


def test_poisson_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, count=3)
    with pytest.raises(ValueError):
        poisson_arrivals(1.0)


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:8000", True), ("http://localhost:8000", True), ("http://[::1]:8000", True),
    ("http://127.1.2.3", True), ("http://10.0.0.1:8000", False), ("https://api.openai.com", False),
])
def test_is_loopback(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_validate_refuses_remote_targets_unless_allowed() -> None:
    with pytest.raises(LoadSpecError, match="--allow-remote"):
        validate(LoadSpec(url="http://10.0.0.1:8000"))
    assert validate(LoadSpec(url="http://10.0.0.1:8000", allow_remote=True)).requests == 100


def test_validate_caps_and_defaults() -> None:
    assert validate(LoadSpec(url="http://127.0.0.1:1")).requests == 100  # neither limit: 100 requests
    assert validate(LoadSpec(url="http://127.0.0.1:1", duration_s=5)).requests is None
    with pytest.raises(LoadSpecError, match="--unbounded"):
        validate(LoadSpec(url="http://127.0.0.1:1", requests=MAX_REQUESTS + 1))
    assert validate(LoadSpec(url="http://127.0.0.1:1", requests=MAX_REQUESTS + 1, unbounded=True))
    with pytest.raises(LoadSpecError, match="--unbounded"):
        validate(LoadSpec(url="http://127.0.0.1:1", duration_s=10_000))
    for bad in (LoadSpec(url="http://127.0.0.1:1", mode="open"), LoadSpec(url="http://127.0.0.1:1", concurrency=0),
                LoadSpec(url="ftp://127.0.0.1"), LoadSpec(url="http://127.0.0.1:1", requests=0)):
        with pytest.raises(LoadSpecError):
            validate(bad)


def test_planned_requests() -> None:
    assert planned_requests(LoadSpec(url="x", requests=7)) == 7
    assert planned_requests(LoadSpec(url="x", mode="open", rate=10, duration_s=3)) == 30
    assert planned_requests(LoadSpec(url="x", duration_s=3)) is None


async def test_requests_carry_expected_answer_and_run_scoped_request_ids() -> None:
    """The gateway grades what the load generator grades, and a run's records can be found by id."""
    import httpx

    from loragate.loadtest.loadgen import _one
    from loragate.loadtest.workloads import WorkItem

    seen: list[httpx.Headers] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json={"choices": [{"text": "paris ."}], "usage": {"completion_tokens": 2}})

    spec = LoadSpec(url="http://127.0.0.1:1", request_id_prefix="demo-7")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        graded = await _one(client, spec, WorkItem("q", expected=("Paris",)), 3, 0.0, 0.0)
        several = await _one(client, spec, WorkItem("q", expected=("a", "b")), 4, 0.0, 0.0)
        warmup = await _one(client, spec, WorkItem("q"), -1, 0.0, 0.0)
    assert graded.correct is True and several.correct is False
    assert seen[0]["x-expected-answer"] == "Paris" and seen[0]["x-request-id"] == "demo-7-3"
    assert "x-expected-answer" not in seen[1]  # several acceptable answers: graded client-side only
    assert seen[1]["x-request-id"] == "demo-7-4"
    assert "x-request-id" not in seen[2] and warmup.correct is None
    with pytest.raises(LoadSpecError, match="request-id-prefix"):
        validate(LoadSpec(url="http://127.0.0.1:1", request_id_prefix="run 1/2"))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_chat_route_sends_messages_and_reads_message_content(stream: bool) -> None:
    import httpx

    from loragate.loadtest.loadgen import _one
    from loragate.loadtest.workloads import WorkItem

    sent: list[tuple[str, dict[str, object]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        if not stream:
            return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "paris ."}}],
                                             "usage": {"completion_tokens": 2}})
        chunks = [{"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "par"}}]},
                  {"choices": [{"delta": {"content": "is"}}]}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    spec = LoadSpec(url="http://127.0.0.1:1", route="chat", stream=stream, max_tokens=3)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        record = await _one(client, spec, WorkItem("capital of france ?", expected=("Paris",)), 0, 0.0, 0.0)
    path, body = sent[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "capital of france ?"}] and "prompt" not in body
    assert record.ok and record.correct is True
    assert record.tokens == 2  # content chunks (the role-only chunk carries no token), or usage
    assert (record.ttft is not None) is stream
    with pytest.raises(LoadSpecError, match="route"):
        validate(LoadSpec(url="http://127.0.0.1:1", route="embeddings"))  # type: ignore[arg-type]
