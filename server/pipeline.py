"""The completion request path, one straight line:

    parse -> policy spec -> router decision -> servable adapter -> worker lease (+load) -> proxy

Each step hands the next an immutable value. Handlers in ``routes/`` only translate HTTP to a
:class:`CompletionRequest` and a :class:`ProxiedResponse` back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
from http_sfv.item import Item
from http_sfv.list import List as SfList

from loragate.adapters.merge_cache import MergeCache
from loragate.adapters.registry import AdapterRegistry
from loragate.errors import (
    InvalidRequest,
    LoragateError,
    NotFound,
    UpstreamError,
    UpstreamTimeout,
    WorkerRejected,
)
from loragate.router.grammar import parse_policy
from loragate.router.service import Router
from loragate.router.types import PolicySpec, RoutingDecision
from loragate.server.metrics import GatewayMetrics
from loragate.workers.client import error_message
from loragate.workers.pool import WorkerPool

POLICY_HEADER = "x-adapter-policy"
POLICY_FIELD = "adapter_policy"
ROUTE_PATHS = {"completions": "/v1/completions", "chat.completions": "/v1/chat/completions"}


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A parsed client request: route, JSON body, request id and the policy header (if any)."""

    route: str
    body: Mapping[str, Any]
    request_id: str
    policy_header: str | None
    received_at: float


@dataclass(frozen=True, slots=True)
class ProxiedResponse:
    """What goes back to the client: a full body, or a stream of raw SSE bytes."""

    status: int
    headers: Mapping[str, str]
    media_type: str
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
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


def adapters_header(decision: RoutingDecision) -> str | None:
    """``X-Adapters`` as an RFC 8941 list: ``"name";w=1.0``.

    None for the base model: RFC 8941 says an empty list is sent as no header at all.
    """
    if decision.is_base:
        return None
    items = SfList()
    for aw in decision.adapters:
        item = Item(aw.name)
        item.params["w"] = round(aw.weight, 3)
        items.append(item)
    return str(items)


@dataclass(frozen=True, slots=True)
class Servable:
    """The adapter a worker loads for a decision: its vLLM name and path (a merge has a method)."""

    name: str
    path: str
    method: str | None = None


def decision_headers(request: CompletionRequest, decision: RoutingDecision, adapter: Servable | None
                     ) -> dict[str, str]:
    """The X-* headers that make a decision visible to the client."""
    headers = {"x-request-id": request.request_id, "x-adapter-policy-applied": decision.policy_applied}
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
        headers["x-adapter-merge"] = f'"{adapter.name}";method={adapter.method}'
    if decision.fallback:
        headers["x-route-fallback"] = "?1"
    return headers


