"""Three real vLLM-CPU workers: affinity, capacity, resolver delivery, the CPU LoRA fix, kill -9 failover.

The workers run loragate's vLLM plugins (the resolver, activated by env, and the CPU LoRA-op fix),
discovered through the ``vllm.general_plugins`` entry points that pyproject declares: exactly what
an installed plugin does.

The file server here is the gateway's file route in miniature: the same
:class:`~loragate.workers.delivery.AdapterFiles` logic behind two GET routes. Its adapter
directories live outside anything the workers are told about: they only get a URL and a token.
The failover test runs the real gateway (``loragate serve``, its own process) in front of the
fleet and drives it with the ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loragate.errors import LoragateError, WorkerRejected
from loragate.workers.client import VLLMAdminClient
from loragate.workers.delivery import AdapterFiles
from loragate.workers.launch import WorkerFleet, WorkerLaunch, free_port, resolver_env, wait_healthy
from loragate.workers.pool import PoolConfig, WorkerPool
from tests.integration.conftest import MODEL, Tiny
from tests.servers import serving
from tests.unit.workers.fakes import RecordingObserver

pytestmark = pytest.mark.integration
TOKEN = "delivery-token"
WORKERS = 3


@dataclass
class FileServer:
    url: str
    dirs: dict[str, Path]
    tampered: set[str] = field(default_factory=set)  # sha256s whose weights are served with one bit flipped


@contextlib.contextmanager
def serve_files(dirs: dict[str, Path]) -> Iterator[FileServer]:
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
    with serving(app, port):
        yield server_state


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
    with serve_files(remote) as files:
        # Each worker its own resolver cache: nothing on disk is shared with the "gateway" above.
        template = WorkerLaunch(model=tiny.model, served_model_name=MODEL, port=consecutive_free_ports(WORKERS),
                                max_loras=2, env=resolver_env(files.url, TOKEN, root / "cache"))
        workers = WorkerFleet(template, WORKERS, root / "logs")
        try:
            workers.start(timeout=400)
            yield Fleet(workers, files, paths)
        finally:
            workers.stop()


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
    """One request through the pool (no retries here: the gateway's are tested through the gateway);
    returns the worker it ran on and the text."""
    async with pool.lease(adapter, path) as lease:
        response = await http.post(f"{lease.url}/v1/completions", json={
            "model": adapter or MODEL, "prompt": "the cat sat on the", "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return lease.url, response.json()["choices"][0]["text"]


async def served_models(http: httpx.AsyncClient, url: str) -> set[str]:
    return {m["id"] for m in (await http.get(f"{url}/v1/models")).json()["data"]}


async def test_requests_for_one_adapter_stay_on_the_worker_that_has_it(fleet: Fleet, http: httpx.AsyncClient) -> None:
    pool, observer = make_pool(fleet, http)
    await pool.start()
    try:
        for _ in range(600):  # up to 60 s for one scrape of vLLM's /metrics: a wait, not a speed claim
            if all(v.engine.scraped_at is not None for v in pool.views()):
                break
            await asyncio.sleep(0.1)
        assert all(v.engine.scraped_at is not None for v in pool.views())
        alpha = str(fleet.paths["alpha"])
        results = await asyncio.gather(*(complete(pool, http, "alpha", alpha) for _ in range(6)))
        results += [await complete(pool, http, "alpha", alpha) for _ in range(6)]
        homes = {url for url, _ in results}
        assert len(homes) == 1 and len({text for _, text in results}) == 1
        home = homes.pop()
        assert len(observer.of("loaded")) == 1
        assert "alpha" in await served_models(http, home)
        assert all("alpha" not in models for models in [await served_models(http, url)
                                                          for url in fleet.fleet.urls if url != home])
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


async def stream_text(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      started: asyncio.Event | None = None) -> str:
    """A streamed completion's text; ``started`` is set once the first token has arrived."""
    text = []
    async with http.stream("POST", f"{url}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
                if started is not None:
                    started.set()
    return "".join(text)


async def test_an_adapter_with_a_request_in_flight_is_never_evicted(fleet: Fleet, http: httpx.AsyncClient) -> None:
    url = fleet.fleet.urls[0]
    pool, observer = make_pool(fleet, http)
    capped = WorkerPool([url + "#max_loras=1"], VLLMAdminClient(http), observer, PoolConfig())
    prompt, paths = "the dog ran to the", {name: str(path) for name, path in fleet.paths.items()}
    try:
        async with capped.lease("alpha", paths["alpha"]) as lease:
            alone = await stream_text(http, lease.url, "alpha", prompt, 200)
        async with capped.lease("alpha", paths["alpha"]) as lease:  # alpha in flight from here on
            started = asyncio.Event()
            running = asyncio.create_task(stream_text(http, lease.url, "alpha", prompt, 200, started))
            await started.wait()
            await complete(capped, http, "beta", paths["beta"])  # cap 1: room is needed, alpha is busy
            assert set(capped.views()[0].loaded) == {"alpha", "beta"}  # over the cap rather than evict alpha
            assert {"alpha", "beta"} <= await served_models(http, url)
            assert await running == alone  # the stream ran to the end on alpha's weights
        assert observer.of("evicted") == []
        await complete(capped, http, "gamma", paths["gamma"])  # now both idle: evicted, LRU first
        assert capped.views()[0].loaded == ("gamma",)
        assert [e[2] for e in observer.of("evicted")] == ["alpha", "beta"]
        assert {"alpha", "beta"}.isdisjoint(await served_models(http, url))
    finally:
        for name in ("alpha", "beta", "gamma"):
            await pool.forget(name)


async def test_a_new_pool_adopts_what_the_worker_holds_with_its_files(
        fleet: Fleet, http: httpx.AsyncClient) -> None:
    """A restarted gateway: its pool lists the real worker's adapters (vLLM's /v1/models roots)."""
    url = fleet.fleet.urls[2]
    before = WorkerPool([url], VLLMAdminClient(http), RecordingObserver(), PoolConfig())
    for name in ("alpha", "beta"):
        await complete(before, http, name, str(fleet.paths[name]))
    lookup = {"alpha": fleet.paths["alpha"], "beta": fleet.paths["gamma"]}  # this gateway's beta is other files
    after = WorkerPool([url], VLLMAdminClient(http), RecordingObserver(), PoolConfig(), adoptable=lookup.get)
    try:
        assert await after.reconcile(url) == ["alpha"]
        assert after.views()[0].loaded == ("alpha",)
        assert {"alpha", "beta"} <= await served_models(http, url)  # nothing unloaded
        assert (await complete(after, http, "alpha", str(fleet.paths["alpha"])))[0] == url
    finally:
        await before.forget("alpha")
        await before.forget("beta")


async def test_base_requests_batched_next_to_a_lora_get_no_adapter_delta(fleet: Fleet, http: httpx.AsyncClient
                                                                          ) -> None:
    """vLLM's CPU LoRA ops apply the last slot's adapter to base tokens in a mixed batch unless
    loragate's plugin (workers/cpu_lora_fix.py) fixed them: fill both slots, then compare."""
    url = fleet.fleet.urls[1]
    pool, _ = make_pool(fleet, http)
    capped = WorkerPool([url], VLLMAdminClient(http), RecordingObserver(), PoolConfig(max_loras=2))
    prompts = ["the cat sat on the", "a bird flew over the", "my friend likes the", "the old man saw a"]
    try:
        for name in ("alpha", "beta"):  # both adapters active: every slot, the last one included, is full
            await complete(capped, http, name, str(fleet.paths[name]))
        for prompt in prompts:
            alone = await stream_text(http, url, MODEL, prompt, 6)
            started = asyncio.Event()
            lora = asyncio.create_task(stream_text(http, url, "alpha", prompt, 64, started))
            await started.wait()
            batched = await stream_text(http, url, MODEL, prompt, 6)
            lora_text = await lora
            assert batched == alone, f"base output changed next to a LoRA request for {prompt!r}"
            assert not lora_text.startswith(alone)  # the adapter does change this prompt's answer
    finally:
        for name in ("alpha", "beta"):
            await pool.forget(name)


OUT_OF_ROTATION_WAIT_S = 30.0  # far above the ~0.15 s measured: a wait for the event, not a speed claim
BACK_IN_ROTATION_WAIT_S = 60.0  # a few probe intervals on a machine busy with three workers


def test_kill_9_under_load_through_the_gateway(fleet: Fleet, tmp_path: Path) -> None:
    """The real gateway in front of 3 workers, 300 requests at concurrency 8 with the openai SDK
    (its own retries off), one worker killed with SIGKILL a fifth of the way in."""
    port, victim_index, total, concurrency = free_port(), 2, 300, 8
    victim = fleet.fleet.urls[victim_index]
    gateway = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "loragate.server.cli", "serve", "--set", f"port={port}",
               "--set", f"data_dir={tmp_path}", "--set", f"model={MODEL}", "--set", "embedder=none",
               "--set", "scheduling=round-robin", "--set", f"workers={json.dumps(fleet.fleet.urls)}"]
    proc = subprocess.Popen(command)
    try:
        wait_healthy(f"{gateway}/health", proc, 120, name="gateway")
        out_after, back_after, back_since, failures = asyncio.run(
            _drive_and_kill(fleet, gateway, victim_index, total, concurrency))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert failures == []  # in flight on the dead worker, no response byte yet: retried elsewhere
    # the waits below are bounded, not speed claims (timings are printed; they vary with the machine's load)
    assert out_after < OUT_OF_ROTATION_WAIT_S, f"dead worker still in rotation after {out_after:.2f}s"
    assert back_after < BACK_IN_ROTATION_WAIT_S, f"restarted worker not back in rotation {back_after:.2f}s after ready"
    with sqlite3.connect(tmp_path / "outcomes.sqlite3") as db:
        served = dict(db.execute("SELECT worker, COUNT(*) FROM outcomes WHERE status = 200 GROUP BY worker"))
        after_restart = {url for (url,) in db.execute("SELECT worker FROM outcomes WHERE ts > ?", (back_since,))}
    assert sum(served.values()) == total + 6  # every request and the 6 sent after the restart
    assert set(served) == set(fleet.fleet.urls)
    assert victim in after_restart
    print(f"\nkill -9 through the gateway: out of rotation after {out_after:.2f}s, back {back_after:.2f}s after "
          f"restart; {total} requests at concurrency {concurrency}, 0 failed; per worker {served}")


async def _drive_and_kill(fleet: Fleet, gateway: str, victim_index: int, total: int, concurrency: int
                          ) -> tuple[float, float, float, list[str]]:
    client = AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    failures: list[str] = []
    sent = [0]

    async def healthy(http: httpx.AsyncClient) -> bool:
        workers = (await http.get(f"{gateway}/health")).json()["workers"]
        return bool(workers[victim_index]["healthy"])

    async def one() -> None:
        try:
            completion = await client.completions.create(model=MODEL, prompt="the cat sat on the", max_tokens=2,
                                                         temperature=0)
            assert completion.choices[0].text
        except Exception as exc:  # every failure is collected and reported
            failures.append(repr(exc))

    async def user() -> None:
        while sent[0] < total:
            sent[0] += 1
            await one()

    async with httpx.AsyncClient(timeout=10) as http:
        users = [asyncio.create_task(user()) for _ in range(concurrency)]
        while sent[0] < total // 5:  # noqa: ASYNC110 - a counter, not an event, marks "load is running"
            await asyncio.sleep(0.02)
        killed_at = time.monotonic()
        await asyncio.to_thread(fleet.fleet.processes[victim_index].kill)
        while await healthy(http):
            if time.monotonic() - killed_at > OUT_OF_ROTATION_WAIT_S:
                break
            await asyncio.sleep(0.02)
        out_after = time.monotonic() - killed_at
        await asyncio.gather(*users)
        process = fleet.fleet.processes[victim_index]
        process.start()  # not from an executor thread: a worker dies with the thread that started it
        await asyncio.to_thread(process.wait_ready, 400)
        ready_at = time.monotonic()
        while not await healthy(http):
            if time.monotonic() - ready_at > BACK_IN_ROTATION_WAIT_S:
                break
            await asyncio.sleep(0.05)
        back_after, back_since = time.monotonic() - ready_at, time.time()
        for _ in range(6):  # round-robin: two of these reach the restarted worker
            await one()
        await asyncio.sleep(1.0)  # the outcome log flushes every 0.25 s
    await client.close()
    return out_after, back_after, back_since, failures
