"""The completion request path, one straight line of stages, each in the package that owns it:

    parse (server/calls) -> decide (router) -> resolve (adapters) -> dispatch (workers)
      -> stream back with X-* headers -> one frozen completion event (server/recorder)

Each stage hands the next an immutable value and none reaches back. :meth:`CompletionService.run`
is the one entry point for a parsed call (a client's, or a shadow the scheduler submits); its
completion event is recorded exactly once however the request ends, and the recorder passes it on
to its subscribers. Handlers in ``routes/`` only translate HTTP to a :class:`CompletionRequest`
and a :class:`ProxiedResponse` back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from loragate.adapters.registry import AdapterRegistry
from loragate.adapters.resolve import Resolver, Servable
from loragate.router.service import Router
from loragate.router.types import RoutingDecision
from loragate.server.calls import CallParser, CompletionCall, CompletionRequest
from loragate.server.headers import decision_headers
from loragate.server.recorder import (
    NO_ATTEMPT,
    CompletionEvent,
    OutcomeRecorder,
    RecordedStream,
    completion_text,
    status_of,
)
from loragate.workers.dispatch import Attempt, Dispatcher, DispatchFailed, Job, StreamEnd


@dataclass(frozen=True, slots=True)
class ProxiedResponse:
    """What goes back to the client: a full body, or a stream its owner must close (it ends the request)."""

    status: int
    headers: Mapping[str, str]
    media_type: str
    content: bytes = b""
    stream: RecordedStream | None = None


class CompletionService:
    """The stages composed; built once at startup with each of them."""

    def __init__(self, *, model: str, registry: AdapterRegistry, calls: CallParser, router: Router,
                 resolver: Resolver, dispatcher: Dispatcher, recorder: OutcomeRecorder) -> None:
        self.model = model
        self.registry = registry
        self.calls = calls
        self.router = router
        self.resolver = resolver
        self.dispatcher = dispatcher
        self.recorder = recorder

    async def complete(self, request: CompletionRequest) -> ProxiedResponse:
        """A client's request: parsed into a call (a refusal is recorded too), then run."""
        try:
            call = await self.calls.parse(request)
        except BaseException as exc:
            self.recorder.record(CompletionEvent(request.route, request.received_at, status_of(exc)))
            raise
        return await self.run(call)

    async def run(self, call: CompletionCall) -> ProxiedResponse:
        """One call end to end: decide, resolve, dispatch, and answer whole or as a stream."""
        decision: RoutingDecision | None = None
        servable: Servable | None = None
        try:
            decision = await self.router.decide(call.prompt, call.policy, self.registry.snapshot())
            servable = await self.resolver.resolve(decision)
            reply = await self.dispatcher.dispatch(self._job(call, servable))
        except DispatchFailed as failed:
            self._ended(call, decision, servable, failed.attempt, failed.error.status)
            raise failed.error from failed.error.__cause__
        except BaseException as exc:
            self._ended(call, decision, servable, NO_ATTEMPT, status_of(exc))
            raise
        headers = decision_headers(call, decision, servable)
        if reply.stream is None:
            output = completion_text(call.route, reply.content) if call.expected is not None else None
            self._ended(call, decision, servable, reply.attempt, 200, reply.upstream_s, output)
            return ProxiedResponse(200, headers, reply.media_type, content=reply.content)

        def stream_ended(end: StreamEnd, output: str | None) -> None:
            self._ended(call, decision, servable, reply.attempt, end.status, end.upstream_s, output)

        stream = RecordedStream(reply.stream, call.route, call.expected is not None, stream_ended)
        return ProxiedResponse(200, headers, reply.media_type, stream=stream)

    def _job(self, call: CompletionCall, servable: Servable | None) -> Job:
        """The worker's body names what to run: the adapter (or merge) to apply, else the base model."""
        body = {**call.body, "model": servable.name if servable else self.model}
        return Job(call.route, body, call.request_id, servable.name if servable else None,
                   servable.path if servable else None, stream=call.stream, counted=call.kind == "primary")

    def _ended(self, call: CompletionCall, decision: RoutingDecision | None, servable: Servable | None,
               attempt: Attempt, status: int, upstream_s: float | None = None, output: str | None = None) -> None:
        self.recorder.record(CompletionEvent(call.route, call.received_at, status, call, decision, servable, attempt,
                                             upstream_s, output))
