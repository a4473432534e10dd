"""Worker discovery by DNS against real stub workers: joining after a probe, leaving without failing requests,
keeping the last set through resolution failures, static workers left alone, and one real getaddrinfo.

The stubs (the instant OpenAI stub, served by uvicorn) listen on one port on three loopback addresses
(127.0.0.1-3, all local on Linux), as pods behind a headless Service listen on one port on their own IPs;
an injected resolver plays the DNS. Probes, loads and proxied requests are the real clients'.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest

from loragate.errors import ConfigError, NoWorkerAvailable
from loragate.loadtest.stub import StubApp
from loragate.server.app import check_config, create_app
from loragate.server.metrics import GatewayMetrics
from loragate.server.settings import Settings
from loragate.workers.client import VLLMAdminClient
from loragate.workers.discovery import (
    WorkerDiscovery,
    parse_target,
    resolve_addresses,
    sorted_addresses,
    worker_url,
)
from loragate.workers.dispatch import Dispatcher, Job
from loragate.workers.launch import free_port
from loragate.workers.observer import PoolObserver
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.servers import serving
from tests.unit.workers.fakes import FakeAdmin, RecordingObserver

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
NOBODY = "127.0.0.9"  # an address with no worker behind it
NAME = "vllm-workers.test.svc.cluster.local"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """One port, a stub worker on it at each of :data:`ADDRESSES`."""
    port = free_port(ADDRESSES[-1])
    with contextlib.ExitStack() as stack:
        for address in ADDRESSES:
            stack.enter_context(serving(StubApp(), port, host=address))
        yield port


@dataclass
class FakeDNS:
    """The injected resolver: ``answer`` is the addresses it returns, or the exception it raises;
    ``hang`` makes it never answer (a resolver that times out)."""

    answer: Sequence[str] | Exception = ()
    hang: bool = False
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append((host, port))
        if self.hang:
            await asyncio.Event().wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@dataclass
class Fleet:
    pool: WorkerPool
    discovery: WorkerDiscovery
    dns: FakeDNS
    dispatcher: Dispatcher
    port: int

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def members(self) -> list[str]:
        return [v.url for v in self.pool.views()]

    def in_rotation(self) -> list[str]:
        return [v.url for v in self.pool.views() if v.healthy]

    async def run(self, stream: bool = False) -> tuple[str, bytes]:
        """One base-model completion through the real dispatcher: the worker it ran on and its body."""
        done = await self.dispatcher.dispatch(Job("completions", {"model": "tiny-llama", "prompt": "hi",
                                                                  "max_tokens": 2}, "req", stream=stream))
        assert done.attempt.worker is not None
        return done.attempt.worker, done.content


@contextlib.asynccontextmanager
async def fleet(port: int, static: Sequence[str] = (), observer: PoolObserver | None = None,
                **discovery: object) -> AsyncIterator[Fleet]:
    dns = FakeDNS()
    async with httpx.AsyncClient(timeout=5) as http, aiohttp.ClientSession() as upstream:
        pool = WorkerPool(static, VLLMAdminClient(http), observer or RecordingObserver(),
                          PoolConfig(healthy_after=2, probe_timeout_s=2))
        found = WorkerDiscovery(f"{NAME}:{port}", pool, interval_s=60, resolve=dns, **discovery)  # type: ignore[arg-type]
        yield Fleet(pool, found, dns, Dispatcher(pool, upstream), port)
        await pool.stop()


# -- names, addresses, URLs ------------------------------------------------------------------------------
def test_addresses_are_deduplicated_and_sorted_and_ipv6_urls_bracketed() -> None:
    assert sorted_addresses(["10.0.0.10", "::1", "10.0.0.9", "10.0.0.10", "fd00::2"]) == [
        "10.0.0.9", "10.0.0.10", "::1", "fd00::2"]  # numerically, IPv4 first: 10.0.0.9 before 10.0.0.10
    assert worker_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert worker_url("fd00::2", 8000) == "http://[fd00::2]:8000"
    assert worker_url("fe80::1%eth0", 8000) == "http://[fe80::1%25eth0]:8000"  # RFC 6874 zone id
    assert parse_target("vllm.default.svc:8000") == ("vllm.default.svc", 8000)
    assert parse_target("[::1]:8000") == ("::1", 8000)
    with pytest.raises(ValueError, match="name:port"):
        parse_target("vllm.default.svc")


# -- joining ---------------------------------------------------------------------------------------------
async def test_a_worker_that_appears_joins_only_after_a_probe_passes(port: int) -> None:
    async with fleet(port) as f:
        f.dns.answer = [ADDRESSES[1], NOBODY]
        snapshot = await f.discovery.refresh()
        assert f.dns.asked == [(NAME, port)]
        assert snapshot.urls == (f.url(ADDRESSES[1]), f.url(NOBODY))
        assert f.members() == [f.url(ADDRESSES[1]), f.url(NOBODY)] and f.in_rotation() == []
        with pytest.raises(NoWorkerAvailable):  # discovered is not vouched for: no request goes there yet
            f.pool.pick(None)
        await f.pool.probe_once()  # one good probe admits a new worker; nobody answers for NOBODY
        assert f.in_rotation() == [f.url(ADDRESSES[1])]
        for _ in range(3):
            worker, body = await f.run()
            assert worker == f.url(ADDRESSES[1]) and b'"choices"' in body
        for _ in range(3):
            await f.pool.probe_once()
        assert f.in_rotation() == [f.url(ADDRESSES[1])]  # an address nothing answers on never joins


async def test_an_address_already_known_is_not_added_twice(port: int) -> None:
    async with fleet(port) as f:
        f.dns.answer = [ADDRESSES[1]]
        await f.discovery.refresh()
        await f.pool.probe_once()
        f.dns.answer = [ADDRESSES[1], ADDRESSES[1]]
        await f.discovery.refresh()
        assert f.members() == [f.url(ADDRESSES[1])] and f.in_rotation() == [f.url(ADDRESSES[1])]


# -- leaving ---------------------------------------------------------------------------------------------
async def test_a_vanished_worker_leaves_rotation_and_its_stream_in_flight_completes(port: int) -> None:
    observer = RecordingObserver()
    async with fleet(port, observer=observer) as f:
        f.dns.answer = [ADDRESSES[1], ADDRESSES[2]]
        await f.discovery.refresh()
        await f.pool.probe_once()
        assert len(f.in_rotation()) == 2
        streaming = await f.dispatcher.dispatch(Job("completions", {"model": "tiny-llama", "prompt": "hi",
                                                                    "max_tokens": 3, "stream": True}, "s", stream=True))
        gone = streaming.attempt.worker
        assert gone is not None and streaming.stream is not None
        staying = next(url for url in f.in_rotation() if url != gone)
        f.dns.answer = [a for a in ADDRESSES[1:] if f.url(a) == staying]
        await f.discovery.refresh()
        assert f.members() == [staying]  # out at once, while its stream is still open
        for _ in range(10):  # every new request goes to the remaining worker, none fails
            worker, body = await f.run()
            assert worker == staying and b'"choices"' in body
        assert ("removed", gone) not in observer.events  # its state lives while the stream does
        chunks = [chunk async for chunk in streaming.stream]
        end = await streaming.stream.aclose()
        assert end.status == 200 and b"data: [DONE]" in b"".join(chunks)
        assert observer.of("removed") == [("removed", gone)]
        await f.pool.probe_once()
        assert f.members() == [staying]  # a vanished worker is not probed back in


async def test_discovered_workers_join_in_the_order_given_after_the_static_ones() -> None:
    """Join order is the scheduler's tie-break order: discovery hands the pool numerically sorted addresses."""
    pool = WorkerPool(["http://static:1"], FakeAdmin(), RecordingObserver())
    urls = [worker_url(a, 1) for a in sorted_addresses(["10.0.0.10", "10.0.0.9"])]
    assert pool.set_discovered(urls).added == ("http://10.0.0.9:1", "http://10.0.0.10:1")
    assert [(v.url, v.index) for v in pool.views()] == [("http://static:1", 0), ("http://10.0.0.9:1", 1),
                                                        ("http://10.0.0.10:1", 2)]


