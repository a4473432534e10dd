"""One table from transport exceptions (aiohttp's and httpx's) to loragate errors.

The gateway talks to workers with two HTTP clients: aiohttp for proxied requests (a third of
httpx's CPU per request, docs/BENCHMARKS.md) and httpx for the admin calls, probes and scrapes.
Both raise their own exception trees; what the gateway does about a failure depends only on what
it proves about the worker, so each class maps to one :class:`Failure`: nothing reached the
worker (safe to run elsewhere), no answer in time (the worker may still be running it), or
anything else. The lookup walks the exception's MRO and takes the most specific class listed,
as httpx's own mapping from httpcore exceptions does (``httpx/_transports/default.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import httpx

from loragate.errors import UpstreamError, UpstreamTimeout


@dataclass(frozen=True, slots=True)
class Failure:
    """What a transport exception proves: the error to raise and whether the request may run elsewhere."""

    error: type[UpstreamError]
    says: str  # how the message names it: "worker URL <says>: <exception>"
    nothing_sent: bool  # the worker produced nothing for the request: it may run on another worker


UNREACHABLE = Failure(UpstreamError, "unreachable", nothing_sent=True)
TIMED_OUT = Failure(UpstreamTimeout, "timed out", nothing_sent=False)
FAILED = Failure(UpstreamError, "failed", nothing_sent=False)

TRANSPORT_ERRORS: dict[type[BaseException], Failure] = {
    aiohttp.ConnectionTimeoutError: UNREACHABLE,  # no connection in time: nothing was sent
    httpx.ConnectTimeout: UNREACHABLE,
    aiohttp.ServerTimeoutError: TIMED_OUT,  # no answer in time: the worker may still be running it
    httpx.TimeoutException: TIMED_OUT,
    TimeoutError: TIMED_OUT,
    aiohttp.ClientConnectionError: UNREACHABLE,  # refused, reset, or closed before any answer
    httpx.TransportError: UNREACHABLE,
    aiohttp.ClientError: FAILED,
    httpx.HTTPError: FAILED,
}
TRANSPORT_EXCEPTIONS = tuple(TRANSPORT_ERRORS)
"""For ``except`` clauses: every exception class the table knows."""


def failure_of(exc: BaseException) -> Failure | None:
    """The most specific entry of :data:`TRANSPORT_ERRORS` for ``exc``; None if it is no transport failure."""
    for cls in type(exc).__mro__:
        if (failure := TRANSPORT_ERRORS.get(cls)) is not None:
            return failure
    return None


def transport_error(exc: BaseException, url: str, doing: str = "") -> UpstreamError:
    """The loragate error for a transport exception met while talking to ``url`` (``doing``: what for)."""
    failure = failure_of(exc) or FAILED
    return failure.error(f"worker {url} {failure.says}{f' {doing}' if doing else ''}: {exc!r}")
