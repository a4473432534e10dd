"""The composed request path over fakes: one completion event per request, however the request ends."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from starlette.requests import ClientDisconnect

from loragate.errors import InvalidRequest, NotFound, WorkerRejected
from loragate.router.service import Router
from loragate.router.types import PolicySpec
from loragate.server.gate import RoutingGate
from loragate.server.routes.openai import RelayResponse
from loragate.workers.dispatch import CLIENT_CLOSED, Dispatched, Job
from tests.unit.server.fakes import (
    MODEL,
    WORKER,
    FakeDispatcher,
    FakeRelay,
    build,
    failed,
    request,
    streamed,
    whole,
)

SSE = [b'data: {"choices": [{"text": "It is "}]}\n\n', b'data: {"choices": [{"text": "Paris."}]}\n\n',
       b"data: [DONE]\n\n"]


def requests_total(stages: object, policy: str, status: int) -> float:
    value = stages.metrics.requests.labels("completions", policy, str(status))._value.get()  # type: ignore[attr-defined]
    return float(value)


@pytest.mark.parametrize(("body", "policy", "error"), [
    ({"prompt": "hi"}, None, InvalidRequest),  # no model
    ({"model": "ghost", "prompt": "hi"}, None, NotFound),
    ({"model": MODEL, "prompt": "hi"}, 'pin;adapter="x', InvalidRequest),  # not RFC 8941
    ({"model": MODEL, "prompt": 5}, None, InvalidRequest),
])
async def test_a_request_refused_while_parsing_is_one_event_and_no_record(
        body: dict[str, object], policy: str | None, error: type[Exception]) -> None:
    stages = build(FakeDispatcher(whole()))
    with pytest.raises(error):
        await stages.service.complete(request(body, policy=policy))
    assert len(stages.events) == 1 and stages.events[0].call is None and stages.events[0].decision is None
    assert stages.outcomes.records == [] and stages.dispatcher.jobs == []
    assert requests_total(stages, "rejected", stages.events[0].status) == 1


async def test_a_policy_the_router_cannot_run_is_refused_before_a_decision() -> None:
    stages = build(FakeDispatcher(whole()))
    with pytest.raises(InvalidRequest):
        await stages.service.complete(request(policy="select"))  # no embedder here
    assert [e.status for e in stages.events] == [400] and stages.events[0].decision is None


async def test_a_worker_error_is_one_event_with_the_worker_and_a_record() -> None:
    stages = build(FakeDispatcher(error=failed(WorkerRejected("worker error: too long", status=400))))
    with pytest.raises(WorkerRejected):
        await stages.service.complete(request(policy='pin;adapter="alpha"'))
    (event,) = stages.events
    assert event.status == 400 and event.attempt.worker == WORKER and event.decision is not None
    (row,) = stages.outcomes.records
    assert row.status == 400 and row.worker == WORKER and row.adapters == (("alpha", 1.0),)
    assert requests_total(stages, "pin", 400) == 1


async def test_a_whole_answer_is_graded_and_recorded_once() -> None:
    stages = build(FakeDispatcher(whole()))
    response = await stages.service.complete(request({"model": "alpha", "prompt": "capital?"}, expected="paris"))
    assert response.status == 200 and response.stream is None
    assert response.headers["x-adapters"] == '"alpha";w=1.0' and response.headers["x-adapter-policy-applied"] == "pin"
    (job,) = stages.dispatcher.jobs
    assert job.body["model"] == "alpha" and job.adapter == "alpha" and job.adapter_path == "/x" and job.counted
    (event,) = stages.events
    assert event.status == 200 and event.output == "It is Paris." and event.upstream_s == 0.01
    (row,) = stages.outcomes.records
    assert row.result == "success" and row.graded_by == "expected" and row.load_ms == pytest.approx(2.0)


async def test_the_policy_field_never_reaches_the_worker() -> None:
    stages = build(FakeDispatcher(whole()))
    await stages.service.complete(request({"model": MODEL, "prompt": "hi", "adapter_policy": "base"}))
    assert "adapter_policy" not in stages.dispatcher.jobs[0].body and stages.dispatcher.jobs[0].body["model"] == MODEL


async def test_a_stream_read_to_the_end_is_one_event_when_it_ends() -> None:
    relay = FakeRelay(SSE)
    stages = build(FakeDispatcher(streamed(relay)))
    response = await stages.service.complete(request({"model": MODEL, "prompt": "hi", "stream": True},
                                                     expected="Paris"))
    assert response.stream is not None and stages.events == []  # nothing ended yet
    assert [c async for c in response.stream] == SSE
    await response.stream.aclose()  # the response's owner closes it again: still one event
    (event,) = stages.events
    assert event.status == 200 and event.output == "It is Paris." and stages.outcomes.records[0].result == "success"


async def test_a_broken_stream_is_one_502_event() -> None:
    stages = build(FakeDispatcher(streamed(FakeRelay(SSE[:1], broken=True))))
    response = await stages.service.complete(request({"model": MODEL, "prompt": "hi", "stream": True}))
    assert response.stream is not None
    _ = [c async for c in response.stream]
    assert [e.status for e in stages.events] == [502]


async def test_a_client_leaving_mid_stream_is_one_event() -> None:
    stages = build(FakeDispatcher(streamed(FakeRelay(SSE))))
    response = await stages.service.complete(request({"model": MODEL, "prompt": "hi", "stream": True}))
    assert response.stream is not None
    chunks = aiter(response.stream)
    await anext(chunks)
    await response.stream.aclose()
    await chunks.aclose()  # type: ignore[attr-defined]
    assert [e.status for e in stages.events] == [CLIENT_CLOSED]


async def test_a_stream_never_iterated_still_ends_the_request_through_its_response() -> None:
    """The client is gone before the first byte: sending the headers fails and nothing iterates the stream."""
    relay = FakeRelay(SSE)
    stages = build(FakeDispatcher(streamed(relay)))
    result = await stages.service.complete(request({"model": MODEL, "prompt": "hi", "stream": True}))
    assert result.stream is not None
    response = RelayResponse(result.stream, result.status, dict(result.headers), result.media_type)

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        return {}

    async def send(message: object) -> None:
        raise OSError("client gone")

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/v1/completions",
             "headers": []}
    with pytest.raises(ClientDisconnect):
        await response(scope, receive, send)
    assert [e.status for e in stages.events] == [CLIENT_CLOSED] and relay.closes >= 1


async def test_a_cancelled_request_is_one_event() -> None:
    stages = build(FakeDispatcher(error=asyncio.CancelledError()))
    with pytest.raises(asyncio.CancelledError):
        await stages.service.complete(request())
    assert [e.status for e in stages.events] == [CLIENT_CLOSED]


class EveryCallRoutes(Router):
    """A router whose every call counts as routed, so a gate of one slot applies to pinned fakes."""

    def searches(self, spec: PolicySpec) -> bool:
        return True


@dataclass
class HeldDispatcher(FakeDispatcher):
    """Holds every job until ``release`` is set, like a vLLM worker still generating; ``both`` is set once
    two jobs are upstream."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    both: asyncio.Event = field(default_factory=asyncio.Event)

    async def dispatch(self, job: Job) -> Dispatched:
        self.jobs.append(job)
        if len(self.jobs) == 2:
            self.both.set()
        await self.release.wait()
        assert self.reply is not None
        return self.reply


async def test_the_routing_gate_covers_the_decision_not_the_upstream_call() -> None:
    gate = RoutingGate(1)
    held = HeldDispatcher(whole())
    stages = build(held, router=EveryCallRoutes(PolicySpec("base")), gate=gate)
    first = asyncio.create_task(stages.service.complete(request(policy='pin;adapter="alpha"')))
    second = asyncio.create_task(stages.service.complete(request(policy='pin;adapter="alpha"')))
    async with asyncio.timeout(2):
        await held.both.wait()  # both decided and upstream while the first is still waiting for its answer
    assert gate.waiting == 0 and not first.done()
    held.release.set()
    assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]
    await gate.close()
