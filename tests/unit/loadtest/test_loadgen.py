"""The load generator: Poisson schedules, the safety checks on a spec, and requests against scripted servers."""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loragate.loadtest.loadgen import (
    MAX_REQUESTS,
    LoadSpec,
    LoadSpecError,
    _one,
    is_loopback,
    planned_requests,
    poisson_arrivals,
    validate,
)
from loragate.loadtest.workloads import WorkItem


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


@contextlib.asynccontextmanager
async def scripted(answer: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """A real local HTTP server whose every POST is answered by ``answer``, and a session for it."""
    app = web.Application()
    app.router.add_post("/{path:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield str(server.make_url("")).rstrip("/"), session
    finally:
        await server.close()


async def test_requests_carry_expected_answer_and_run_scoped_request_ids() -> None:
    """The gateway grades what the load generator grades, and a run's records can be found by id."""
    seen: list[Mapping[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers)
        return web.json_response({"choices": [{"text": "paris ."}], "usage": {"completion_tokens": 2}})

    async with scripted(answer) as (url, client):
        spec = LoadSpec(url=url, request_id_prefix="demo-7")
        graded = await _one(client, spec, WorkItem("q", expected=("Paris",)), 3, 0.0, 0.0)
        several = await _one(client, spec, WorkItem("q", expected=("a", "b")), 4, 0.0, 0.0)
        warmup = await _one(client, spec, WorkItem("q"), -1, 0.0, 0.0)
    assert graded.correct is True and several.correct is False and graded.tokens == 2
    assert seen[0]["x-expected-answer"] == "Paris" and seen[0]["x-request-id"] == "demo-7-3"
    assert "x-expected-answer" not in seen[1]  # several acceptable answers: graded client-side only
    assert seen[1]["x-request-id"] == "demo-7-4"
    assert "x-request-id" not in seen[2] and warmup.correct is None
    with pytest.raises(LoadSpecError, match="request-id-prefix"):
        validate(LoadSpec(url="http://127.0.0.1:1", request_id_prefix="run 1/2"))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_chat_route_sends_messages_and_reads_message_content(stream: bool) -> None:
    sent: list[tuple[str, dict[str, object]]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        sent.append((request.path, await request.json()))
        if not stream:
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "paris ."}}],
                                      "usage": {"completion_tokens": 2}})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in ({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "par"}}]},
                      {"choices": [{"delta": {"content": "is"}}]}):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async with scripted(answer) as (url, client):
        spec = LoadSpec(url=url, route="chat", stream=stream, max_tokens=3)
        record = await _one(client, spec, WorkItem("capital of france ?", expected=("Paris",)), 0, 0.0, 0.0)
    path, body = sent[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "capital of france ?"}] and "prompt" not in body
    assert record.ok and record.correct is True
    assert record.tokens == 2  # content chunks (the role-only chunk carries no token), or usage
    assert (record.ttft is not None) is stream
    with pytest.raises(LoadSpecError, match="route"):
        validate(LoadSpec(url="http://127.0.0.1:1", route="embeddings"))  # type: ignore[arg-type]


@pytest.mark.parametrize("usage", [True, False], ids=["usage-chunk", "no-usage-chunk"])
async def test_streamed_tokens_come_from_the_usage_chunk(usage: bool) -> None:
    """A server that merges tokens into fewer events (vLLM behind a slow reader) still counts every token."""
    sent: list[dict[str, object]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        sent.append(await request.json())
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunks: list[dict[str, object]] = [{"choices": [{"text": " the cat"}]}, {"choices": [{"text": " sat on it"}]}]
        if usage:
            chunks.append({"choices": [], "usage": {"completion_tokens": 5}})
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async with scripted(answer) as (url, client):
        record = await _one(client, LoadSpec(url=url, stream=True, max_tokens=5), WorkItem("q"), 0, 0.0, 0.0)
        asked = await _one(client, LoadSpec(url=url, stream=True, extra_body=(("stream_options", {}),)),
                           WorkItem("q"), 1, 0.0, 0.0)
    assert sent[0]["stream_options"] == {"include_usage": True}
    assert sent[1]["stream_options"] == {}  # the caller's own stream_options win
    assert record.ok and record.tokens == (5 if usage else 2)  # else: one per text event
    assert len(record.inter_token) == 1 and asked.ok


async def test_errors_are_counted_by_status_and_by_exception_name() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy"}}, status=503)

    async with scripted(answer) as (url, client):
        refused = await _one(client, LoadSpec(url=url), WorkItem("q"), 0, 0.0, 0.0)
    async with aiohttp.ClientSession() as client:  # nothing listens there any more
        unreachable = await _one(client, LoadSpec(url=url), WorkItem("q"), 1, 0.0, 0.0)
    assert (refused.ok, refused.status, refused.error) == (False, 503, "http_503")
    assert not unreachable.ok and unreachable.status is None and unreachable.error
