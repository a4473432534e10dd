"""Execute: how a routing decision is run, chosen per decision from a small name -> executor registry.

``single`` is the request path as it always was — resolve the decision to one servable (an adapter
or a cached merge) and dispatch it once, answering whole or as a stream. ``chain`` (server/chain.py)
is a decode loop around resolve + dispatch that chooses an adapter again at every step. The
pipeline asks :class:`Executors` for the decision's executor (:attr:`RoutingDecision.executor`)
instead of branching on policies; an executor ends the request exactly once through the
:class:`Ended` callback it is given, however it ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from loragate.adapters.resolve import Resolver, Servable
from loragate.errors import LoragateError
from loragate.router.types import RoutingDecision, StepChoice
from loragate.server.calls import CompletionCall
from loragate.server.headers import decision_headers
from loragate.server.recorder import NO_ATTEMPT, RecordedStream, completion_text, status_of
from loragate.workers.dispatch import Attempt, Dispatched, DispatchFailed, Job, StreamEnd


@dataclass(frozen=True, slots=True)
class ProxiedResponse:
    """What goes back to the client: a full body, or a stream its owner must close (it ends the request)."""

    status: int
    headers: Mapping[str, str]
    media_type: str
    content: bytes = b""
    stream: RecordedStream | None = None


class Ended(Protocol):
    """Ends one request: the completion event is built from these and recorded (call it once)."""

    def __call__(self, decision: RoutingDecision | None, servable: Servable | None, attempt: Attempt, status: int,
                 upstream_s: float | None = None, output: str | None = None,
                 steps: tuple[StepChoice, ...] = ()) -> None: ...


class Dispatches(Protocol):
    async def dispatch(self, job: Job) -> Dispatched: ...


class Executor(Protocol):
    async def execute(self, call: CompletionCall, decision: RoutingDecision, ended: Ended) -> ProxiedResponse:
        """Run ``decision`` for ``call`` and answer; ``ended`` is called exactly once, also when this raises."""


def worker_job(call: CompletionCall, model: str, servable: Servable | None, body: Mapping[str, Any] | None = None,
               *, stream: bool | None = None, grouped: bool = False) -> Job:
    """The worker's body names what to run: the adapter (or merge) to apply, else the base model.

    ``grouped``: the call's jobs prefer one worker (their affinity key is the call's outcome id,
    unique per request, shadows included), as a chain's generations do.
    """
    body = {**(call.body if body is None else body), "model": servable.name if servable else model}
    return Job(call.route, body, call.request_id, servable.name if servable else None,
               servable.path if servable else None, stream=call.stream if stream is None else stream,
               counted=call.kind == "primary", affinity=call.outcome_id if grouped else None)


class SingleShot:
    """One servable, one dispatch: the answer as the worker gives it (whole or streamed)."""

    def __init__(self, model: str, resolver: Resolver, dispatcher: Dispatches) -> None:
        self.model = model
        self.resolver = resolver
        self.dispatcher = dispatcher

    async def execute(self, call: CompletionCall, decision: RoutingDecision, ended: Ended) -> ProxiedResponse:
        servable: Servable | None = None
        try:
            servable = await self.resolver.resolve(decision)
            reply = await self.dispatcher.dispatch(worker_job(call, self.model, servable))
        except DispatchFailed as failed:
            ended(decision, servable, failed.attempt, failed.error.status)
            raise failed.error from failed.error.__cause__
        except BaseException as exc:
            ended(decision, servable, NO_ATTEMPT, status_of(exc))
            raise
        headers = decision_headers(call, decision, servable)
        if reply.stream is None:
            output = completion_text(call.route, reply.content) if call.expected is not None else None
            ended(decision, servable, reply.attempt, 200, reply.upstream_s, output)
            return ProxiedResponse(200, headers, reply.media_type, content=reply.content)

        def stream_ended(end: StreamEnd, output: str | None) -> None:
            ended(decision, servable, reply.attempt, end.status, end.upstream_s, output)

        stream = RecordedStream(reply.stream, call.route, call.expected is not None, stream_ended)
        return ProxiedResponse(200, headers, reply.media_type, stream=stream)


class Executors:
    """The executors by name; a decision names the one that runs it."""

    def __init__(self, executors: Mapping[str, Executor]) -> None:
        self._executors = dict(executors)

    def __call__(self, decision: RoutingDecision) -> Executor:
        executor = self._executors.get(decision.executor)
        if executor is None:  # a policy naming an executor this service was not built with: our bug
            raise LoragateError(f"no executor {decision.executor!r}; this gateway has {', '.join(self._executors)}")
        return executor
