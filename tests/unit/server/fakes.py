"""Fakes for the request path's stages: a registry, a scripted dispatcher and relay, an outcome log."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loragate.adapters.resolve import Resolver
from loragate.adapters.types import AdapterRecord
from loragate.errors import LoragateError
from loragate.router.service import Router
from loragate.router.types import PolicySpec
from loragate.server.calls import CallParser, CompletionRequest
from loragate.server.gate import RoutingGate
from loragate.server.metrics import GatewayMetrics
from loragate.server.outcomes import OutcomeRecord
from loragate.server.pipeline import CompletionService
from loragate.server.recorder import CompletionEvent, OutcomeRecorder
from loragate.workers.dispatch import CLIENT_CLOSED, Attempt, Dispatched, DispatchFailed, InFlight, Job, StreamEnd
from tests.unit.router.test_routing_policies import record

MODEL = "tiny-llama"
WORKER = "http://w1"
COMPLETION = b'{"choices": [{"index": 0, "text": "It is Paris."}]}'


@dataclass
class FakeRegistry:
    """``known`` is what the registry's table holds; ``snapshot`` only shows it after a refresh."""

    known: dict[str, AdapterRecord] = field(default_factory=dict)
    refreshes: int = 0
    _snapshot: Mapping[str, AdapterRecord] = field(default_factory=lambda: MappingProxyType({}))

    def snapshot(self) -> Mapping[str, AdapterRecord]:
        return self._snapshot

    async def refresh(self) -> None:
        self.refreshes += 1
        self._snapshot = MappingProxyType(dict(self.known))

    def get(self, name: str) -> AdapterRecord:
        return self._snapshot[name]

    @property
    def store(self) -> FakeRegistry:
        return self  # the files are where the records say (a local store)

    async def materialize(self, sha256: str) -> Path:
        return next(r.path for r in self.known.values() if r.sha256 == sha256)


class FakeRelay:
    """Yields ``chunks``; ``broken`` makes the end a 502 (as the real relay reports a broken stream)."""

    def __init__(self, chunks: list[bytes], *, broken: bool = False) -> None:
        self.chunks = chunks
        self.broken = broken
        self.finished = False
        self.closes = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.chunks:
                yield chunk
            self.finished = True
        finally:
            await self.aclose()

    async def aclose(self) -> StreamEnd:
        self.closes += 1
        status = 502 if self.broken and self.finished else 200 if self.finished else CLIENT_CLOSED
        return StreamEnd(status, 0.01)


@dataclass
class FakeDispatcher:
    """Answers every job with ``reply`` (or raises ``error``); counts client jobs in a real gauge."""

    reply: Dispatched | None = None
    error: BaseException | None = None
    jobs: list[Job] = field(default_factory=list)
    in_flight: InFlight = field(default_factory=InFlight)

    async def dispatch(self, job: Job) -> Dispatched:
        self.jobs.append(job)
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


def whole(content: bytes = COMPLETION) -> Dispatched:
    return Dispatched(Attempt(WORKER, 0.002), "application/json", content=content, upstream_s=0.01)


def streamed(relay: FakeRelay) -> Dispatched:
    return Dispatched(Attempt(WORKER, 0.002), "text/event-stream", stream=relay)  # type: ignore[arg-type]


def failed(error: LoragateError) -> DispatchFailed:
    return DispatchFailed(error, Attempt(WORKER, 0.002))


@dataclass
class FakeOutcomes:
    records: list[OutcomeRecord] = field(default_factory=list)

    def add(self, record: OutcomeRecord) -> None:
        self.records.append(record)


@dataclass
class Stages:
    """A service over fakes, with every event it emitted."""

    service: CompletionService
    dispatcher: FakeDispatcher
    registry: FakeRegistry
    outcomes: FakeOutcomes
    metrics: GatewayMetrics
    events: list[CompletionEvent]


def build(dispatcher: FakeDispatcher, adapters: tuple[str, ...] = ("alpha",), *, router: Router | None = None,
          gate: RoutingGate | None = None) -> Stages:
    registry = FakeRegistry({n: record(n) for n in adapters})
    registry._snapshot = MappingProxyType(dict(registry.known))
    router = router or Router(PolicySpec("base"))
    metrics, outcomes = GatewayMetrics(), FakeOutcomes()
    recorder = OutcomeRecorder(metrics, outcomes)  # type: ignore[arg-type]
    events: list[CompletionEvent] = []
    recorder.subscribe(events.append)
    service = CompletionService(
        model=MODEL, registry=registry, router=router, recorder=recorder,  # type: ignore[arg-type]
        calls=CallParser(MODEL, registry, router.resolve),  # type: ignore[arg-type]
        resolver=Resolver(registry, None, default_method="cat", max_rank=64),  # type: ignore[arg-type]
        dispatcher=dispatcher, gate=gate)  # type: ignore[arg-type]
    return Stages(service, dispatcher, registry, outcomes, metrics, events)


def request(body: dict[str, Any] | None = None, *, policy: str | None = None, expected: str | None = None,
            shadow: str | None = None, route: str = "completions") -> CompletionRequest:
    return CompletionRequest(route=route, body=body if body is not None else {"model": MODEL, "prompt": "capital?"},
                             request_id="r1", policy_header=policy, received_at=time.perf_counter(),
                             expected=expected, shadow_header=shadow)
