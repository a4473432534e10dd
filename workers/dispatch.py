"""Dispatch: run one completion on a worker — lease (and load), proxy, retry before the first byte.

The dispatcher is the request path's only user of the proxied-request client. It knows nothing of
policies or OpenAI bodies beyond the route's path: it gets a frozen :class:`Job` and hands back a
frozen :class:`Dispatched` (or raises :class:`DispatchFailed` carrying the error and where the
last attempt got). It also keeps the :class:`InFlight` gauge of client requests on workers, a context
manager held from the lease until the response is released, so that a stream that is closed
early, or never iterated at all, still leaves the count.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from loragate.errors import LoragateError, NoWorkerAvailable, UpstreamError, UpstreamTimeout, WorkerRejected
from loragate.workers.client import body_message
from loragate.workers.transport import TRANSPORT_EXCEPTIONS, failure_of, transport_error

ROUTE_PATHS = {"completions": "/v1/completions", "chat.completions": "/v1/chat/completions"}
CLIENT_CLOSED = 499  # the client closed the stream before the worker finished it (nginx's convention)


class Leased(Protocol):
    @property
    def url(self) -> str: ...


class Leases(Protocol):
    """What dispatch needs from the worker pool."""

    def lease(self, adapter: str | None, adapter_path: str | None, *, exclude: Collection[str] = (),
              affinity: str | None = None) -> AbstractAsyncContextManager[Leased]: ...

    def report_failure(self, url: str, reason: str = "request failed") -> None: ...

    def lost(self, url: str, adapter: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """One completion to run: the worker route, the upstream body, and the adapter to have loaded.

    ``affinity`` groups jobs that should share a worker (a chain's generations of one request): the
    scheduler prefers the worker the first of them went to, while it is fit (a score, never forced).
    """

    route: str
    body: Mapping[str, Any]
    request_id: str
    adapter: str | None = None
    adapter_path: str | None = None
    stream: bool = False
    counted: bool = True  # a client's request: counted in the in-flight gauge (shadows are not)
    affinity: str | None = None  # a group key (None: no group)


@dataclass(frozen=True, slots=True)
class Attempt:
    """Where the last attempt got: the worker it leased and how long the lease (with its load) took."""

    worker: str | None = None
    load_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a relayed stream ended: 200 at the worker's end, 502 broken, 499 closed by the client first."""

    status: int
    upstream_s: float


@dataclass(frozen=True, slots=True)
class Dispatched:
    """A worker's successful answer: a whole body, or a :class:`Relay` still to pass on."""

    attempt: Attempt
    media_type: str
    content: bytes = b""
    upstream_s: float | None = None  # sending until the whole body was read (streams: see StreamEnd)
    stream: Relay | None = None


class DispatchFailed(Exception):
    """A dispatch that ended in ``error`` (what the client gets); ``attempt`` is kept for the record."""

    def __init__(self, error: LoragateError, attempt: Attempt) -> None:
        super().__init__(error.message)
        self.error = error
        self.attempt = attempt


class InFlight:
    """Client requests on workers now, and how many have started: shadows wait for it to be idle.

    A context manager (``with gauge:`` counts one request until the block exits); the dispatcher
    enters it on each attempt's release stack, which a streamed answer's relay takes over.
    """

    def __init__(self) -> None:
        self.active = 0
        self.starts = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def __enter__(self) -> InFlight:
        self.active += 1
        self.starts += 1
        self.idle.clear()
        return self

    def __exit__(self, *_: object) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()


class Relay:
    """A worker's SSE stream, passed through as it arrives; a stream that breaks ends with an SSE error event.

    Iterate it once. :meth:`aclose` — called at the end of iteration, or by the owner at any
    point, also before iterating — releases the response, the lease and the in-flight count
    exactly once and returns how the stream ended.
    """

    def __init__(self, response: aiohttp.ClientResponse, release: AsyncExitStack, started: float) -> None:
        self._response = response
        self._release = release
        self._started = started
        self._status = CLIENT_CLOSED  # until the worker's stream ends one way or the other
        self._end: StreamEnd | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
            self._status = 200
        except TRANSPORT_EXCEPTIONS as exc:
            self._status = 502
            error = UpstreamError(f"worker stream broke: {exc!r}")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.aclose()

    async def aclose(self) -> StreamEnd:
        if self._end is None:
            self._end = StreamEnd(self._status, time.perf_counter() - self._started)
            await self._release.aclose()
        return self._end


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
    except TRANSPORT_EXCEPTIONS as exc:
        raise UpstreamError(f"worker response broke off: {exc!r}") from exc


def _never(route: str) -> None:
    """No retry observer."""


class Dispatcher:
    """Runs jobs on the pool's workers through one pooled aiohttp session; built once at startup."""

    def __init__(self, pool: Leases, upstream: aiohttp.ClientSession, *, attempts: int = 2,
                 retried: Callable[[str], None] = _never) -> None:
        if attempts < 1:
            raise ValueError("upstream_attempts must be at least 1")
        self.pool = pool
        self.upstream = upstream  # aiohttp: a third of httpx's CPU per proxied request (docs/BENCHMARKS.md)
        self.attempts = attempts
        self.retried = retried  # told the route of each retry (a metric)
        self.in_flight = InFlight()

    async def dispatch(self, job: Job) -> Dispatched:
        """Run ``job``, on another worker (bounded) when an attempt failed before any response byte.

        Only failures that prove the worker produced nothing for the client are retried: refused or
        reset connections, a connection closed without an answer, a load that could not reach its
        worker, an adapter the worker lost. A read timeout is not retried (the first worker may
        still be running it), nor is an error status (the worker answered).
        """
        excluded: set[str] = set()
        failed: _RetryElsewhere | None = None
        for number in range(1, self.attempts + 1):
            if number > 1:
                self.retried(job.route)
            try:
                return await self._attempt(job, excluded)
            except _RetryElsewhere as retry:
                failed = retry
                if retry.url is not None:
                    excluded.add(retry.url)
            except NoWorkerAvailable as exc:
                if failed is None:
                    raise DispatchFailed(exc, Attempt()) from exc
                break  # nowhere else to go: report the failure itself (502)
        assert failed is not None
        raise DispatchFailed(failed.error, Attempt(failed.url)) from failed

    async def _attempt(self, job: Job, excluded: Collection[str]) -> Dispatched:
        release = AsyncExitStack()  # what a streamed answer's relay takes over
        try:
            if job.counted:
                release.enter_context(self.in_flight)
            started = time.perf_counter()
            try:
                worker = await release.enter_async_context(self.pool.lease(job.adapter, job.adapter_path,
                                                                           exclude=excluded, affinity=job.affinity))
            except UpstreamError as exc:
                if isinstance(exc, NoWorkerAvailable):
                    raise
                if isinstance(exc, UpstreamTimeout):
                    raise DispatchFailed(exc, Attempt()) from exc
                raise _RetryElsewhere(None, exc) from exc  # the pool already took that worker out of rotation
            attempt = Attempt(worker.url, time.perf_counter() - started)
            try:
                response, started = await self._send(job, worker.url)
                release.callback(response.release)
                if response.status >= 400:
                    self._refused(job, worker.url, response.status, body_message(await _read(response)))
                media_type = response.headers.get("content-type", "application/json")
                if job.stream:  # the relay holds the lease and the count until it is closed
                    return Dispatched(attempt, media_type, stream=Relay(response, release, started))
                content = await _read(response)
            except LoragateError as exc:
                raise DispatchFailed(exc, attempt) from exc
            await release.aclose()
            return Dispatched(attempt, media_type, content=content, upstream_s=time.perf_counter() - started)
        except BaseException:
            await release.aclose()
            raise

    async def _send(self, job: Job, url: str) -> tuple[aiohttp.ClientResponse, float]:
        started = time.perf_counter()
        try:
            response = await self.upstream.post(url + ROUTE_PATHS[job.route], json=job.body,
                                                headers={"x-request-id": job.request_id})
        except TRANSPORT_EXCEPTIONS as exc:
            error = transport_error(exc, url)
            failure = failure_of(exc)
            if failure is not None and failure.nothing_sent:  # out of rotation; the request may run elsewhere
                self.pool.report_failure(url, repr(exc))
                raise _RetryElsewhere(url, error) from exc
            raise error from exc
        return response, started

    def _refused(self, job: Job, url: str, status: int, message: str) -> None:
        """The worker answered with an error status: pass it on, unless it lost the adapter (then reload)."""
        if status == 404 and job.adapter is not None:  # unloaded behind the pool's back
            self.pool.lost(url, job.adapter)
            raise _RetryElsewhere(None, UpstreamError(f"worker error: {message}", code="adapter_vanished"))
        raise WorkerRejected(f"worker error: {message}", status=status if status < 500 else 502)

