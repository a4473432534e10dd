"""The one table from transport exceptions to loragate errors, for both HTTP clients."""

from __future__ import annotations

import aiohttp
import httpx
import pytest

from loragate.errors import UpstreamError, UpstreamTimeout
from loragate.workers.client import VLLMAdminClient
from loragate.workers.transport import FAILED, TIMED_OUT, UNREACHABLE, Failure, failure_of, transport_error
from tests.unit.workers.test_client import closed_port, raw_server


@pytest.mark.parametrize(("exc", "failure"), [
    (aiohttp.ConnectionTimeoutError(), UNREACHABLE),  # nothing was sent: safe to run elsewhere
    (httpx.ConnectTimeout("t"), UNREACHABLE),
    (aiohttp.SocketTimeoutError(), TIMED_OUT),  # the worker may still be running it
    (aiohttp.ServerTimeoutError(), TIMED_OUT),
    (httpx.ReadTimeout("t"), TIMED_OUT),
    (httpx.PoolTimeout("t"), TIMED_OUT),
    (TimeoutError(), TIMED_OUT),
    (aiohttp.ServerDisconnectedError(), UNREACHABLE),
    (aiohttp.ClientOSError(), UNREACHABLE),
    (httpx.ConnectError("refused"), UNREACHABLE),
    (httpx.RemoteProtocolError("closed"), UNREACHABLE),
    (aiohttp.ClientPayloadError(), FAILED),
    (httpx.TooManyRedirects("r"), FAILED),
])
def test_the_most_specific_class_decides(exc: BaseException, failure: Failure) -> None:
    assert failure_of(exc) is failure


def test_other_exceptions_are_not_transport_failures() -> None:
    assert failure_of(ValueError()) is None


def test_errors_name_the_worker_and_what_happened() -> None:
    error = transport_error(httpx.ReadTimeout("slow"), "http://w:1", "resolving 'a'")
    assert isinstance(error, UpstreamTimeout) and error.status == 504
    assert error.message.startswith("worker http://w:1 timed out resolving 'a': ReadTimeout")


async def test_the_admin_client_uses_the_table() -> None:
    async with httpx.AsyncClient() as http:
        client = VLLMAdminClient(http, load_timeout=0.3)
        with pytest.raises(UpstreamError) as refused:
            await client.load_adapter(closed_port(), "a", "/x")
        assert type(refused.value) is UpstreamError and "unreachable" in refused.value.message
        async with raw_server(None) as silent:
            with pytest.raises(UpstreamTimeout):
                await client.list_adapters(silent)
