"""The dispatcher against a fake pool and scripted upstreams (raw loopback HTTP servers, real aiohttp).

What each failure proves decides what happens: nothing reached the worker -> run elsewhere; no
answer in time -> 504, never retried; an error status -> passed on; a lost adapter -> reloaded.
The in-flight gauge must come back to zero however a request ends, a stream never iterated too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest

from loragate.errors import NoWorkerAvailable, UpstreamError, UpstreamTimeout, WorkerRejected
from loragate.workers.dispatch import CLIENT_CLOSED, Dispatcher, DispatchFailed, Job, StreamEnd
from tests.unit.workers.test_client import closed_port

OK = json.dumps({"choices": [{"index": 0, "text": "fine"}]}).encode()


@dataclass(frozen=True)
class FakeLease:
    url: str


@dataclass
class FakePool:
    """Hands out ``urls`` in order (skipping excluded ones); records every call."""

    urls: list[str]
    held: int = 0
    leases: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost_adapters: list[tuple[str, str]] = field(default_factory=list)
    load_error: UpstreamError | None = None

    @asynccontextmanager
    async def _lease(self, adapter: str | None, path: str | None, exclude: Collection[str]) -> AsyncIterator[FakeLease]:
        free = [u for u in self.urls if u not in exclude and u not in self.failures]
        if not free:
            raise NoWorkerAvailable("no worker")
        if self.load_error is not None:
            error, self.load_error = self.load_error, None
            self.failures.append(free[0])
            raise error
        self.leases.append(free[0])
        self.held += 1
        try:
            yield FakeLease(free[0])
        finally:
            self.held -= 1

    def lease(self, adapter: str | None, adapter_path: str | None, *, exclude: Collection[str] = (),
              affinity: str | None = None) -> AsyncIterator[FakeLease]:
        return self._lease(adapter, adapter_path, exclude)  # type: ignore[return-value]

    def report_failure(self, url: str, reason: str = "request failed") -> None:
        self.failures.append(url)

    def lost(self, url: str, adapter: str) -> None:
        self.lost_adapters.append((url, adapter))


def http(status: int, body: bytes, reason: str = "X") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


@asynccontextmanager
async def upstream(mode: str) -> AsyncIterator[str]:
    """A loopback worker answering completions as ``mode`` says (``lost``: a 404 the first time only)."""
    seen = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), b"0"))
            await reader.readexactly(length)
            nonlocal seen
            seen += 1
            if mode == "close":
                return
            if mode == "hang":
                await asyncio.sleep(30)
            elif mode == "lost" and seen == 1:
                writer.write(http(404, b'{"error": {"message": "The model `a` does not exist."}}'))
            elif mode in ("ok", "lost"):
                writer.write(http(200, OK))
            elif mode == "refuse":
                writer.write(http(400, b'{"error": {"message": "max_tokens is too large"}}'))
            elif mode in ("stream", "break"):
                writer.write(SSE_HEAD + chunk(b'data: {"choices": [{"text": "fine"}]}\n\n'))
                if mode == "stream":
                    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            if mode == "stream":
                await asyncio.sleep(0.2)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@asynccontextmanager
async def dispatcher(pool: FakePool, attempts: int = 2) -> AsyncIterator[tuple[Dispatcher, list[str]]]:
    retries: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0, sock_read=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield Dispatcher(pool, session, attempts=attempts, retried=retries.append), retries  # type: ignore[arg-type]


def job(**kwargs: object) -> Job:
    return Job(**{"route": "completions", "body": {"model": "m", "prompt": "hi"}, "request_id": "r1", **kwargs})  # type: ignore[arg-type]


async def test_a_whole_answer_comes_back_with_its_worker_and_the_lease_released() -> None:
    async with upstream("ok") as url:
        pool = FakePool([url])
        async with dispatcher(pool) as (d, retries):
            reply = await d.dispatch(job())
    assert reply.content == OK and reply.stream is None and reply.attempt.worker == url
    assert reply.upstream_s is not None and reply.upstream_s >= 0
    assert pool.held == 0 and d.in_flight.active == 0 and d.in_flight.starts == 1 and retries == []


async def test_a_worker_that_closes_without_answering_is_retried_elsewhere() -> None:
    async with upstream("close") as bad, upstream("ok") as good:
        pool = FakePool([bad, good])
        async with dispatcher(pool) as (d, retries):
            reply = await d.dispatch(job())
    assert reply.attempt.worker == good and pool.failures == [bad] and retries == ["completions"]
    assert pool.held == 0 and d.in_flight.active == 0


async def test_a_refused_connection_is_retried_and_the_last_failure_is_reported() -> None:
    dead = [closed_port(), closed_port()]
    pool = FakePool(dead)
    async with dispatcher(pool) as (d, _):
        with pytest.raises(DispatchFailed) as failed:
            await d.dispatch(job())
    assert type(failed.value.error) is UpstreamError and "unreachable" in failed.value.error.message
    assert failed.value.error.status == 502 and pool.failures == dead and d.in_flight.active == 0


async def test_no_worker_at_all_is_a_503() -> None:
    async with dispatcher(FakePool([])) as (d, _):
        with pytest.raises(DispatchFailed) as failed:
            await d.dispatch(job())
    assert isinstance(failed.value.error, NoWorkerAvailable) and failed.value.error.status == 503


async def test_a_read_timeout_is_a_504_and_never_retried() -> None:
    async with upstream("hang") as slow, upstream("ok") as good:
        pool = FakePool([slow, good])
        async with dispatcher(pool) as (d, retries):
            with pytest.raises(DispatchFailed) as failed:
                await d.dispatch(job())
    assert isinstance(failed.value.error, UpstreamTimeout) and failed.value.attempt.worker == slow
    assert pool.leases == [slow] and retries == [] and pool.failures == []


async def test_an_error_status_is_passed_on_with_the_attempt() -> None:
    async with upstream("refuse") as url:
        pool = FakePool([url])
        async with dispatcher(pool) as (d, retries):
            with pytest.raises(DispatchFailed) as failed:
                await d.dispatch(job())
    assert isinstance(failed.value.error, WorkerRejected) and failed.value.error.status == 400
    assert "max_tokens is too large" in failed.value.error.message and failed.value.attempt.worker == url
    assert retries == [] and pool.held == 0


async def test_an_adapter_lost_by_the_worker_is_reported_and_the_request_runs_again() -> None:
    async with upstream("lost") as lost:
        pool = FakePool([lost])
        async with dispatcher(pool) as (d, retries):
            reply = await d.dispatch(job(adapter="a", adapter_path="/x"))
    assert pool.lost_adapters == [(lost, "a")] and reply.attempt.worker == lost and retries == ["completions"]


async def test_a_load_that_could_not_reach_its_worker_runs_elsewhere() -> None:
    async with upstream("ok") as first, upstream("ok") as second:
        pool = FakePool([first, second], load_error=UpstreamError("worker unreachable"))
        async with dispatcher(pool) as (d, retries):
            reply = await d.dispatch(job(adapter="a", adapter_path="/x"))
    assert reply.attempt.worker == second and retries == ["completions"]


async def relay(mode: str, *, iterate: bool) -> tuple[list[bytes], StreamEnd, FakePool, Dispatcher]:
    """Dispatch a streamed job to a ``mode`` upstream; read the relay (or not), then close it twice."""
    async with upstream(mode) as url:
        pool = FakePool([url])
        async with dispatcher(pool) as (d, _):
            reply = await d.dispatch(job(stream=True))
            assert reply.stream is not None and pool.held == 1 and d.in_flight.active == 1
            chunks = [c async for c in reply.stream] if iterate else []
            end = await reply.stream.aclose()
            assert await reply.stream.aclose() is end  # once only
    return chunks, end, pool, d


async def test_a_stream_holds_its_lease_and_count_until_it_ends() -> None:
    chunks, end, pool, d = await relay("stream", iterate=True)
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n") and end.status == 200
    assert pool.held == 0 and d.in_flight.active == 0 and d.in_flight.idle.is_set()


async def test_a_stream_never_iterated_releases_everything_when_closed() -> None:
    _, end, pool, d = await relay("stream", iterate=False)
    assert end.status == CLIENT_CLOSED and pool.held == 0 and d.in_flight.active == 0


async def test_a_stream_that_breaks_ends_with_an_sse_error_event() -> None:
    chunks, end, _, d = await relay("break", iterate=True)
    assert b"worker stream broke" in chunks[-1] and end.status == 502 and d.in_flight.active == 0


async def test_shadow_jobs_are_not_counted() -> None:
    async with upstream("ok") as url, dispatcher(FakePool([url])) as (d, _):
        await d.dispatch(job(counted=False))
    assert d.in_flight.starts == 0
