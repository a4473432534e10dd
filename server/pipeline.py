"""The completion request path, one straight line of stages, each in the package that owns it:

    parse (server/calls) -> decide (router; a routed call holds a slot of server/gate meanwhile)
    -> execute (server/executors, per decision):
      single: resolve (adapters) -> dispatch (workers) -> stream back with X-* headers
      chain:  per step, resolve + dispatch every candidate, keep the best (server/chain)
    -> one frozen completion event (server/recorder)

Each stage hands the next an immutable value and none reaches back. :meth:`CompletionService.run`
is the one entry point for a parsed call (a client's, or a shadow the scheduler submits); its
completion event is recorded exactly once however the request ends, and the recorder passes it on
to its subscribers. Handlers in ``routes/`` only translate HTTP to a :class:`CompletionRequest`
and a :class:`ProxiedResponse` back.
"""

from __future__ import annotations

from loragate.adapters.registry import AdapterRegistry
from loragate.adapters.resolve import Resolver, Servable
from loragate.router.service import Router
from loragate.router.types import RoutingDecision, StepChoice
from loragate.server.calls import CallParser, CompletionCall, CompletionRequest
from loragate.server.chain import ChainExecutor
from loragate.server.executors import Dispatches, Executors, ProxiedResponse, SingleShot
from loragate.server.gate import RoutingGate
from loragate.server.recorder import NO_ATTEMPT, CompletionEvent, OutcomeRecorder, status_of
from loragate.workers.dispatch import Attempt

__all__ = ["CompletionService", "ProxiedResponse"]


class CompletionService:
    """The stages composed; built once at startup with each of them."""

    def __init__(self, *, model: str, registry: AdapterRegistry, calls: CallParser, router: Router,
                 resolver: Resolver, dispatcher: Dispatches, recorder: OutcomeRecorder,
                 gate: RoutingGate | None = None) -> None:
        self.model = model
        self.registry = registry
        self.calls = calls
        self.router = router
        self.resolver = resolver
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.gate = gate or RoutingGate(0)
        self.executors = Executors({"single": SingleShot(model, resolver, dispatcher),
                                    "chain": ChainExecutor(model, resolver, dispatcher, router)})

    async def complete(self, request: CompletionRequest) -> ProxiedResponse:
        """A client's request: parsed into a call (a refusal is recorded too), then run."""
        try:
            call = await self.calls.parse(request)
        except BaseException as exc:
            self.recorder.record(CompletionEvent(request.route, request.received_at, status_of(exc)))
            raise
        return await self.run(call)

    async def run(self, call: CompletionCall) -> ProxiedResponse:
        """One call end to end: decided (a routed call waits for a slot of the gate to do so), then the
        decision's executor answers (whole or as a stream)."""
        try:
            async with self.gate.admit(self.router.searches(call.policy)):
                decision = await self.router.decide(call.prompt, call.policy, self.registry.snapshot())
            executor = self.executors(decision)
        except BaseException as exc:
            self._ended(call, None, None, NO_ATTEMPT, status_of(exc))
            raise

        def ended(decision: RoutingDecision | None, servable: Servable | None, attempt: Attempt, status: int,
                  upstream_s: float | None = None, output: str | None = None,
                  steps: tuple[StepChoice, ...] = ()) -> None:
            self._ended(call, decision, servable, attempt, status, upstream_s, output, steps)

        return await executor.execute(call, decision, ended)

    def _ended(self, call: CompletionCall, decision: RoutingDecision | None, servable: Servable | None,
               attempt: Attempt, status: int, upstream_s: float | None = None, output: str | None = None,
               steps: tuple[StepChoice, ...] = ()) -> None:
        self.recorder.record(CompletionEvent(call.route, call.received_at, status, call, decision, servable, attempt,
                                             upstream_s, output, steps=steps))
