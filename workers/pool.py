"""The worker pool: which worker serves a request, and making sure its adapter is loaded there.

The pool is the composition of four parts, each in its own module:

- **Scheduling** (:mod:`~loragate.workers.scheduling`): a named profile of filters (health and
  panic routing, retries' exclusions, load-failure backoff), weighted scorers (LoRA affinity,
  eviction cost, load, session affinity) and a picker, reading immutable
  :class:`~loragate.workers.stats.WorkerStats`. Picking and reserving a worker happen in one
  synchronous step on the event loop, so two concurrent requests never both see a free slot
  that only one can take.
- **Health** (:mod:`~loragate.workers.health`): the probe and ``/metrics`` scrape loops and the
  transitions in and out of rotation. When a worker returns, its loaded-adapter state is reset
  (a restarted vLLM has nothing loaded; a blip costs at most a no-op reload) and reconciled.
- **Reconciling** (:mod:`~loragate.workers.reconcile`): adopting what a worker already holds with
  the files the gateway would load now, at start and whenever a worker returns.
- **Membership**, here: the static ``workers`` list, plus what worker discovery
  (:mod:`~loragate.workers.discovery`) reports through :meth:`WorkerPool.set_discovered`:

  - An added worker is *not* in rotation until a probe passes (see the health module's joining
    rule): a new address may not be serving yet, and scheduling must never guess.
  - A removed worker is out at once: it leaves the list scheduling reads in the same synchronous
    step, so no request is scheduled there after it. Requests in flight on it keep their lease and
    end normally (or fail as they would have); its state is dropped when the last one ends, and
    the observer is told (``worker_removed``) so per-worker metrics follow membership. A retry
    before the first byte goes elsewhere, as for any failed worker.
  - Static workers are never removed by discovery; a URL in both lists is one worker (static).

- **Loading and capacity**, here:

  - *Loads are single-flight*: concurrent first requests for one adapter on one worker share one
    load, run as its own task so a client that disconnects mid-load cancels nobody else's.
  - *Capacity*: each worker holds at most ``max_loras`` adapters (per worker, from config); a
    load beyond that unloads the least recently used adapter first, never one with a request in
    flight on that worker (in-flight is counted per (worker, adapter) for exactly this). If every
    loaded adapter is busy, the load goes ahead over the cap (vLLM swaps adapters in from CPU
    memory, so that is slower, not wrong) and the next load evicts again.
  - *Load failures* are reported to the observer and backed off per (worker, adapter),
    exponentially up to a cap, so a broken adapter fails fast instead of being retried forever.

The pool reports events to a :class:`~loragate.workers.observer.PoolObserver`, so metrics live in
the server layer and the pool stays HTTP-framework free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import ClassVar, Protocol
from urllib.parse import parse_qs, urldefrag

from loragate.errors import InvalidRequest, LoragateError, UpstreamError, WorkerRejected
from loragate.workers.client import WorkerAdmin
from loragate.workers.health import HealthMonitor
from loragate.workers.observer import PoolObserver
from loragate.workers.reconcile import Reconciler
from loragate.workers.scheduling import Profile, SchedulingRequest, make_profile
from loragate.workers.state import WorkerState
from loragate.workers.stats import LoadBackoff, WorkerStats

__all__ = ["DELIVERIES", "Lease", "Membership", "PoolConfig", "PoolObserver", "WorkerPool", "WorkerSpec",
           "WorkerStats"]

log = logging.getLogger(__name__)
_NONE: frozenset[str] = frozenset()
_QUIET = PoolObserver()  # what hears the events of a removed worker: its metrics are gone and must stay gone


# -- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One configured worker: its base URL and, optionally, its own cap on loaded adapters."""

    url: str
    max_loras: int | None = None

    @classmethod
    def parse(cls, value: str | WorkerSpec | Mapping[str, object]) -> WorkerSpec:
        """A URL (``http://h:8100``, or ``http://h:8100#max_loras=8`` to set the cap), a mapping
        ``{"url", "max_loras"}``, or a spec. The fragment form keeps ``LORAGATE_WORKERS`` a plain
        list of strings; a fragment is never sent over the wire.
        """
        if isinstance(value, WorkerSpec):
            return value
        if isinstance(value, Mapping):
            url, cap = value.get("url"), value.get("max_loras")
            if not isinstance(url, str) or not (cap is None or isinstance(cap, int)):
                raise InvalidRequest(f"worker entry {dict(value)!r} needs url (string) and optional max_loras (int)",
                                     param="workers")
            return cls._checked(url, cap)
        url, fragment = urldefrag(value)
        caps = parse_qs(fragment).get("max_loras")
        try:
            cap_value = int(caps[-1]) if caps else None
        except ValueError:
            raise InvalidRequest(f"worker {value!r}: max_loras must be an integer", param="workers") from None
        return cls._checked(url, cap_value)

    @classmethod
    def _checked(cls, url: str, cap: int | None) -> WorkerSpec:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"worker URL {url!r} must start with http:// or https://", param="workers")
        if cap is not None and cap < 1:
            raise InvalidRequest(f"worker {url!r}: max_loras must be at least 1", param="workers")
        return cls(url.rstrip("/"), cap)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Pool behaviour. Defaults make a dead worker leave rotation within ~0.5 s (connection
    refused) and a hung one within ``probe_interval_s + probe_timeout_s`` = 1.5 s."""

    strategy: str = "affinity"  # a scheduling profile (workers.scheduling.PROFILES)
    scorer_weights: Mapping[str, float] = field(default_factory=dict)  # overrides of the profile's weights
    max_loras: int = 4  # default per-worker cap on loaded adapters
    delivery: str = "path"  # how adapters reach workers: see DELIVERIES
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    unhealthy_after: int = 1  # consecutive failed probes before leaving rotation
    healthy_after: int = 2  # consecutive good probes before returning (a restarting vLLM flaps)
    scrape_interval_s: float = 1.0
    load_backoff_s: float = 1.0  # first wait after a failed load of one adapter on one worker
    load_backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.delivery not in DELIVERIES:
            raise InvalidRequest(f"unknown adapter delivery {self.delivery!r}; valid: {sorted(DELIVERIES)}",
                                 param="delivery")
        if self.max_loras < 1 or self.unhealthy_after < 1 or self.healthy_after < 1:
            raise InvalidRequest("max_loras, unhealthy_after and healthy_after must be at least 1")
        make_profile(self.strategy, self.scorer_weights)  # unknown profile, scorer or bad weight: fail at startup


# -- adapter delivery ---------------------------------------------------------------------------------
class Delivery(Protocol):
    """How an adapter gets onto a worker."""

    name: ClassVar[str]

    async def load(self, client: WorkerAdmin, url: str, adapter: str, path: str) -> None: ...


class PathDelivery:
    """``load_lora_adapter`` with the gateway's path: needs a filesystem the workers share."""

    name: ClassVar[str] = "path"

    async def load(self, client: WorkerAdmin, url: str, adapter: str, path: str) -> None:
        await client.load_adapter(url, adapter, path)


