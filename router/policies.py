"""Routing policies: a name -> class registry behind one async interface.

Each policy declares the parameters it accepts, so unknown parameters are rejected with a message
listing the valid ones, and an unknown policy name lists the registered policies. Policies read
a :class:`RoutingQuery` and return a :class:`RoutingDecision`; they never touch HTTP objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from loragate.errors import InvalidRequest, NotFound
from loragate.router.types import AdapterWeight, PolicySpec, RoutingDecision, RoutingQuery


class Policy(ABC):
    """One routing strategy. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()

    def check_params(self, spec: PolicySpec) -> None:
        unknown = sorted(set(spec.params) - self.params)
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise InvalidRequest(f"policy {self.name!r} does not take {unknown}; its parameters: {allowed}",
                                 param="X-Adapter-Policy", code="invalid_policy")

    @abstractmethod
    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        """Choose the adapters for one request."""


class BasePolicy(Policy):
    """No adapter: the base model answers."""

    name = "base"

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        return RoutingDecision(policy_asked=query.policy.text(), policy_applied=self.name)


class PinPolicy(Policy):
    """Exactly the named adapter."""

    name = "pin"
    params = frozenset({"adapter"})

    async def decide(self, query: RoutingQuery) -> RoutingDecision:
        adapter = query.policy.params.get("adapter")
        if not isinstance(adapter, str) or not adapter:
            raise InvalidRequest('pin needs an adapter: pin;adapter="name"', param="X-Adapter-Policy",
                                 code="invalid_policy")
        if adapter not in query.adapters:
            raise NotFound(f"adapter {adapter!r} is not registered", param="adapter", code="adapter_not_found")
        return RoutingDecision(policy_asked=query.policy.text(), policy_applied=self.name,
                               adapters=(AdapterWeight(adapter, 1.0),))


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (BasePolicy, PinPolicy)}
AUTO = "auto"


def policy_names() -> list[str]:
    return sorted([*POLICIES, AUTO])