class CompletionService:
    """Runs completions end to end; built once at startup with every collaborator it needs."""

    def __init__(self, *, model: str, registry: AdapterRegistry, router: Router, pool: WorkerPool,
                 http: httpx.AsyncClient, metrics: GatewayMetrics, merges: MergeCache, max_rank: int) -> None:
        self.model = model
        self.registry = registry
        self.router = router
        self.pool = pool
        self.http = http
        self.metrics = metrics
        self.merges = merges
        self.max_rank = max_rank

    async def policy_for(self, request: CompletionRequest) -> PolicySpec:
        """Header > body ``adapter_policy`` > ``model`` naming an adapter (pin) > the default (auto)."""
        model = request.body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model", code="missing_model")
        if model != self.model and model not in self.registry.snapshot():
            await self.registry.refresh()  # another gateway process may have registered it
            if model not in self.registry.snapshot():
                raise NotFound(f"the model {model!r} does not exist; GET /v1/models lists base and adapters",
                               param="model", code="model_not_found")
        if request.policy_header is not None:
            return parse_policy(request.policy_header, source="header")
        field = request.body.get(POLICY_FIELD)
        if field is not None:
            if not isinstance(field, str):
                raise InvalidRequest(f"{POLICY_FIELD} must be a string in X-Adapter-Policy syntax",
                                     param=POLICY_FIELD, code="invalid_policy")
            return parse_policy(field, source="body")
        if model != self.model:
            return PolicySpec("pin", {"adapter": model}, source="model")
        return PolicySpec("auto", source="default")

    async def servable(self, decision: RoutingDecision) -> Servable | None:
        """What the worker loads: a registered adapter, or a cached merge built on demand."""
        if decision.is_base:
            return None
        records = [self.registry.get(a.name) for a in decision.adapters]
        if len(records) == 1:
            return Servable(records[0].name, str(records[0].path))
        merged = await self.merges.get_or_build(records, [a.weight for a in decision.adapters],
                                                decision.method or self.router.config.method, self.max_rank)
        self.metrics.merged(merged.method, merged.built, merged.seconds)
        return Servable(merged.name, str(merged.path), merged.method)

    async def complete(self, request: CompletionRequest) -> ProxiedResponse:
        decision: RoutingDecision | None = None
        try:
            spec = await self.policy_for(request)
            route_started = time.perf_counter()
            decision = await self.router.decide(prompt_text(request.route, request.body), spec,
                                                self.registry.snapshot())
            self.metrics.decided(decision, time.perf_counter() - route_started)
            adapter = await self.servable(decision)
            body = {k: v for k, v in request.body.items() if k != POLICY_FIELD}
            body["model"] = adapter.name if adapter else self.model
            stream = bool(body.get("stream"))
            return await self._proxy(request, decision, adapter, body, stream, decision_headers(request, decision,
                                                                                               adapter))
        except LoragateError as exc:
            policy = decision.policy_applied if decision else "rejected"
            self._record(request.route, policy, request.received_at, exc.status, None, 0.0)
            raise

    async def _proxy(self, request: CompletionRequest, decision: RoutingDecision, adapter: Servable | None,
                     body: dict[str, Any], stream: bool, headers: dict[str, str]) -> ProxiedResponse:
        stack = AsyncExitStack()
        try:
            load_started = time.perf_counter()
            worker = await stack.enter_async_context(
                self.pool.lease(adapter.name if adapter else None, adapter.path if adapter else None))
            load_s = time.perf_counter() - load_started
            upstream_started = time.perf_counter()
            upstream = self.http.build_request(
                "POST", worker.url + ROUTE_PATHS[request.route], json=body,
                headers={"x-request-id": request.request_id})
            try:
                response = await self.http.send(upstream, stream=True)
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(f"worker {worker.url} timed out") from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(f"worker {worker.url} unreachable: {exc!r}") from exc
            stack.push_async_callback(response.aclose)
            if response.status_code >= 400:
                await response.aread()
                status = response.status_code if response.status_code < 500 else 502
                raise WorkerRejected(f"worker error: {error_message(response)}", status=status)
            media_type = response.headers.get("content-type", "application/json")
            if not stream:
                content = await response.aread()
                await stack.aclose()
                self._record(request.route, decision.policy_applied, request.received_at, 200,
                             time.perf_counter() - upstream_started, load_s)
                return ProxiedResponse(200, headers, media_type, content=content)
            return ProxiedResponse(200, headers, media_type,
                                   stream=self._relay(request, decision, response, stack, upstream_started, load_s))
        except BaseException:
            await stack.aclose()
            raise

    async def _relay(self, request: CompletionRequest, decision: RoutingDecision, response: httpx.Response,
                     stack: AsyncExitStack, upstream_started: float, load_s: float) -> AsyncIterator[bytes]:
        """Pass SSE bytes through as they arrive; a stream that breaks ends with an SSE error event."""
        status = 200
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            status = 502
            error = UpstreamError(f"worker stream broke: {exc!r}")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await stack.aclose()
            self._record(request.route, decision.policy_applied, request.received_at, status,
                         time.perf_counter() - upstream_started, load_s)

    def _record(self, route: str, policy: str, received_at: float, status: int, upstream_s: float | None,
                load_s: float) -> None:
        overhead = time.perf_counter() - received_at - (upstream_s or 0.0) - load_s
        self.metrics.request_done(route, policy, status, upstream_s, overhead)
