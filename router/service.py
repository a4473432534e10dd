"""The router service: resolves ``auto``, looks the policy up and asks it to decide."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from loragate.adapters.types import AdapterRecord
from loragate.errors import InvalidRequest
from loragate.router.policies import AUTO, POLICIES, Policy, policy_names
from loragate.router.types import PolicySpec, RoutingDecision, RoutingQuery


class Router:
    """Built once at startup; holds one instance of every registered policy."""

    def __init__(self, default_policy: PolicySpec) -> None:
        self._policies: dict[str, Policy] = {name: cls() for name, cls in POLICIES.items()}
        if default_policy.name == AUTO:
            raise ValueError("the default policy cannot itself be 'auto'")
        self.default_policy = default_policy
        self.resolve(default_policy)  # fail at startup, not on the first request

    def resolve(self, spec: PolicySpec) -> tuple[Policy, PolicySpec]:
        """The policy object and effective spec for a request (``auto`` becomes the default)."""
        if spec.name == AUTO:
            spec = self.default_policy
        policy = self._policies.get(spec.name)
        if policy is None:
            raise InvalidRequest(f"unsupported adapter policy {spec.name!r}; supported: {', '.join(policy_names())}",
                                 param="X-Adapter-Policy", code="unsupported_policy")
        policy.check_params(spec)
        return policy, spec

    async def decide(self, prompt: str, spec: PolicySpec, adapters: Mapping[str, AdapterRecord]) -> RoutingDecision:
        policy, effective = self.resolve(spec)
        decision = await policy.decide(RoutingQuery(prompt=prompt, policy=effective, adapters=adapters))
        # keep what the client asked for ("auto"), not what it resolved to, in the record
        return decision if effective is spec else replace(decision, policy_asked=spec.text())
