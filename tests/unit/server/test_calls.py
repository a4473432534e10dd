"""Parsing a request into a CompletionCall: policy precedence, shadows, and the unknown-model cache."""

from __future__ import annotations

import pytest

from loragate.errors import InvalidRequest, NotFound
from loragate.router.service import Router
from loragate.router.types import PolicySpec
from loragate.server.calls import CallParser, CompletionCall, shadow_call
from tests.unit.router.test_routing_policies import record
from tests.unit.server.fakes import MODEL, FakeRegistry, request


def parser(registry: FakeRegistry, ttl: float = 60.0) -> CallParser:
    return CallParser(MODEL, registry, Router(PolicySpec("base")).resolve, unknown_ttl_s=ttl)  # type: ignore[arg-type]


async def test_policy_precedence_header_body_model_default() -> None:
    registry = FakeRegistry({"alpha": record("alpha")})
    calls = parser(registry)
    by_header = await calls.parse(request({"model": "alpha", "prompt": "p", "adapter_policy": "base"}, policy="base"))
    assert (by_header.policy.name, by_header.policy.source) == ("base", "header")
    by_body = await calls.parse(request({"model": "alpha", "prompt": "p", "adapter_policy": "base"}))
    assert (by_body.policy.name, by_body.policy.source) == ("base", "body") and "adapter_policy" not in by_body.body
    by_model = await calls.parse(request({"model": "alpha", "prompt": "p"}))
    assert by_model.policy == PolicySpec("pin", {"adapter": "alpha"}, source="model")
    default = await calls.parse(request({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                                        route="chat.completions"))
    assert default.policy.name == "auto" and default.prompt == "hi" and not default.stream


async def test_a_shadow_policy_is_checked_with_the_request() -> None:
    calls = parser(FakeRegistry())
    call = await calls.parse(request(shadow="base"))
    assert call.shadow == PolicySpec("base", source="shadow")
    with pytest.raises(InvalidRequest, match="supported"):
        await calls.parse(request(shadow="magic"))


async def test_an_unknown_model_reloads_the_registry_once_per_ttl() -> None:
    registry = FakeRegistry()
    calls = parser(registry)
    for _ in range(5):
        with pytest.raises(NotFound):
            await calls.parse(request({"model": "ghost", "prompt": "p"}))
    assert registry.refreshes == 1
    with pytest.raises(NotFound):
        await calls.parse(request({"model": "other", "prompt": "p"}))
    assert registry.refreshes == 2  # another name is looked up on its own


async def test_an_adapter_registered_elsewhere_is_found_once_the_verdict_expires() -> None:
    registry = FakeRegistry()
    calls = parser(registry, ttl=0.0)
    with pytest.raises(NotFound):
        await calls.parse(request({"model": "late", "prompt": "p"}))
    registry.known["late"] = record("late")  # another gateway process registered it
    call = await calls.parse(request({"model": "late", "prompt": "p"}))
    assert call.policy.name == "pin" and registry.refreshes == 2


async def test_the_unknown_cache_is_bounded() -> None:
    calls = parser(FakeRegistry())
    for i in range(CallParser.MAX_UNKNOWN + 10):
        with pytest.raises(NotFound):
            await calls.parse(request({"model": f"ghost-{i}", "prompt": "p"}))
    assert len(calls._unknown) == CallParser.MAX_UNKNOWN


def test_a_shadow_call_is_unstreamed_and_paired() -> None:
    call = CompletionCall(route="completions", body={"model": MODEL, "prompt": "p", "stream": True,
                                                     "stream_options": {"include_usage": True}},
                          prompt="p", policy=PolicySpec("pin", {"adapter": "a"}), request_id="r1", outcome_id="o1",
                          received_at=0.0, expected="x", shadow=PolicySpec("base"))
    shadow = shadow_call(call, PolicySpec("base", source="shadow"))
    assert shadow.body == {"model": MODEL, "prompt": "p"} and not shadow.stream
    assert (shadow.kind, shadow.shadow_of, shadow.request_id, shadow.shadow) == ("shadow", "o1", "r1-shadow", None)
    assert shadow.outcome_id != call.outcome_id and shadow.expected == "x"