async def test_a_worker_back_before_its_requests_ended_rejoins_like_a_new_one() -> None:
    pool = WorkerPool([], FakeAdmin(), RecordingObserver(), PoolConfig(healthy_after=2))
    w = "http://10.0.0.5:8000"
    pool.set_discovered([w])
    await pool.probe_once()
    async with pool.lease(None, None):
        assert pool.set_discovered([]).removed == (w,)
        assert pool.set_discovered([w]).added == (w,)
        view = pool.views()[0]
        assert not view.healthy and view.in_flight == 1  # the same state: its request still counts
        await pool.probe_once()
        assert pool.views()[0].healthy
    assert pool.views()[0].in_flight == 0 and pool.views()[0].url == w


async def test_a_vanished_workers_metric_series_are_deleted(port: int) -> None:
    """Per-worker series follow membership: a pod IP that is gone must not stay (at its last value or 0)."""
    metrics = GatewayMetrics()
    async with fleet(port, observer=metrics) as f:
        metrics.watch_pool(f.pool.views)
        metrics.watch_discovery(lambda: f.discovery.snapshot)
        f.dns.answer = [ADDRESSES[1], ADDRESSES[2]]
        await f.discovery.refresh()
        await f.pool.probe_once()
        async with f.pool.lease("a", "/store/a") as lease:  # a load: per-worker counters and gauges
            loaded_on = lease.url
        text = metrics.render().decode()
        assert f'loragate_adapter_loads_total{{result="ok",worker="{loaded_on}"}} 1.0' in text
        assert "loragate_worker_discovered 2.0" in text
        f.dns.answer = [a for a in ADDRESSES[1:] if f.url(a) != loaded_on]
        await f.discovery.refresh()
        text = metrics.render().decode()
        assert f'worker="{loaded_on}"' not in text
        assert "loragate_worker_discovered 1.0" in text and 'loragate_worker_healthy{worker="' in text


