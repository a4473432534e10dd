"""Fault injection on the proxy path: the real gateway app in front of scripted misbehaving upstreams.

Each fake worker is a raw asyncio HTTP/1.1 server whose answer to completions is scripted: answer,
close without a byte, hang, break a stream mid-way, or refuse with an OpenAI error (or it leaves
its health probes unanswered). What the gateway
must do about each (retry elsewhere, 504 without a retry, an SSE error event, pass the error on)
is what these tests check, through the openai-compatible routes a client uses.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "tiny-llama",
              "choices": [{"index": 0, "text": "fine", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@dataclass
class FakeWorker:
    """One scripted upstream; ``mode`` decides how it answers completions, ``completions`` counts them."""

    mode: str = "ok"
    completions: int = 0
    loads: int = 0
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode().split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines if ": " in line)
                length = int(headers.get("Content-Length", headers.get("content-length", "0")))
                body = await reader.readexactly(length)
                path = request_line.split(" ")[1]
                if path == "/health" and self.mode == "slow-health":
                    await asyncio.sleep(3600)  # the probe times out; completions are still answered
                if path.startswith("/v1/completions"):
                    self.completions += 1
                    if not await self.complete(json.loads(body), writer):
                        return
                elif path == "/v1/load_lora_adapter":
                    self.loads += 1
                    writer.write(response(200, b"loaded"))
                else:
                    payload = b'{"data": []}' if path == "/v1/models" else b"{}"
                    writer.write(response(200, payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def complete(self, body: dict[str, object], writer: asyncio.StreamWriter) -> bool:
        """Answer one completion as scripted; False when the connection must end."""
        if self.mode == "close":
            return False
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "lose-adapter" and body["model"] != "tiny-llama" and self.completions == 2:
            error = {"error": {"message": f"The model `{body['model']}` does not exist.", "code": 404}}
            writer.write(response(404, json.dumps(error).encode()))
            return True
        if self.mode == "refuse":
            error = {"error": {"message": "max_tokens is too large for this model", "type": "BadRequestError"}}
            writer.write(response(400, json.dumps(error).encode()))
            return True
        if body.get("stream"):
            chunk = json.dumps({"choices": [{"index": 0, "text": "fine"}]})
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(chunked(f"data: {chunk}\n\n".encode()))
            if self.mode == "break-stream":
                await writer.drain()
                return False  # mid-stream: no terminating chunk, the connection just ends
            writer.write(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            return True
        writer.write(response(200, json.dumps(COMPLETION).encode()))
        return True


def response(status: int, payload: bytes) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
            .encode() + payload)


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass
class Fleet:
    workers: list[FakeWorker]
    gateway: str


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    modes: list[str] = request.param
    workers = [FakeWorker(mode) for mode in modes]
    loop = asyncio.new_event_loop()
    servers: list[asyncio.Server] = []

    async def serve() -> None:
        servers.extend([await asyncio.start_server(w.handle, "127.0.0.1", w.port) for w in workers])

    async def shut_down() -> None:
        for server in servers:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:  # handlers still hanging or streaming
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), workers=[w.url for w in workers],
                        model="tiny-llama", embedder="none", scheduling="round-robin", request_timeout_s=1.0,
                        outcomes_flush_interval_s=0.05, admin_token="t", import_roots=[tmp_path])  # type: ignore[arg-type]
    try:
        with serving(create_app(settings), settings.port) as gateway:
            yield Fleet(workers, gateway)
    finally:
        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def post(fleet: Fleet, **body: object) -> httpx.Response:
    return httpx.post(f"{fleet.gateway}/v1/completions", json={"model": "tiny-llama", "prompt": "hi",
                                                               "max_tokens": 1, **body}, timeout=30)


def metric(fleet: Fleet, prefix: str) -> float:
    """The sum of the samples whose line starts with ``prefix`` in the gateway's /metrics."""
    metrics = httpx.get(f"{fleet.gateway}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def retried(fleet: Fleet) -> float:
    return metric(fleet, "loragate_request_retries_total{")


@pytest.mark.parametrize("fleet", [["close", "ok"]], indirect=True)
def test_a_worker_that_closes_without_answering_is_retried_elsewhere(fleet: Fleet) -> None:
    answers = [post(fleet) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.json()["choices"][0]["text"] == "fine" for a in answers)
    assert fleet.workers[0].completions >= 1  # it was tried, failed before any byte, and left rotation
    assert retried(fleet) == fleet.workers[0].completions
    down = f'loragate_worker_health_transitions_total{{to="down",worker="{fleet.workers[0].url}"}}'
    assert metric(fleet, down) >= 1


@pytest.mark.parametrize("fleet", [["hang", "hang"]], indirect=True)
def test_a_read_timeout_is_a_504_and_never_retried(fleet: Fleet) -> None:
    answer = post(fleet)
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert sum(w.completions for w in fleet.workers) == 1  # the first worker may still be running it
    assert retried(fleet) == 0


@pytest.mark.parametrize("fleet", [["break-stream"]], indirect=True)
def test_a_stream_that_breaks_ends_with_an_sse_error_event(fleet: Fleet) -> None:
    with httpx.stream("POST", f"{fleet.gateway}/v1/completions", timeout=30, json={
            "model": "tiny-llama", "prompt": "hi", "max_tokens": 4, "stream": True}) as answer:
        assert answer.status_code == 200
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "fine"  # what arrived was passed on
    assert "worker stream broke" in json.loads(events[1])["error"]["message"]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("fleet", [["refuse"]], indirect=True)
def test_a_worker_error_is_passed_on_with_its_message(fleet: Fleet) -> None:
    answer = post(fleet)
    assert answer.status_code == 400
    assert "max_tokens is too large" in answer.json()["error"]["message"]
    assert retried(fleet) == 0


@pytest.mark.parametrize("fleet", [["lose-adapter"]], indirect=True)
def test_an_adapter_unloaded_behind_the_gateways_back_is_loaded_again(fleet: Fleet, tmp_path: Path) -> None:
    registered = httpx.post(f"{fleet.gateway}/admin/adapters", headers={"authorization": "Bearer t"},
                            json={"name": "alpha", "path": str(write_lora(tmp_path / "alpha", rank=8))})
    assert registered.status_code == 201, registered.text
    answers = [post(fleet, model="alpha") for _ in range(3)]  # the second finds it gone ("does not exist")
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert fleet.workers[0].loads == 2 and fleet.workers[0].completions == 4
    assert retried(fleet) == 1


@pytest.mark.parametrize("fleet", [["slow-health"]], indirect=True)
def test_the_only_worker_out_for_unanswered_probes_still_serves(fleet: Fleet) -> None:
    """Panic routing: no worker in rotation, and this one was taken out only for probe timeouts."""
    url = fleet.workers[0].url
    deadline = time.monotonic() + 10
    while metric(fleet, f'loragate_worker_healthy{{worker="{url}"}}') != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(fleet, f'loragate_worker_healthy{{worker="{url}"}}') == 0, "the probe timeouts did not count"
    answers = [post(fleet) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert metric(fleet, f'loragate_panic_routes_total{{worker="{url}"}}') == 3
