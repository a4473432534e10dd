"""Worker discovery by DNS: one name (a Kubernetes headless Service) re-resolved to every worker's address.

``workers_dns = name:port`` names a DNS name whose A/AAAA records are the workers (a headless
Service lists one per ready pod). :class:`WorkerDiscovery` resolves it every
``workers_dns_interval_s`` and tells the pool the URLs it found (``http://address:port``, IPv6 in
brackets); the pool adds the new ones (in rotation after a probe passes) and removes those gone
(see :mod:`~loragate.workers.pool`). Each successful resolution is published as an immutable
:class:`DiscoverySnapshot` that metrics read.

**A failed resolution keeps the last known set** rather than emptying the pool. NXDOMAIN, a
timeout or an empty answer says as much about the resolver (a restarting CoreDNS, a lost packet,
a Service briefly without ready endpoints during a rollout) as about the workers, and acting on it
would take *every* worker out at once: one DNS blip would become a fleet-wide 503. Keeping the
set costs little when the workers really are gone, because the health probes take each dead one out
of rotation within a probe interval anyway. Failures are logged and counted
(``loragate_worker_discovery_errors_total``).

Resolution goes through the event loop's ``getaddrinfo`` (the system resolver in a thread, so
``/etc/hosts``, search domains and ``ndots`` work as for any client in the pod) under a timeout;
the resolver is a parameter so that tests can feed names of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loragate.workers.health import cancel_all, every

__all__ = ["DiscoverySnapshot", "Members", "Resolve", "WorkerDiscovery", "parse_target", "resolve_addresses",
           "sorted_addresses", "worker_url"]

log = logging.getLogger(__name__)

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> IP addresses``; raises :class:`OSError` (``socket.gaierror``) when the name does not resolve."""


def parse_target(target: str) -> tuple[str, int]:
    """``name:port`` (as the setting validates it; an IPv6 literal may be bracketed) -> (name, port)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"workers_dns {target!r} must be name:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def sorted_addresses(addresses: Iterable[str]) -> list[str]:
    """Deduplicated and sorted: IPv4 before IPv6, numerically (so URLs, and join order, are deterministic)."""
    def key(address: str) -> tuple[int, int, str]:
        ip = ipaddress.ip_address(address.partition("%")[0])
        return ip.version, int(ip), address
    return sorted(set(addresses), key=key)


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every A and AAAA address of ``host``, through the running loop's ``getaddrinfo``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted_addresses(str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6))


def worker_url(address: str, port: int, scheme: str = "http") -> str:
    """The base URL of the worker at ``address``: IPv6 in brackets, a zone id escaped (RFC 6874)."""
    host = f"[{address.replace('%', '%25')}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


class Members(Protocol):
    """What discovery needs from the pool."""

    def set_discovered(self, urls: Iterable[str]) -> object: ...


@dataclass(frozen=True, slots=True)
class DiscoverySnapshot:
    """Where discovery stands: the last known URLs and how resolution has gone."""

    target: str
    urls: tuple[str, ...] = ()  # from the last successful resolution (kept through failures)
    resolved_at: float | None = None  # monotonic time of that resolution; None: none succeeded yet
    errors: int = 0  # failed resolutions since start
    failing: int = 0  # failed resolutions in a row now
    last_error: str | None = None


class WorkerDiscovery:
    """Re-resolves ``target`` (``name:port``) every ``interval_s`` and tells ``members`` what it found."""

    def __init__(self, target: str, members: Members, *, interval_s: float, resolve: Resolve = resolve_addresses,
                 timeout_s: float = 5.0, scheme: str = "http") -> None:
        """``timeout_s`` bounds one resolution (the system resolver's own default is 5 s per try)."""
        self.host, self.port = parse_target(target)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._members = members
        self._resolve = resolve
        self._scheme = scheme
        self._task: asyncio.Task[None] | None = None
        self.snapshot = DiscoverySnapshot(target)

    async def refresh(self) -> DiscoverySnapshot:
        """Resolve once; on success hand the pool the URLs, on failure keep the last set (see the module)."""
        try:
            addresses = await asyncio.wait_for(self._resolve(self.host, self.port), self.timeout_s)
            if not addresses:
                raise OSError("resolved to no addresses")
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            previous = self.snapshot
            self.snapshot = dataclasses.replace(previous, errors=previous.errors + 1, failing=previous.failing + 1,
                                                last_error=reason)
            level = logging.WARNING if previous.failing == 0 else logging.DEBUG  # once per run of failures
            log.log(level, "resolving workers_dns %s failed (%s); keeping the %d workers known", self.snapshot.target,
                    reason, len(previous.urls))
            return self.snapshot
        urls = tuple(worker_url(a, self.port, self._scheme) for a in sorted_addresses(addresses))
        if self.snapshot.failing:
            log.info("workers_dns %s resolves again after %d failures", self.snapshot.target, self.snapshot.failing)
        self._members.set_discovered(urls)
        self.snapshot = dataclasses.replace(self.snapshot, urls=urls, resolved_at=time.monotonic(), failing=0)
        return self.snapshot

    async def start(self) -> None:
        """Resolve once now (so the first probe round already sees the workers), then keep re-resolving
        in the background (idempotent; the app's lifespan calls it)."""
        if self._task is not None:
            return
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="worker-discovery")

    async def _loop(self) -> None:
        await asyncio.sleep(self.interval_s)
        await every(self.interval_s, self.refresh)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_all([task])
