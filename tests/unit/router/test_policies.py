"""Policies and the router service, on registry snapshots built by hand."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest, NotFound
from loragate.router.grammar import parse_policy
from loragate.router.service import Router
from loragate.router.types import AdapterWeight, PolicySpec


def record(name: str) -> AdapterRecord:
    return AdapterRecord(name=name, base_model="tiny-llama", rank=8, alpha=16, target_modules=("q_proj",),
                         use_rslora=False, sha256="0" * 64, path=Path("/x"), size_bytes=1, created_at=0.0)


ADAPTERS = MappingProxyType({"spouses": record("spouses")})


async def test_pin_picks_the_adapter() -> None:
    decision = await Router(PolicySpec("base")).decide("q", parse_policy('pin;adapter="spouses"', source="header"),
                                                       ADAPTERS)
    assert decision.adapters == (AdapterWeight("spouses", 1.0),)
    assert decision.policy_applied == "pin"


async def test_base_and_auto_resolve_to_default() -> None:
    router = Router(PolicySpec("pin", MappingProxyType({"adapter": "spouses"})))
    auto = await router.decide("q", PolicySpec("auto"), ADAPTERS)
    assert auto.policy_applied == "pin" and auto.policy_asked == "auto"
    base = await router.decide("q", PolicySpec("base"), ADAPTERS)
    assert base.is_base and base.policy_applied == "base"


async def test_pin_unknown_adapter_is_404() -> None:
    with pytest.raises(NotFound, match="'nope' is not registered"):
        await Router(PolicySpec("base")).decide("q", parse_policy('pin;adapter="nope"', source="h"), ADAPTERS)


async def test_pin_without_adapter_is_400() -> None:
    with pytest.raises(InvalidRequest, match='pin;adapter="name"'):
        await Router(PolicySpec("base")).decide("q", PolicySpec("pin"), ADAPTERS)


async def test_unknown_policies_list_what_is_supported() -> None:
    with pytest.raises(InvalidRequest, match="supported: auto, average, base, chain, pin, select"):
        await Router(PolicySpec("base")).decide("q", parse_policy("magic", source="h"), ADAPTERS)


@pytest.mark.parametrize("text", ["select;min_score=0.3", "average;k=2"])
async def test_searching_policies_need_an_embedder(text: str) -> None:
    with pytest.raises(InvalidRequest, match="needs semantic routing"):
        await Router(PolicySpec("base")).decide("q", parse_policy(text, source="h"), ADAPTERS)


async def test_unknown_parameter_is_400_listing_valid_ones() -> None:
    with pytest.raises(InvalidRequest, match=r"does not take \['k'\]; its parameters: adapter"):
        await Router(PolicySpec("base")).decide("q", parse_policy('pin;adapter="spouses";k=1', source="h"), ADAPTERS)


def test_default_policy_is_checked_at_startup() -> None:
    with pytest.raises(InvalidRequest):
        Router(PolicySpec("select"))
    with pytest.raises(ValueError, match="cannot itself be 'auto'"):
        Router(PolicySpec("auto"))
