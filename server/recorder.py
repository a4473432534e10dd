"""The end of the request path: one frozen :class:`CompletionEvent` per request, however it ends.

The service emits exactly one event per request — refused while parsing, failed on the way, answered
whole, streamed to the end, broken mid-stream, or closed by the client (also a stream never
iterated) — and the :class:`OutcomeRecorder` turns it into metrics and an outcome record (graded
when an expected answer came with the request), then hands it to its subscribers (shadows). A
subscriber reads events; it never reaches back into the stage that emitted them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from loragate.adapters.resolve import Servable
from loragate.errors import LoragateError
from loragate.grading import contains_answer
from loragate.router.types import RoutingDecision, StepChoice
from loragate.server.calls import CompletionCall
from loragate.server.metrics import GatewayMetrics
from loragate.server.outcomes import OutcomeLog, OutcomeRecord
from loragate.wire import choice_text
from loragate.workers.dispatch import CLIENT_CLOSED, Attempt, StreamEnd

log = logging.getLogger("loragate")
NO_ATTEMPT = Attempt()  # no worker leased


def status_of(exc: BaseException) -> int:
    """The status a request ended with when ``exc`` ended it (a cancelled request: the client left)."""
    if isinstance(exc, LoragateError):
        return exc.status
    return CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError) else 500


@dataclass(frozen=True, slots=True)
class CompletionEvent:
    """One request's end: what was decided and served, where, how long each stage took, and the status.

    ``call`` is None for a request refused while parsing, ``decision`` for one refused before a
    decision; ``output`` is the generated text, kept only when an expected answer is to be graded.
    A chain's ``decision`` is the one it ran (its ``adapters`` are the adapter chosen per step).
    """

    route: str
    received_at: float
    status: int
    call: CompletionCall | None = None
    decision: RoutingDecision | None = None
    servable: Servable | None = None
    attempt: Attempt = NO_ATTEMPT
    upstream_s: float | None = None
    output: str | None = None
    ended_at: float = field(default_factory=time.perf_counter)
    steps: tuple[StepChoice, ...] = ()  # a chain's steps as decided (decision.adapters: the winners in order)

    @property
    def kind(self) -> str:
        return self.call.kind if self.call is not None else "primary"


Subscriber = Callable[[CompletionEvent], None]


class OutcomeRecorder:
    """Metrics and the outcome log from completion events; then every subscriber gets the event."""

    def __init__(self, metrics: GatewayMetrics, outcomes: OutcomeLog) -> None:
        self.metrics = metrics
        self.outcomes = outcomes
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def record(self, event: CompletionEvent) -> None:
        decision, servable = event.decision, event.servable
        merge_s = servable.merge_s if servable is not None else 0.0
        if event.kind == "primary":
            overhead = (event.ended_at - event.received_at - (event.upstream_s or 0.0) - event.attempt.load_s
                        - merge_s)
            self.metrics.request_done(event.route, decision.policy_applied if decision else "rejected", event.status,
                                      event.upstream_s, overhead)
        if decision is not None:
            self.metrics.decided(decision, decision.decide_s)
            if decision.auto is not None and event.kind == "primary":
                self.metrics.auto_chose(decision.auto)
            if decision.chain is not None:
                self.metrics.chain_ran(decision.chain, event.steps, completed=event.status == 200)
        if servable is not None and servable.method is not None:
            self.metrics.merged(servable.method, servable.built, servable.build_s)
        if event.call is not None and decision is not None:
            self._log(event, event.call, decision, merge_s)
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # a subscriber's bug must not break the response it watched
                log.exception("completion event subscriber failed")

    def _log(self, event: CompletionEvent, call: CompletionCall, decision: RoutingDecision, merge_s: float) -> None:
        """The outcome record, graded when an expected answer came with the request."""
        graded = call.expected is not None and event.output is not None and event.status == 200
        success = graded and contains_answer(event.output or "", call.expected or "")
        auto = decision.auto or call.auto
        self.outcomes.add(OutcomeRecord(
            outcome_id=call.outcome_id, request_id=call.request_id, ts=time.time(), kind=call.kind,
            shadow_of=call.shadow_of, route=call.route, policy_asked=decision.policy_asked,
            policy_applied=decision.policy_applied, candidates=tuple((n, round(s, 4)) for n, s in decision.candidates),
            adapters=tuple((a.name, a.weight) for a in decision.adapters), method=decision.method,
            compositional=decision.compositional, fallback=decision.fallback, worker=event.attempt.worker,
            embed_ms=decision.embed_s * 1e3, search_ms=decision.search_s * 1e3, merge_ms=merge_s * 1e3,
            load_ms=event.attempt.load_s * 1e3,
            upstream_ms=None if event.upstream_s is None else event.upstream_s * 1e3,
            total_ms=(event.ended_at - event.received_at) * 1e3, status=event.status, expected=call.expected,
            result=("success" if success else "failure") if graded else "unknown",
            score=float(success) if graded else None, graded_by="expected" if graded else None,
            steps=event.steps if decision.chain is not None else None,
            auto_context=auto.context if auto is not None else None, auto_arm=auto.arm if auto is not None else None))
        if graded:
            self.metrics.outcome(decision.policy_applied, decision.compositional, "success" if success else "failure",
                                 call.kind)


def completion_text(route: str, body: bytes) -> str:
    """The generated text of a non-streamed response (for grading)."""
    try:
        choices = json.loads(body).get("choices") or []
    except (ValueError, AttributeError, RecursionError):
        return ""
    return "".join(choice_text(c, route == "chat.completions") for c in choices[:1])


class SSEText:
    """Collects the generated text from SSE bytes as they pass (only when an answer is to be graded)."""

    def __init__(self, route: str) -> None:
        self.route = route
        self._buffer = b""
        self.parts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                try:
                    choices = json.loads(line[6:]).get("choices") or []
                except (ValueError, AttributeError, RecursionError):
                    continue
                self.parts.extend(choice_text(c, self.route == "chat.completions") for c in choices[:1])

    def text(self) -> str:
        return "".join(self.parts)


class Streamed(Protocol):
    """A stream of SSE bytes to pass on, iterated once; ``aclose`` (at any point) says how it ended: a
    worker's :class:`~loragate.workers.dispatch.Relay`, or a chain's stream of decided steps."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> StreamEnd: ...


class RecordedStream:
    """A relay as the client gets it: chunks pass on (their text collected to grade), and closing it —
    at its end, or by the response's owner at any point, never iterated included — ends the request
    once: ``ended`` gets how the relay ended and the collected text."""

    def __init__(self, relay: Streamed, route: str, grade: bool,
                 ended: Callable[[StreamEnd, str | None], None]) -> None:
        self._relay = relay
        self._collector = SSEText(route) if grade else None
        self._ended: Callable[[StreamEnd, str | None], None] | None = ended

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._relay:
                if self._collector is not None:
                    self._collector.feed(chunk)
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        end = await self._relay.aclose()
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(end, self._collector.text() if self._collector is not None else None)
