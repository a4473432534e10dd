"""The load generator: closed-loop (N concurrent clients) or open-loop (Poisson arrivals) over HTTP.

Why both modes: a closed loop measures the best a server sustains (each client waits for its
answer, so it never overloads), an open loop measures what users see when requests arrive on
their own schedule, queueing included. Open-loop latency is measured from the *scheduled* arrival
so a slow server cannot hide its queue (coordinated omission).

It talks to ``/v1/completions`` or, with ``route="chat"``, ``/v1/chat/completions`` (the prompt as
one user message) with one pooled ``aiohttp.ClientSession`` (a third of httpx's CPU per request, so
the generator is not what saturates first on a shared machine); with ``stream`` it reads the SSE
events as they arrive and records time to first token and the gaps between tokens.
It refuses non-loopback targets unless told otherwise, and caps request counts and durations, so
a typo cannot turn it against someone else's server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from loragate.grading import is_correct
from loragate.loadtest.stats import RequestRecord
from loragate.loadtest.workloads import WorkItem
from loragate.wire import choice_text

POLICY_HEADER = "X-Adapter-Policy"
EXPECTED_HEADER = "X-Expected-Answer"
REQUEST_ID_HEADER = "X-Request-Id"
_ID_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,100}")
MAX_REQUESTS = 100_000
"""Most requests one run may send unless the caller lifts the cap."""
MAX_DURATION_S = 3_600.0
"""Longest run unless the caller lifts the cap."""
MAX_RATE = 10_000.0
MAX_CONCURRENCY = 4_096
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
"""The OpenAI routes a load can target."""


class LoadSpecError(ValueError):
    """A load-test request that is refused before anything is sent."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send, how fast, and for how long (``requests`` and/or ``duration_s``; the first reached ends)."""

    url: str
    model: str = "tiny-llama"
    route: Literal["completions", "chat"] = "completions"
    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 1
    rate: float | None = None
    requests: int | None = None
    duration_s: float | None = None
    stream: bool = False
    max_tokens: int = 16
    temperature: float = 0.0
    policy: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 60.0
    seed: int = 0
    warmup: int = 0
    allow_remote: bool = False
    unbounded: bool = False
    extra_body: tuple[tuple[str, object], ...] = field(default_factory=tuple)
    request_id_prefix: str | None = None  # X-Request-Id = "{prefix}-{index}": find a run's records in the outcome log

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + ROUTES[self.route]

    def body(self, item: WorkItem) -> dict[str, object]:
        """The request body for one work item: a prompt, or the prompt as one user message for chat."""
        text: dict[str, object] = ({"messages": [{"role": "user", "content": item.prompt}]} if self.route == "chat"
                                   else {"prompt": item.prompt})
        return {"model": item.model or self.model, **text, "max_tokens": self.max_tokens,
                "temperature": self.temperature, **dict(self.extra_body)}


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is a loopback address (``localhost`` counts; names are not resolved)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(spec: LoadSpec) -> LoadSpec:
    """Refuse unsafe or meaningless specs; a spec with neither limit gets 100 requests."""
    parts = urlsplit(spec.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadSpecError(f"{spec.url!r} is not an http(s) URL")
    if spec.route not in ROUTES:
        raise LoadSpecError(f"unknown route {spec.route!r}; valid: {', '.join(ROUTES)}")
    if not spec.allow_remote and not is_loopback(spec.url):
        raise LoadSpecError(f"{parts.hostname} is not a loopback address; pass --allow-remote to load a remote "
                            "server (only one you are allowed to load)")
    if spec.mode == "open" and (spec.rate is None or not 0 < spec.rate <= MAX_RATE):
        raise LoadSpecError(f"open-loop mode needs --rate within (0, {MAX_RATE:g}] requests/s")
    if spec.mode == "closed" and not 1 <= spec.concurrency <= MAX_CONCURRENCY:
        raise LoadSpecError(f"--concurrency must be within [1, {MAX_CONCURRENCY}]")
    if spec.requests is not None and spec.requests < 1:
        raise LoadSpecError("--requests must be >= 1")
    if spec.duration_s is not None and spec.duration_s <= 0:
        raise LoadSpecError("--duration must be > 0")
    if spec.request_id_prefix is not None and not _ID_PREFIX.fullmatch(spec.request_id_prefix):
        raise LoadSpecError("--request-id-prefix must be 1-100 of A-Z a-z 0-9 . _ : - (what gateways accept as an id)")
    if spec.warmup < 0 or spec.max_tokens < 1:
        raise LoadSpecError("--warmup must be >= 0 and --max-tokens >= 1")
    if not spec.unbounded:
        if spec.requests is not None and spec.requests > MAX_REQUESTS:
            raise LoadSpecError(f"--requests {spec.requests} is above the cap of {MAX_REQUESTS}; pass --unbounded")
        if spec.duration_s is not None and spec.duration_s > MAX_DURATION_S:
            raise LoadSpecError(f"--duration {spec.duration_s:g}s is above the cap of {MAX_DURATION_S:g}s; "
                                "pass --unbounded")
    if spec.requests is None and spec.duration_s is None:
        return replace(spec, requests=100)
    return spec


def poisson_arrivals(rate: float, *, count: int | None = None, duration_s: float | None = None,
                     seed: int = 0) -> list[float]:
    """Arrival times (seconds from start) of a Poisson process: exponential gaps with mean ``1/rate``.

    Ends after ``count`` arrivals or at ``duration_s``, whichever comes first (one is required).
    Seeded, so two runs (e.g. direct vs through the gateway) see the same schedule.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if count is None and duration_s is None:
        raise ValueError("poisson_arrivals needs count or duration_s")
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    while count is None or len(arrivals) < count:
        t += rng.expovariate(rate)
        if duration_s is not None and t >= duration_s:
            break
        arrivals.append(t)
    return arrivals


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The records of one run and its wall time (warm-up requests excluded)."""

    spec: LoadSpec
    records: tuple[RequestRecord, ...]
    elapsed_s: float


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


async def _one(client: aiohttp.ClientSession, spec: LoadSpec, item: WorkItem, index: int, scheduled: float,
               t0: float) -> RequestRecord:
    """Send one request; ``scheduled`` is its intended start (perf_counter), latency counts from there."""
    policy = item.policy or spec.policy
    headers = {POLICY_HEADER: policy} if policy else {}
    if len(item.expected) == 1:  # the gateway grades it into its outcome log (and never forwards it)
        headers[EXPECTED_HEADER] = item.expected[0]
    if spec.request_id_prefix is not None and index >= 0:  # warmups (index -1) keep fresh ids
        headers[REQUEST_ID_HEADER] = f"{spec.request_id_prefix}-{index}"
    body = spec.body(item)
    start = scheduled - t0
    status: int | None = None
    if spec.stream:
        body["stream"] = True
        # the usage chunk counts tokens: a server that falls behind merges several tokens into one event
        body.setdefault("stream_options", {"include_usage": True})
    try:
        async with client.post(spec.endpoint, json=body, headers=headers) as response:
            status = response.status
            if status >= 400:
                await response.read()
                return _failed(index, start, time.perf_counter() - scheduled, status, f"http_{status}", policy, item)
            if spec.stream:
                text, ttft, gaps, tokens = await _read_stream(response, scheduled, spec.route == "chat")
            else:
                payload = await response.json(content_type=None)
                text = choice_text(payload["choices"][0], spec.route == "chat")
                tokens = int((payload.get("usage") or {}).get("completion_tokens") or 0)
                ttft, gaps = None, ()
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
        return _failed(index, start, time.perf_counter() - scheduled, status, _error_name(exc), policy, item)
    latency = time.perf_counter() - scheduled
    return RequestRecord(index=index, start=start, latency=latency, ok=True, status=status, ttft=ttft,
                         inter_token=gaps, tokens=tokens, policy=policy, correct=is_correct(text, item.expected))


def _failed(index: int, start: float, latency: float, status: int | None, error: str, policy: str | None,
            item: WorkItem) -> RequestRecord:
    return RequestRecord(index=index, start=start, latency=latency, ok=False, status=status, error=error,
                         policy=policy, correct=False if item.expected else None)


async def _read_stream(response: aiohttp.ClientResponse, scheduled: float, chat: bool
                       ) -> tuple[str, float | None, tuple[float, ...], int]:
    """Read SSE ``data:`` events: the text, time to first token, gaps between text events, and tokens.

    Tokens are the final usage chunk's ``completion_tokens`` when the server sends one (requested with
    ``stream_options.include_usage``), else the number of text events. vLLM merges the tokens a slow
    reader has not taken yet into one event, so counting events would report a server that bursts as
    a slow one.
    """
    parts: list[str] = []
    ttft: float | None = None
    last = 0.0
    gaps: list[float] = []
    usage_tokens: int | None = None
    async for raw in response.content:  # one line per iteration
        line = raw.decode().rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise ValueError(f"stream error: {event['error']}")
        if event.get("usage"):
            usage_tokens = int(event["usage"].get("completion_tokens") or 0)
        choices = event.get("choices") or []
        piece = choice_text(choices[0], chat) if choices else ""
        if not piece:
            continue
        now = time.perf_counter()
        if ttft is None:
            ttft = now - scheduled
        else:
            gaps.append(now - last)
        last = now
        parts.append(piece)
    return "".join(parts), ttft, tuple(gaps), len(parts) if usage_tokens is None else usage_tokens


def _client(spec: LoadSpec, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=spec.timeout_s, sock_connect=10.0),
                                 connector=aiohttp.TCPConnector(limit=connections), headers=dict(spec.headers))


