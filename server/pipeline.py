"""The completion request path, one straight line:

    parse -> policy spec -> router decision -> servable adapter -> worker lease (+load) -> proxy

Each step hands the next an immutable value. Handlers in ``routes/`` only translate HTTP to a
:class:`CompletionRequest` and a :class:`ProxiedResponse` back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from http_sfv.item import Item
from http_sfv.list import List as SfList

from loragate.adapters.merge_cache import MergeCache
from loragate.adapters.registry import AdapterRegistry
from loragate.errors import (
    InvalidRequest,
    LoragateError,
    NotFound,
    NoWorkerAvailable,
    UpstreamError,
    UpstreamTimeout,
    WorkerRejected,
)
from loragate.router.grammar import parse_policy
from loragate.router.service import Router
from loragate.router.types import PolicySpec, RoutingDecision
from loragate.server.metrics import GatewayMetrics
from loragate.server.outcomes import OutcomeLog, OutcomeRecord, contains_answer
from loragate.wire import choice_text
from loragate.workers.client import body_message
from loragate.workers.pool import WorkerPool

POLICY_HEADER = "x-adapter-policy"
SHADOW_HEADER = "x-adapter-policy-shadow"
EXPECTED_HEADER = "x-expected-answer"
POLICY_FIELD = "adapter_policy"
ROUTE_PATHS = {"completions": "/v1/completions", "chat.completions": "/v1/chat/completions"}


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A parsed client request: route, JSON body, request id and the policy header (if any).

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
class ProxiedResponse:
    """What goes back to the client: a full body, or a stream of raw SSE bytes."""

    status: int
    headers: Mapping[str, str]
    media_type: str
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None


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
    headers = {"x-request-id": request.request_id, "x-outcome-id": request.outcome_id,
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
        headers["x-adapter-merge"] = f'"{adapter.name}";method={adapter.method}'
    if decision.fallback:
        headers["x-route-fallback"] = "?1"
    return headers


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """Shadow runs: a configured policy sampled at ``rate`` (the header asks per request), bounded."""

    policy: str | None = None
    rate: float = 0.0
    max_concurrency: int = 4  # shadows running at once
    max_pending: int = 256  # shadows waiting for an idle moment; beyond this they are dropped
    max_wait_s: float = 30.0  # a shadow that finds no idle moment in this time expires (never competes)
    idle_s: float = 0.02  # an idle moment: no client request started or in flight for this long


@dataclass(slots=True)
class Trace:
    """One request's timings and result as it moves along the path.

    Mutable but private to one request; :meth:`CompletionService._finish` freezes it into an
    :class:`OutcomeRecord` when the response is complete.
    """

    request: CompletionRequest
    kind: str = "primary"
    shadow_of: str | None = None
    decision: RoutingDecision | None = None
    merge_s: float = 0.0
    load_s: float = 0.0
    upstream_s: float | None = None
    worker: str | None = None


def completion_text(route: str, body: bytes) -> str:
    """The generated text of a non-streamed response (for grading)."""
    try:
        choices = json.loads(body).get("choices") or []
    except (ValueError, AttributeError, RecursionError):
        return ""
    return "".join(choice_text(c, route == "chat.completions") for c in choices[:1])


class SSEText:
    """Collects the generated text from SSE bytes as they pass (only when an answer is to be graded)."""

    def __init__(self, route: str) -> None:
        self.route = route
        self._buffer = b""
        self.parts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                try:
                    choices = json.loads(line[6:]).get("choices") or []
                except (ValueError, AttributeError, RecursionError):
                    continue
                self.parts.extend(choice_text(c, self.route == "chat.completions") for c in choices[:1])

    def text(self) -> str:
        return "".join(self.parts)


class _RetryElsewhere(Exception):
    """An attempt failed before any response byte; ``url`` (if known) is excluded from the next one."""

    def __init__(self, url: str | None, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.url = url
        self.error = error


async def _read(response: aiohttp.ClientResponse) -> bytes:
    """A worker's whole body; a connection that breaks mid-body is the worker's failure (502)."""
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(f"worker response broke off: {exc!r}") from exc


class CompletionService:
    """Runs completions end to end; built once at startup with every collaborator it needs."""

    def __init__(self, *, model: str, registry: AdapterRegistry, router: Router, pool: WorkerPool,
                 upstream: aiohttp.ClientSession, metrics: GatewayMetrics, merges: MergeCache, max_rank: int,
                 outcomes: OutcomeLog, shadow: ShadowConfig | None = None, upstream_attempts: int = 2) -> None:
        self.model = model
        self.upstream_attempts = upstream_attempts
        self.registry = registry
        self.router = router
        self.pool = pool
        self.upstream = upstream  # aiohttp: a third of httpx's CPU per proxied request (docs/BENCHMARKS.md)
        self.metrics = metrics
        self.merges = merges
        self.max_rank = max_rank
        self.outcomes = outcomes
        self.shadow = shadow or ShadowConfig()
        self._shadow_slots = asyncio.Semaphore(self.shadow.max_concurrency)
        self._active = 0  # client requests in flight (shadows run when this reaches 0)
        self._starts = 0  # client requests started so far
        self._pending = 0  # shadows scheduled and not finished
        self._idle = asyncio.Event()
        self._idle.set()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()

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

    async def _route(self, trace: Trace, spec: PolicySpec) -> tuple[RoutingDecision, Servable | None, dict[str, Any]]:
        """Decide, make the decision servable, and write the upstream body (``model`` = what to run)."""
        request = trace.request
        started = time.perf_counter()
        decision = await self.router.decide(prompt_text(request.route, request.body), spec, self.registry.snapshot())
        trace.decision = decision
        self.metrics.decided(decision, time.perf_counter() - started)
        started = time.perf_counter()
        adapter = await self.servable(decision)
        trace.merge_s = time.perf_counter() - started if adapter and adapter.method else 0.0
        body = {k: v for k, v in request.body.items() if k != POLICY_FIELD}
        body["model"] = adapter.name if adapter else self.model
        return decision, adapter, body

    async def complete(self, request: CompletionRequest) -> ProxiedResponse:
        trace = Trace(request)
        self._active += 1
        self._starts += 1
        self._idle.clear()
        streaming = False
        try:
            if request.shadow_header is not None:  # a bad shadow policy is the client's mistake too
                self.router.resolve(parse_policy(request.shadow_header, source="shadow"))
            decision, adapter, body = await self._route(trace, await self.policy_for(request))
            stream = bool(body.get("stream"))
            response = await self._proxy(trace, adapter, body, stream, decision_headers(request, decision, adapter))
            streaming = response.stream is not None  # the relay leaves when the stream ends
            return response
        except LoragateError as exc:
            self._finish(trace, exc.status, None)
            raise
        finally:
            if not streaming:
                self._leave()

    def _leave(self) -> None:
        """A client request is done; shadows wait for the moment none is in flight."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def _proxy(self, trace: Trace, adapter: Servable | None, body: dict[str, Any], stream: bool,
                     headers: dict[str, str]) -> ProxiedResponse:
        """Run one request, on another worker (bounded) when an attempt failed before any response byte.

        Only failures that prove the worker produced nothing for the client are retried: refused or
        reset connections, a connection closed without an answer, a load that could not reach its
        worker. A read timeout is not retried (the first worker may still be running it), nor is
        an error status (the worker answered).
        """
        excluded: set[str] = set()
        failed: _RetryElsewhere | None = None
        for attempt in range(1, self.upstream_attempts + 1):
            try:
                return await self._attempt(trace, adapter, body, stream, headers, excluded)
            except _RetryElsewhere as retry:
                failed = retry
                if retry.url is not None:
                    excluded.add(retry.url)
                if attempt == self.upstream_attempts:
                    raise retry.error from retry
            except NoWorkerAvailable:
                if failed is None:
                    raise
                raise failed.error from failed  # nowhere else to go: report the failure itself (502)
            self.metrics.request_retried(trace.request.route)
        raise AssertionError("upstream_attempts must be at least 1")

    async def _attempt(self, trace: Trace, adapter: Servable | None, body: dict[str, Any], stream: bool,
                       headers: dict[str, str], excluded: set[str]) -> ProxiedResponse:
        request = trace.request
        stack = AsyncExitStack()
        try:
            load_started = time.perf_counter()
            try:
                worker = await stack.enter_async_context(self.pool.lease(
                    adapter.name if adapter else None, adapter.path if adapter else None, exclude=excluded))
            except UpstreamError as exc:
                if isinstance(exc, NoWorkerAvailable | UpstreamTimeout):
                    raise
                raise _RetryElsewhere(None, exc) from exc  # the pool already took that worker out of rotation
            trace.load_s = time.perf_counter() - load_started
            trace.worker = worker.url
            upstream_started = time.perf_counter()
            try:
                response = await self.upstream.post(worker.url + ROUTE_PATHS[request.route], json=body,
                                                    headers={"x-request-id": request.request_id})
            except aiohttp.ConnectionTimeoutError as exc:  # nothing was sent: safe to run elsewhere
                raise self._unreachable(worker.url, exc) from exc
            except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
                raise UpstreamTimeout(f"worker {worker.url} timed out") from exc
            except aiohttp.ClientConnectionError as exc:  # refused, reset, or closed before any answer
                raise self._unreachable(worker.url, exc) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"worker {worker.url} failed: {exc!r}") from exc
            stack.callback(response.release)
            if response.status >= 400:
                message = body_message(await _read(response))
                if response.status == 404 and adapter is not None:  # unloaded behind the pool's back: reload
                    self.pool.lost(worker.url, adapter.name)
                    raise _RetryElsewhere(None, UpstreamError(f"worker error: {message}", code="adapter_vanished"))
                status = response.status if response.status < 500 else 502
                raise WorkerRejected(f"worker error: {message}", status=status)
            media_type = response.headers.get("content-type", "application/json")
            if not stream:
                content = await _read(response)
                await stack.aclose()
                trace.upstream_s = time.perf_counter() - upstream_started
                output = completion_text(request.route, content) if request.expected is not None else None
                self._finish(trace, 200, output)
                return ProxiedResponse(200, headers, media_type, content=content)
            return ProxiedResponse(200, headers, media_type,
                                   stream=self._relay(trace, response, stack, upstream_started))
        except BaseException:
            await stack.aclose()
            raise

    def _unreachable(self, url: str, exc: BaseException) -> _RetryElsewhere:
        """The worker produced nothing for this request: out of rotation, and the request may run elsewhere."""
        self.pool.report_failure(url, repr(exc))
        return _RetryElsewhere(url, UpstreamError(f"worker {url} unreachable: {exc!r}"))

    async def _relay(self, trace: Trace, response: aiohttp.ClientResponse, stack: AsyncExitStack,
                     upstream_started: float) -> AsyncIterator[bytes]:
        """Pass SSE bytes through as they arrive; a stream that breaks ends with an SSE error event."""
        status = 200
        collector = SSEText(trace.request.route) if trace.request.expected is not None else None
        try:
            async for chunk in response.content.iter_any():
                if collector is not None:
                    collector.feed(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = 502
            error = UpstreamError(f"worker stream broke: {exc!r}")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await stack.aclose()
            trace.upstream_s = time.perf_counter() - upstream_started
            self._finish(trace, status, collector.text() if collector else None)
            if trace.kind == "primary":
                self._leave()

    def _finish(self, trace: Trace, status: int, output: str | None) -> None:
        """Metrics, the outcome record (graded when an expected answer came with it), and shadows."""
        request, decision = trace.request, trace.decision
        total = time.perf_counter() - request.received_at
        overhead = total - (trace.upstream_s or 0.0) - trace.load_s - trace.merge_s
        if trace.kind == "primary":
            self.metrics.request_done(request.route, decision.policy_applied if decision else "rejected", status,
                                      trace.upstream_s, overhead)
        if decision is None:
            return  # refused before routing: nothing was decided
        graded = request.expected is not None and output is not None and status == 200
        success = graded and contains_answer(output or "", request.expected or "")
        self.outcomes.add(OutcomeRecord(
            outcome_id=request.outcome_id, request_id=request.request_id, ts=time.time(), kind=trace.kind,
            shadow_of=trace.shadow_of,
            route=request.route, policy_asked=decision.policy_asked, policy_applied=decision.policy_applied,
            candidates=tuple((n, round(s, 4)) for n, s in decision.candidates),
            adapters=tuple((a.name, a.weight) for a in decision.adapters), method=decision.method,
            compositional=decision.compositional, fallback=decision.fallback, worker=trace.worker,
            embed_ms=decision.embed_s * 1e3, search_ms=decision.search_s * 1e3, merge_ms=trace.merge_s * 1e3,
            load_ms=trace.load_s * 1e3, upstream_ms=None if trace.upstream_s is None else trace.upstream_s * 1e3,
            total_ms=total * 1e3, status=status, expected=request.expected,
            result=("success" if success else "failure") if graded else "unknown",
            score=float(success) if graded else None, graded_by="expected" if graded else None))
        if graded:
            self.metrics.outcome(decision.policy_applied, decision.compositional, "success" if success else "failure",
                                 trace.kind)
        if trace.kind == "primary" and status == 200:
            self._maybe_shadow(request)

    # -- shadow policies ---------------------------------------------------------------------------
    def _maybe_shadow(self, request: CompletionRequest) -> None:
        policy = request.shadow_header
        if policy is None and self.shadow.policy and self._random.random() < self.shadow.rate:
            policy = self.shadow.policy
        if policy is None:
            return
        if self._pending >= self.shadow.max_pending:
            self.metrics.shadow_run("dropped")  # never let shadow work pile up without bound
            return
        self._pending += 1
        task = asyncio.get_running_loop().create_task(self._shadow(request, policy))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, request: CompletionRequest, policy: str) -> None:
        """The same request under another policy, off the client's path, graded the same way.

        It runs only in a moment with no client request in flight, so that shadows use the gateway's
        and workers' idle time instead of competing with clients; one that finds no such moment
        within ``max_wait_s`` expires (counted) rather than run on a saturated gateway.
        """
        try:
            if not await self._quiet_moment():
                self.metrics.shadow_run("expired")
                return
            async with self._shadow_slots:
                body = {k: v for k, v in request.body.items() if k not in (POLICY_FIELD, "stream", "stream_options")}
                shadow = replace(request, body=body, request_id=f"{request.request_id}-shadow", policy_header=policy,
                                 shadow_header=None, received_at=time.perf_counter(), outcome_id=uuid.uuid4().hex)
                trace = Trace(shadow, kind="shadow", shadow_of=request.outcome_id)
                try:
                    _, adapter, upstream_body = await self._route(trace, parse_policy(policy, source="shadow"))
                    await self._proxy(trace, adapter, upstream_body, False, {})
                    self.metrics.shadow_run("done")
                except LoragateError as exc:
                    self._finish(trace, exc.status, None)
                    self.metrics.shadow_run("error")
        finally:
            self._pending -= 1

    @property
    def pending_shadows(self) -> int:
        """Shadows scheduled and not finished (waiting for an idle moment or running)."""
        return self._pending

    async def _quiet_moment(self) -> bool:
        """True once no client request has started for ``idle_s`` and none is in flight; False at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shadow.max_wait_s
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), left)
            seen = self._starts
            await asyncio.sleep(self.shadow.idle_s)
            if self._active == 0 and self._starts == seen:
                return True
        return False

    async def close(self) -> None:
        """Let scheduled shadows run (no clients are left, so they find their idle moment), bounded."""
        if self._shadow_tasks:
            await asyncio.wait(self._shadow_tasks, timeout=30)
        for task in self._shadow_tasks:
            task.cancel()
