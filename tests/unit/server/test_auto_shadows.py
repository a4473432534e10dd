"""Shadows that explore the learned auto's arms: the scheduler with the real learner's ``exploration``, against
the fake entry point and the real gauge of test_shadows."""

from __future__ import annotations

import dataclasses
import random

from loragate.router.auto import AutoConfig
from loragate.router.types import AutoChoice, PolicySpec, RoutingDecision
from loragate.server.auto import AutoLearner
from loragate.server.metrics import GatewayMetrics
from loragate.server.recorder import CompletionEvent
from loragate.server.shadows import ShadowConfig, ShadowScheduler
from loragate.workers.dispatch import InFlight
from tests.unit.server.test_shadows import FAST, Submitted, primary

ARMS = ("base", "select", "chain")
SERVED = AutoChoice("a/single", "base", "default", ARMS)


class Counted:
    """The learner's ``exploration``, counting the events it was asked about."""

    def __init__(self, learner: AutoLearner) -> None:
        self.learner = learner
        self.asked = 0

    def __call__(self, event: CompletionEvent) -> tuple[PolicySpec, AutoChoice] | None:
        self.asked += 1
        return self.learner.exploration(event)


def graded_auto_event(shadow: PolicySpec | None = None) -> CompletionEvent:
    call = dataclasses.replace(primary(shadow), policy=PolicySpec("auto"), expected="Paris")
    return CompletionEvent("completions", 0.0, 200, call, RoutingDecision("auto", "base", auto=SERVED))


def scheduler(explore: Counted, config: ShadowConfig | None = None) -> tuple[ShadowScheduler, Submitted]:
    submit = Submitted()
    shadows = ShadowScheduler(config or ShadowConfig(**FAST), submit, InFlight(), GatewayMetrics(),  # type: ignore[arg-type]
                              explore=explore)
    return shadows, submit


async def test_an_exploring_shadow_runs_the_explored_arm_and_carries_its_choice() -> None:
    learner = AutoLearner(AutoConfig(arms=tuple(PolicySpec(a) for a in ARMS)), rng=random.Random(5))
    explore = Counted(learner)
    shadows, submit = scheduler(explore)
    shadows.on_event(graded_auto_event())
    await shadows.close()
    (call,) = submit.calls
    assert call.kind == "shadow" and call.shadow_of == "o1" and explore.asked == 1
    assert call.auto is not None and (call.auto.context, call.auto.reason) == ("a/single", "explore")
    assert call.auto.arm != "base" and call.policy.text() == call.auto.arm


async def test_a_shadow_the_client_or_the_operator_asked_for_takes_precedence() -> None:
    learner = AutoLearner(AutoConfig(arms=tuple(PolicySpec(a) for a in ARMS)), rng=random.Random(5))
    explore = Counted(learner)
    shadows, submit = scheduler(explore)
    asked = PolicySpec("pin", {"adapter": "a"}, source="shadow")
    shadows.on_event(graded_auto_event(shadow=asked))  # X-Adapter-Policy-Shadow
    await shadows.close()
    (call,) = submit.calls
    assert call.policy == asked and call.auto is None and explore.asked == 0

    configured, submit = scheduler(explore, ShadowConfig("base", rate=1.0, **FAST))  # type: ignore[arg-type]
    configured.on_event(graded_auto_event())
    await configured.close()
    (call,) = submit.calls
    assert call.policy == PolicySpec("base", source="shadow") and call.auto is None and explore.asked == 0
