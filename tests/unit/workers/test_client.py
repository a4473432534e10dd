"""The admin client's health probe against real sockets: what it answers decides panic routing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from loragate.workers.client import Probe, VLLMAdminClient


@asynccontextmanager
async def raw_server(answer: bytes | None) -> AsyncIterator[str]:
    """A loopback HTTP server that sends ``answer`` to every request, or never answers (None)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await asyncio.sleep(30)
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Probe.OK),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", Probe.DOWN),
    (None, Probe.SLOW),
])
async def test_probe_tells_answers_from_silence(answer: bytes | None, expected: Probe) -> None:
    async with httpx.AsyncClient() as http, raw_server(answer) as url:
        assert await VLLMAdminClient(http).probe(url, timeout_s=0.3) is expected


async def test_a_refused_connection_is_down_not_slow() -> None:
    async with httpx.AsyncClient() as http:
        assert await VLLMAdminClient(http).probe(closed_port(), timeout_s=0.3) is Probe.DOWN
