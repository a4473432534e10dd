"""Parse: a client's completion request becomes one typed, immutable :class:`CompletionCall`.

Everything the rest of the path reads about a request is decided here, once: which policy it asks
for (header > body ``adapter_policy`` > ``model`` naming an adapter > the default), the shadow
policy, the text routing looks at, the body the worker gets. Every way a request can be unusable
is a 4xx raised here, before anything is routed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from loragate.adapters.registry import AdapterRegistry
from loragate.errors import InvalidRequest, NotFound
from loragate.router.grammar import parse_policy
from loragate.router.types import AutoChoice, PolicySpec

POLICY_HEADER = "x-adapter-policy"
SHADOW_HEADER = "x-adapter-policy-shadow"
EXPECTED_HEADER = "x-expected-answer"
POLICY_FIELD = "adapter_policy"
SHADOW_DROPS = (POLICY_FIELD, "stream", "stream_options")  # a shadow runs unstreamed, off the client's path

MAX_JSON_DEPTH = 64
"""How deeply a client's JSON may nest. OpenAI bodies need a handful of levels (a tool's JSON schema a
few dozen); far deeper input made ``json`` raise RecursionError (a 500), and a body just under
Python's recursion limit parsed but then failed when it was serialised again for the worker."""


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN/Infinity; JSON does not


def _nesting_exceeds(value: object, limit: int) -> bool:
    """True when ``value`` has containers nested more than ``limit`` deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(raw: bytes | str, what: str = "request body", param: str | None = None) -> Any:
    """Client JSON, strictly: every way it can be unusable is a 400 naming ``what``, never a 500."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise InvalidRequest(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", param=param,
                             code="invalid_json") from exc
    except ValueError as exc:  # bad syntax, bad UTF-8, NaN/Infinity, an integer too long to convert
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", param=param, code="invalid_json") from exc
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets > MAX_JSON_DEPTH and _nesting_exceeds(value, MAX_JSON_DEPTH):  # the count skips the walk
        raise InvalidRequest(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", param=param,
                             code="invalid_json")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body


def prompt_text(route: str, body: Mapping[str, Any]) -> str:
    """The text routing looks at: the prompt, or the chat messages' text content."""
    if route == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        parts = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if isinstance(prompt, list) and prompt:  # token ids: nothing to embed, routing sees no text
        return ""
    raise InvalidRequest("prompt must be a string, a list of strings or token ids", param="prompt")


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A client request as the route received it: route, JSON body, ids and the X-* headers (if any).

    ``request_id`` is the client's correlation id (X-Request-Id; a client may send one twice);
    ``outcome_id`` keys the request's outcome record and is unique per request, so a reused
    request id never replaces or confuses a record (it equals ``request_id`` when the gateway
    generated that).
    """

    route: str
    body: Mapping[str, Any]
    request_id: str
    policy_header: str | None
    received_at: float
    expected: str | None = None  # X-Expected-Answer: graded here, never forwarded upstream
    shadow_header: str | None = None  # X-Adapter-Policy-Shadow
    outcome_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A parsed, valid request: what to route (``prompt`` under ``policy``) and what to send (``body``)."""

    route: str
    body: Mapping[str, Any]  # the client's body without adapter_policy (dispatch sets ``model``)
    prompt: str
    policy: PolicySpec
    request_id: str
    outcome_id: str
    received_at: float
    expected: str | None = None
    shadow: PolicySpec | None = None  # the policy to run the same call under, off the client's path
    kind: str = "primary"  # primary | shadow
    shadow_of: str | None = None  # a shadow's primary outcome id
    auto: AutoChoice | None = None  # a shadow exploring an arm of the learned auto: its context and arm

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def shadow_call(call: CompletionCall, policy: PolicySpec, auto: AutoChoice | None = None) -> CompletionCall:
    """The same call under ``policy``, unstreamed, as its own request paired with the primary one."""
    return replace(call, body={k: v for k, v in call.body.items() if k not in SHADOW_DROPS}, policy=policy,
                   request_id=f"{call.request_id}-shadow", outcome_id=uuid.uuid4().hex,
                   received_at=time.perf_counter(), shadow=None, kind="shadow", shadow_of=call.outcome_id, auto=auto)


class CallParser:
    """Built once at startup: knows the base model, the registry, and how to validate a policy."""

    MAX_UNKNOWN = 1024  # names remembered as unknown; the oldest are forgotten first

    def __init__(self, model: str, registry: AdapterRegistry, check_policy: Callable[[PolicySpec], object], *,
                 unknown_ttl_s: float = 1.0) -> None:
        self.model = model
        self.registry = registry
        self.check_policy = check_policy  # the router's resolve: a policy this gateway cannot run is a 400
        self.unknown_ttl_s = unknown_ttl_s
        self._unknown: dict[str, float] = {}  # model name -> when its "unknown" verdict expires (monotonic)

    async def parse(self, request: CompletionRequest) -> CompletionCall:
        shadow = None
        if request.shadow_header is not None:  # a bad shadow policy is the client's mistake too
            shadow = parse_policy(request.shadow_header, source="shadow")
            self.check_policy(shadow)
        policy = await self._policy(request)
        body = {k: v for k, v in request.body.items() if k != POLICY_FIELD}
        return CompletionCall(route=request.route, body=body, prompt=prompt_text(request.route, request.body),
                              policy=policy, request_id=request.request_id, outcome_id=request.outcome_id,
                              received_at=request.received_at, expected=request.expected, shadow=shadow)

    async def _policy(self, request: CompletionRequest) -> PolicySpec:
        """Header > body ``adapter_policy`` > ``model`` naming an adapter (pin) > the default (auto)."""
        model = request.body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model", code="missing_model")
        if model != self.model and not await self._known(model):
            raise NotFound(f"the model {model!r} does not exist; GET /v1/models lists base and adapters",
                           param="model", code="model_not_found")
        if request.policy_header is not None:
            return parse_policy(request.policy_header, source="header")
        value = request.body.get(POLICY_FIELD)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidRequest(f"{POLICY_FIELD} must be a string in X-Adapter-Policy syntax",
                                     param=POLICY_FIELD, code="invalid_policy")
            return parse_policy(value, source="body")
        if model != self.model:
            return PolicySpec("pin", {"adapter": model}, source="model")
        return PolicySpec("auto", source="default")

    async def _known(self, name: str) -> bool:
        """Whether ``name`` is a registered adapter, re-reading the registry at most once per name and TTL.

        Another gateway process may have registered it a moment ago, so an unknown name re-reads
        the registry; a name found unknown stays so for ``unknown_ttl_s`` (the registry poll
        interval: the follower picks up registrations that fast anyway), so that a client repeating
        a wrong name does not make every request reload the registry from SQLite.
        """
        if name in self.registry.snapshot():
            return True
        now = time.monotonic()
        if self._unknown.get(name, 0.0) > now:
            return False
        await self.registry.refresh()
        if name in self.registry.snapshot():
            self._unknown.pop(name, None)
            return True
        self._unknown.pop(name, None)
        self._unknown[name] = now + self.unknown_ttl_s
        while len(self._unknown) > self.MAX_UNKNOWN:
            del self._unknown[next(iter(self._unknown))]
        return False
