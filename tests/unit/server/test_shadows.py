"""The shadow scheduler as a completion-event subscriber, against a fake entry point and a real gauge."""

from __future__ import annotations

import asyncio
import random

from loragate.errors import UpstreamError
from loragate.router.types import PolicySpec
from loragate.server.calls import CompletionCall
from loragate.server.metrics import GatewayMetrics
from loragate.server.recorder import CompletionEvent
from loragate.server.shadows import ShadowConfig, ShadowScheduler
from loragate.workers.dispatch import InFlight
from tests.unit.server.fakes import MODEL

FAST = dict(max_wait_s=2.0, idle_s=0.01)


def primary(shadow: PolicySpec | None = None, kind: str = "primary") -> CompletionCall:
    return CompletionCall(route="completions", body={"model": MODEL, "prompt": "p"}, prompt="p",
                          policy=PolicySpec("base"), request_id="r1", outcome_id="o1", received_at=0.0,
                          shadow=shadow, kind=kind)


def event(call: CompletionCall | None, status: int = 200) -> CompletionEvent:
    return CompletionEvent("completions", 0.0, status, call)


class Submitted:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[CompletionCall] = []
        self.error = error

    async def __call__(self, call: CompletionCall) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error


def runs(metrics: GatewayMetrics, result: str) -> float:
    return float(metrics.shadow_runs.labels(result)._value.get())


async def test_a_shadow_asked_by_the_request_is_submitted_once_idle() -> None:
    submit, metrics, gauge = Submitted(), GatewayMetrics(), InFlight()
    shadows = ShadowScheduler(ShadowConfig(**FAST), submit, gauge, metrics)  # type: ignore[arg-type]
    with gauge:  # a client request is on a worker: the shadow waits
        shadows.on_event(event(primary(PolicySpec("pin", {"adapter": "a"}, source="shadow"))))
        await asyncio.sleep(0.05)
        assert submit.calls == [] and shadows.pending == 1
    await shadows.close()
    (call,) = submit.calls
    assert (call.kind, call.shadow_of, call.policy.name) == ("shadow", "o1", "pin")
    assert shadows.pending == 0 and runs(metrics, "done") == 1


async def test_only_successful_primaries_get_shadows() -> None:
    submit = Submitted()
    shadows = ShadowScheduler(ShadowConfig("base", rate=1.0, **FAST), submit, InFlight(), GatewayMetrics())  # type: ignore[arg-type]
    shadows.on_event(event(primary(), status=502))
    shadows.on_event(event(None, status=400))
    shadows.on_event(event(primary(kind="shadow")))  # a shadow's own event
    assert shadows.pending == 0
    shadows.on_event(event(primary()))  # sampled at rate 1 for the configured policy
    await shadows.close()
    assert [c.policy for c in submit.calls] == [PolicySpec("base", source="shadow")]


async def test_sampling_and_the_pending_bound() -> None:
    metrics = GatewayMetrics()
    shadows = ShadowScheduler(ShadowConfig("base", rate=0.5, max_pending=2, **FAST), Submitted(), InFlight(),  # type: ignore[arg-type]
                              metrics, rng=random.Random(0))
    for _ in range(40):
        shadows.on_event(event(primary()))
    assert shadows.pending == 2 and runs(metrics, "dropped") > 0
    await shadows.close()


async def test_a_shadow_with_no_idle_moment_expires_and_one_that_fails_is_counted() -> None:
    metrics, gauge = GatewayMetrics(), InFlight()
    shadows = ShadowScheduler(ShadowConfig(max_wait_s=0.1, idle_s=0.01), Submitted(), gauge, metrics)  # type: ignore[arg-type]
    with gauge:
        shadows.on_event(event(primary(PolicySpec("base"))))
        await asyncio.sleep(0.3)
    assert runs(metrics, "expired") == 1 and shadows.pending == 0
    failing = ShadowScheduler(ShadowConfig(**FAST), Submitted(UpstreamError("down")), gauge, metrics)  # type: ignore[arg-type]
    failing.on_event(event(primary(PolicySpec("base"))))
    await failing.close()
    assert runs(metrics, "error") == 1
