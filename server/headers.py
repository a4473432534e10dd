"""The X-* response headers that make a routing decision visible to the client (RFC 8941 lists)."""

from __future__ import annotations

from http_sfv.item import Item
from http_sfv.list import List as SfList
from http_sfv.types import Token

from loragate.adapters.resolve import Servable
from loragate.router.types import RoutingDecision
from loragate.server.calls import CompletionCall


def adapters_header(decision: RoutingDecision) -> str | None:
    """``X-Adapters`` as an RFC 8941 list: ``"name";w=1.0``, or for a chain the adapter of each step in
    order, ``"spouses";step=1, "birthplaces";step=2`` (the base model by its name).

    None for the base model: RFC 8941 says an empty list is sent as no header at all.
    """
    if decision.is_base:
        return None
    items = SfList()
    for step, aw in enumerate(decision.adapters, start=1):
        item = Item(aw.name)
        if decision.chain is not None:
            item.params["step"] = step
        else:
            item.params["w"] = round(aw.weight, 3)
        items.append(item)
    return str(items)


def merge_header(adapter: Servable) -> str:
    """``X-Adapter-Merge`` as an RFC 8941 item: the merge's name, its method and every parameter it was keyed by,
    ``"merge-1a2b";method=ties;density=0.5;majority=total``."""
    item = Item(adapter.name)
    item.params["method"] = Token(str(adapter.method))
    for key, value in adapter.params.items():
        item.params[key] = Token(value) if isinstance(value, str) else value
    return str(item)


def decision_headers(call: CompletionCall, decision: RoutingDecision, adapter: Servable | None) -> dict[str, str]:
    """The X-* headers that make a decision visible to the client."""
    headers = {"x-request-id": call.request_id, "x-outcome-id": call.outcome_id,
               "x-adapter-policy-applied": decision.policy_applied}
    if (adapters := adapters_header(decision)) is not None:
        headers["x-adapters"] = adapters
    if decision.candidates:
        scores = SfList()
        for name, score in decision.candidates:
            item = Item(name)
            item.params["s"] = round(score, 3)
            scores.append(item)
        headers["x-route-scores"] = str(scores)
    if decision.compositional is not None:
        headers["x-compositional"] = "?1" if decision.compositional else "?0"
    if adapter is not None and adapter.method is not None:
        headers["x-adapter-merge"] = merge_header(adapter)
    if decision.fallback:
        headers["x-route-fallback"] = "?1"
    if decision.auto is not None:
        choice = Item(decision.auto.arm)
        choice.params["context"] = decision.auto.context
        choice.params["reason"] = Token(decision.auto.reason)
        headers["x-auto-choice"] = str(choice)
    return headers