# -- resolution failures ---------------------------------------------------------------------------------
async def test_a_failed_resolution_keeps_the_last_known_workers(port: int) -> None:
    async with fleet(port, timeout_s=0.01) as f:
        f.dns.answer = [ADDRESSES[1], ADDRESSES[2]]
        await f.discovery.refresh()
        await f.pool.probe_once()
        known = f.in_rotation()
        f.dns.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")  # NXDOMAIN
        assert (await f.discovery.refresh()).failing == 1
        f.dns.answer = []  # an empty answer (a Service without ready endpoints for a moment)
        assert (await f.discovery.refresh()).failing == 2
        f.dns.hang = True  # a resolver that never answers: the timeout ends it
        snapshot = await f.discovery.refresh()
        assert snapshot.errors == 3 and snapshot.failing == 3 and snapshot.last_error == "timed out"
        assert snapshot.urls == tuple(known) and f.in_rotation() == known
        worker, _ = await f.run()
        assert worker in known
        f.dns.hang, f.dns.answer = False, [ADDRESSES[2]]  # DNS back, with one worker fewer
        snapshot = await f.discovery.refresh()
        assert snapshot.failing == 0 and snapshot.errors == 3 and f.members() == [f.url(ADDRESSES[2])]


# -- static workers --------------------------------------------------------------------------------------
async def test_static_workers_stay_and_a_url_in_both_is_one_worker(port: int) -> None:
    static = f"http://{ADDRESSES[0]}:{port}"
    async with fleet(port, static=[static]) as f:
        f.dns.answer = [ADDRESSES[0], ADDRESSES[1]]
        membership = f.pool.set_discovered(worker_url(a, port) for a in f.dns.answer)
        assert membership.added == (f.url(ADDRESSES[1]),)
        assert f.members() == [static, f.url(ADDRESSES[1])]
        await f.discovery.refresh()
        f.dns.answer = [ADDRESSES[2]]  # discovery no longer lists the static worker (nor .2)
        await f.discovery.refresh()
        assert f.members() == [static, f.url(ADDRESSES[2])]
        await f.pool.probe_once()
        assert f.in_rotation() == [static, f.url(ADDRESSES[2])]


# -- the real resolver -----------------------------------------------------------------------------------
async def test_localhost_through_the_real_getaddrinfo_reaches_its_worker(port: int) -> None:
    addresses = await resolve_addresses("localhost", port)
    assert "127.0.0.1" in addresses and set(addresses) <= {"127.0.0.1", "::1"}
    async with fleet(port) as f:
        real = WorkerDiscovery(f"localhost:{port}", f.pool, interval_s=60)
        snapshot = await real.refresh()
        assert f"http://127.0.0.1:{port}" in snapshot.urls
        assert all(url == f"http://[::1]:{port}" for url in snapshot.urls if "127.0.0.1" not in url)
        await f.pool.probe_once()
        assert f.in_rotation() == [f"http://127.0.0.1:{port}"]  # the stub listens on IPv4 only
        worker, body = await f.run()
        assert worker == f"http://127.0.0.1:{port}" and b'"choices"' in body


# -- wiring ----------------------------------------------------------------------------------------------
def test_workers_default_to_none_with_workers_dns_and_neither_is_refused(tmp_path: Path) -> None:
    assert Settings().workers == ["http://127.0.0.1:8100"]  # `make demo` keeps its local worker
    assert Settings(workers_dns="vllm:8000").workers == []
    assert Settings(workers_dns="vllm:8000", workers=["http://w:1"]).workers == ["http://w:1"]
    check_config(Settings(workers_dns="vllm:8000", embedder="none"))
    with pytest.raises(ConfigError, match="workers_dns"):
        check_config(Settings(workers=[], embedder="none"))


def test_the_gateway_serves_through_workers_it_discovered(tmp_path: Path, port: int) -> None:
    settings = Settings(data_dir=tmp_path / "data", workers_dns=f"localhost:{port}", embedder="none",
                        port=free_port(), probe_interval_s=0.05)
    with serving(create_app(settings), settings.port) as gateway:
        ready = httpx.get(f"{gateway}/ready")
        for _ in range(200):  # bounded: the first probe rounds admit the discovered worker
            if ready.status_code == 200:
                break
            time.sleep(0.05)
            ready = httpx.get(f"{gateway}/ready")
        assert ready.status_code == 200, ready.text
        assert f"http://127.0.0.1:{port}" in [w["url"] for w in ready.json()["workers"]]
        response = httpx.post(f"{gateway}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"})
        assert response.status_code == 200, response.text
        assert "loragate_worker_discovered" in httpx.get(f"{gateway}/metrics").text