async def run_load(spec: LoadSpec, workload: Sequence[WorkItem],
                   progress: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Run ``spec`` over ``workload`` (cycled in order) and return every measured request's record.

    ``warmup`` requests go first, one by one (connections, caches, adapter loads) and are not
    recorded. ``progress`` is called after each recorded request (the CLI's tqdm bar).
    """
    spec = validate(spec)
    if not workload:
        raise LoadSpecError("the workload is empty")
    connections = spec.concurrency if spec.mode == "closed" else max(64, min(1024, math.ceil((spec.rate or 1) * 4)))
    async with _client(spec, connections) as client:
        for i in range(spec.warmup):
            now = time.perf_counter()
            await _one(client, spec, workload[i % len(workload)], -1, now, now)
        runner = _closed if spec.mode == "closed" else _open
        t0 = time.perf_counter()
        records = await runner(client, spec, workload, t0, progress)
        elapsed = time.perf_counter() - t0
    return LoadResult(spec, tuple(sorted(records, key=lambda r: r.index)), elapsed)


async def _closed(client: aiohttp.ClientSession, spec: LoadSpec, workload: Sequence[WorkItem], t0: float,
                  progress: Callable[[RequestRecord], None] | None) -> list[RequestRecord]:
    deadline = t0 + spec.duration_s if spec.duration_s is not None else math.inf
    limit = spec.requests if spec.requests is not None else math.inf
    records: list[RequestRecord] = []
    counter = 0

    async def client_loop() -> None:
        nonlocal counter
        while counter < limit and time.perf_counter() < deadline:
            index = counter
            counter += 1
            record = await _one(client, spec, workload[index % len(workload)], index, time.perf_counter(), t0)
            records.append(record)
            if progress is not None:
                progress(record)

    await asyncio.gather(*(client_loop() for _ in range(spec.concurrency)))
    return records


async def _open(client: aiohttp.ClientSession, spec: LoadSpec, workload: Sequence[WorkItem], t0: float,
                progress: Callable[[RequestRecord], None] | None) -> list[RequestRecord]:
    assert spec.rate is not None
    arrivals = poisson_arrivals(spec.rate, count=spec.requests, duration_s=spec.duration_s, seed=spec.seed)
    records: list[RequestRecord] = []

    async def fire(index: int, scheduled: float) -> None:
        record = await _one(client, spec, workload[index % len(workload)], index, scheduled, t0)
        records.append(record)
        if progress is not None:
            progress(record)

    tasks = []
    for index, offset in enumerate(arrivals):
        scheduled = t0 + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(index, scheduled)))
    await asyncio.gather(*tasks)
    return records


def planned_requests(spec: LoadSpec) -> int | None:
    """How many requests the run will send, if known up front (for the progress bar's total)."""
    if spec.requests is not None:
        return spec.requests
    if spec.mode == "open" and spec.rate is not None and spec.duration_s is not None:
        return round(spec.rate * spec.duration_s)
    return None