class ResolverDelivery:
    """The worker's loragate resolver plugin fetches the files from the gateway by name and sha256."""

    name: ClassVar[str] = "resolver"

    async def load(self, client: WorkerAdmin, url: str, adapter: str, path: str) -> None:
        await client.resolve_adapter(url, adapter)


DELIVERIES: dict[str, Callable[[], Delivery]] = {PathDelivery.name: PathDelivery,
                                                 ResolverDelivery.name: ResolverDelivery}


@dataclass(frozen=True, slots=True)
class Membership:
    """What one :meth:`WorkerPool.set_discovered` changed: URLs that joined the pool (not yet in
    rotation) and URLs that left it."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Lease:
    """The worker a request runs on, for the duration of ``async with pool.lease(...)``."""

    url: str
    index: int
    adapter: str | None


class WorkerPool:
    """Workers from configuration and discovery; picks one per request and keeps adapters loaded where needed."""

    def __init__(self, workers: Sequence[str | WorkerSpec | Mapping[str, object]], client: WorkerAdmin,
                 observer: PoolObserver, config: PoolConfig | None = None, *,
                 profile: Profile | None = None, adoptable: Callable[[str], PurePath | None] | None = None
                 ) -> None:
        """``adoptable`` maps an adapter name to the directory the gateway would load it from now
        (the registry's and merge cache's lookup): which adapters a worker already holds that a
        reconcile may count as loaded.

        ``workers`` may be empty when discovery supplies them: until it does, requests get 503.
        """
        self.config = config = config or PoolConfig()
        specs = [WorkerSpec.parse(w) for w in workers]
        if len({s.url for s in specs}) != len(specs):
            raise InvalidRequest(f"duplicate worker URLs in {[s.url for s in specs]}", param="workers")
        self._workers = [WorkerState(s, i, s.max_loras or config.max_loras) for i, s in enumerate(specs)]
        self._by_url = {w.url: w for w in self._workers}
        self._static = frozenset(self._by_url)
        self._discovered: set[str] = set()  # members that discovery added (and may remove)
        self._leaving: dict[str, WorkerState] = {}  # removed, with requests still in flight
        self._next_index = len(self._workers)  # join order is the tie-break order after the static list
        self._client = client
        self._observer = observer
        self.profile = profile or make_profile(config.strategy, config.scorer_weights)
        self._delivery = DELIVERIES[config.delivery]()
        self.health = HealthMonitor(self._workers, client, self._health_changed,
                                    probe_interval_s=config.probe_interval_s, probe_timeout_s=config.probe_timeout_s,
                                    scrape_interval_s=config.scrape_interval_s,
                                    unhealthy_after=config.unhealthy_after, healthy_after=config.healthy_after)
        self._reconciler = Reconciler(client, adoptable or (lambda name: None), self._count_changed)

    # -- read side ------------------------------------------------------------------------------------
    @property
    def probed(self) -> bool:
        """Whether one probe round has completed: before it, "healthy" is only the starting assumption."""
        return self.health.rounds > 0

    @property
    def running(self) -> bool:
        """Whether the probe and scrape loops run (between :meth:`start` and :meth:`stop`)."""
        return bool(self.health.tasks)

    def views(self) -> list[WorkerStats]:
        """Immutable per-worker snapshots of the members, static ones in configuration order, then
        discovered ones in join order (admin API, metrics, tests). A removed worker is not among
        them, even while requests it had still finish."""
        return [w.stats() for w in self._workers]

    def pick(self, adapter: str | None, exclude: Collection[str] = ()) -> WorkerStats:
        """The worker the scheduling profile would choose now, without reserving it."""
        return self._choose(adapter, exclude).stats()

    def _choose(self, adapter: str | None, exclude: Collection[str], affinity: str | None = None) -> WorkerState:
        request = SchedulingRequest(adapter, frozenset(exclude) if exclude else _NONE, time.monotonic(), affinity)
        return self._by_url[self.profile.schedule(request, self.views()).url]

    # -- request path ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def lease(self, adapter: str | None, adapter_path: str | None, *,
                    exclude: Collection[str] = (), affinity: str | None = None) -> AsyncIterator[Lease]:
        """A worker with ``adapter`` loaded, counted as busy until the block exits.

        ``exclude`` lists worker URLs not to use: the request path passes the workers a request
        already failed on (before any response byte), after :meth:`report_failure`, to retry it
        elsewhere. Leases with one ``affinity`` key prefer one worker (the profile's
        ``session-affinity`` scorer remembers it in this same synchronous step).
        """
        worker = self._choose(adapter, exclude, affinity)
        if not worker.healthy:
            self._observer.panic_routed(worker.url)
        worker.in_flight += 1
        if adapter is not None:
            worker.adapter_in_flight[adapter] += 1
        try:
            if adapter is not None and adapter_path is not None:
                await self._ensure_loaded(worker, adapter, adapter_path)
            yield Lease(worker.url, worker.index, adapter)
        finally:
            worker.in_flight -= 1
            if adapter is not None:
                worker.adapter_in_flight[adapter] -= 1
                if not worker.adapter_in_flight[adapter]:
                    del worker.adapter_in_flight[adapter]
            if worker.removed and not worker.in_flight:
                self._drop(worker)

    def report_failure(self, url: str, reason: str = "request failed") -> None:
        """The request path could not reach ``url``: take it out of rotation until probes pass again."""
        worker = self._by_url.get(url.rstrip("/"))
        if worker is not None:
            self.health.request_failed(worker, reason)

    async def _ensure_loaded(self, worker: WorkerState, adapter: str, path: str) -> None:
        while True:
            if (unloading := worker.unloading.get(adapter)) is not None:
                await asyncio.shield(unloading)  # reloading while vLLM unloads would race its per-name lock
                continue
            if adapter in worker.loaded:
                worker.loaded[adapter] = time.monotonic()
                worker.loaded.move_to_end(adapter)
                return
            task = worker.loading.get(adapter)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(worker, adapter, path))
                task.add_done_callback(_consume_exception)
                worker.loading[adapter] = task
            await asyncio.shield(task)
            return

    async def _load(self, worker: WorkerState, adapter: str, path: str) -> None:
        generation = worker.generation
        started = time.perf_counter()
        try:
            await self._make_room(worker, adapter)
            await self._delivery.load(self._client, worker.url, adapter, path)
        except LoragateError as exc:
            self._events(worker).adapter_loaded(worker.url, adapter, time.perf_counter() - started, False)
            if isinstance(exc, UpstreamError) and not isinstance(exc, WorkerRejected):
                self.report_failure(worker.url, exc.message)  # transport failure: the worker, not the adapter
            else:
                self._load_failed(worker, adapter, exc.message)
            raise
        finally:
            worker.loading.pop(adapter, None)
        self._events(worker).adapter_loaded(worker.url, adapter, time.perf_counter() - started, True)
        worker.load_failures.pop(adapter, None)
        if worker.generation == generation:
            worker.loaded[adapter] = time.monotonic()
            worker.loaded.move_to_end(adapter)
        self._count_changed(worker)

    def _load_failed(self, worker: WorkerState, adapter: str, message: str) -> None:
        previous = worker.load_failures.get(adapter)
        count = previous.count + 1 if previous else 1
        wait = min(self.config.load_backoff_s * 2 ** (count - 1), self.config.load_backoff_max_s)
        worker.load_failures[adapter] = LoadBackoff(adapter, count, time.monotonic() + wait, message)
        log.warning("loading %r on %s failed (%d in a row, next try in %.1fs): %s", adapter, worker.url, count,
                    wait, message)
        self._events(worker).adapter_load_failed(worker.url, adapter, message)

    async def _make_room(self, worker: WorkerState, adapter: str) -> None:
        """Unload least recently used, idle adapters until the one being loaded fits under the cap."""
        while len(worker.loaded) + len(worker.loading) > worker.max_loras:
            victim = next((a for a in worker.loaded if not worker.adapter_in_flight[a] and a != adapter), None)
            if victim is None:
                log.info("worker %s over its cap of %d adapters: all loaded ones are busy", worker.url,
                         worker.max_loras)
                return
            del worker.loaded[victim]  # synchronously: no new lease may count on it from here on
            task = asyncio.get_running_loop().create_task(self._unload(worker, victim))
            worker.unloading[victim] = task
            await asyncio.shield(task)

    async def _unload(self, worker: WorkerState, adapter: str) -> None:
        try:
            await self._client.unload_adapter(worker.url, adapter)
        except LoragateError as exc:
            # Not fatal for the load that wanted the room: vLLM swaps, and a dead worker is reset anyway.
            log.warning("unloading %r from %s failed: %s", adapter, worker.url, exc.message)
        finally:
            worker.unloading.pop(adapter, None)
        self._events(worker).adapter_evicted(worker.url, adapter)
        self._count_changed(worker)

    def lost(self, url: str, adapter: str) -> None:
        """The worker at ``url`` does not have ``adapter`` although the pool loaded it: load it again next time."""
        worker = self._by_url.get(url.rstrip("/"))
        if worker is not None and worker.loaded.pop(adapter, None) is not None:
            log.warning("adapter %r vanished from %s (unloaded by someone else?); it will be reloaded", adapter,
                        worker.url)
            self._count_changed(worker)

    async def forget(self, adapter: str) -> None:
        """Unload a deleted adapter from every healthy worker.

        Every worker is asked, not only those this process loaded it on: a gateway restart or a
        second gateway process may have loaded it without this pool knowing. A worker that cannot
        be reached is skipped: its state is reset when it returns anyway.
        """
        for worker in tuple(self._workers):  # a copy: membership may change while an unload is awaited
            worker.loaded.pop(adapter, None)
            worker.load_failures.pop(adapter, None)
            if worker.healthy:
                try:
                    await self._client.unload_adapter(worker.url, adapter)
                except UpstreamError as exc:
                    log.warning("could not unload %r from %s: %s", adapter, worker.url, exc.message)
            self._count_changed(worker)

    def _count_changed(self, worker: WorkerState) -> None:
        self._events(worker).adapters_on_worker(worker.url, len(worker.loaded))

    def _events(self, worker: WorkerState) -> PoolObserver:
        """The observer, or nobody for a removed worker (a load that outlived its last request must
        not bring back the metric series its removal deleted)."""
        return _QUIET if worker.removed else self._observer

    # -- membership -----------------------------------------------------------------------------------
    def add_worker(self, spec: str | WorkerSpec) -> bool:
        """Add a worker, out of rotation until a probe passes; False if it is already a member.

        A URL that was removed while requests on it were still running comes back as that same
        state (its in-flight counts stay right), but joins again like a new worker.
        """
        spec = WorkerSpec.parse(spec)
        if spec.url in self._by_url:
            return False
        worker = self._leaving.pop(spec.url, None)
        if worker is None:
            worker = WorkerState(spec, self._next_index, spec.max_loras or self.config.max_loras)
            self._next_index += 1
        worker.removed, worker.admitted, worker.healthy = False, False, False
        worker.good_probes = worker.bad_probes = 0
        worker.reset()  # whatever it had loaded is unknown now; the join's reconcile adopts what it holds
        self._workers.append(worker)
        self._by_url[worker.url] = worker
        log.info("worker %s joined the pool (in rotation after its first good probe)", worker.url)
        return True

    def remove_worker(self, url: str) -> bool:
        """Take a worker out of the pool at once; False if it is not a member.

        From here on nothing is scheduled there and nothing probes it; requests already on it keep
        their lease, and its state is dropped (and ``worker_removed`` observed) when the last ends.
        """
        worker = self._by_url.pop(url.rstrip("/"), None)
        if worker is None:
            return False
        self._workers.remove(worker)
        self._discovered.discard(worker.url)
        worker.removed = True
        log.info("worker %s left the pool (%d requests in flight there finish)", worker.url, worker.in_flight)
        if worker.in_flight:
            self._leaving[worker.url] = worker
        else:
            self._drop(worker)
        return True

    def set_discovered(self, urls: Iterable[str]) -> Membership:
        """Make the discovered members exactly ``urls``: add the new ones, remove those no longer listed.

        Static workers are left alone either way: one listed by discovery too stays one (static)
        worker, and one discovery stops listing is not removed.
        """
        wanted = dict.fromkeys(url.rstrip("/") for url in urls)  # in the order given: the join (tie-break) order
        added = tuple(url for url in wanted
                      if url not in self._discovered and url not in self._static and self.add_worker(url))
        self._discovered.update(added)
        removed = tuple(url for url in sorted(self._discovered - wanted.keys()) if self.remove_worker(url))
        return Membership(added, removed)

    def _drop(self, worker: WorkerState) -> None:
        if self._leaving.get(worker.url) is worker:
            del self._leaving[worker.url]
        self._observer.worker_removed(worker.url)

    # -- health and reconciling -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the probe and scrape loops and reconcile every worker (the app's lifespan calls this;
        idempotent)."""
        if self.running:
            return
        self.health.start()
        for worker in self._workers:
            self._reconciler.schedule(worker)

    async def stop(self) -> None:
        """Cancel the loops and pending reconciles and wait for them to end."""
        await self.health.stop()
        await self._reconciler.stop()

    async def probe_once(self) -> None:
        """Probe every worker concurrently and apply health transitions."""
        await self.health.probe_once()

    async def scrape_once(self) -> None:
        """Scrape every healthy worker's ``/metrics`` concurrently; a failed scrape clears its stats."""
        await self.health.scrape_once()

    async def reconcile(self, url: str) -> list[str]:
        """Adopt the adapters the worker at ``url`` holds with the files the pool would load now
        (see :mod:`~loragate.workers.reconcile`); returns their names."""
        return await self._reconciler.reconcile(self._by_url[url.rstrip("/")])

    def _health_changed(self, worker: WorkerState, healthy: bool) -> None:
        if worker.removed:
            return
        if healthy:  # back: possibly a fresh vLLM process, so forget, then adopt what it still holds
            worker.reset()
            self._count_changed(worker)
            self._reconciler.schedule(worker)
        self._observer.worker_health(worker.url, healthy)


def _consume_exception(task: asyncio.Task[None]) -> None:
    """Mark a load task's exception retrieved: every waiter may have been cancelled."""
    if not task.cancelled():
        task.exception()
