"""The worker pool: which worker serves a request, and making sure its adapter is loaded there.

What the pool guarantees, and how:

- **Scheduling** is a named strategy (:mod:`~loragate.workers.scheduling`) reading immutable
  :class:`~loragate.workers.stats.WorkerStats`; picking and reserving a worker happen in one
  synchronous step on the event loop, so two concurrent requests never both see a free slot
  that only one can take.
- **Loads are single-flight**: concurrent first requests for one adapter on one worker share one
  load, run as its own task so a client that disconnects mid-load cancels nobody else's.
- **Capacity**: each worker holds at most ``max_loras`` adapters (per worker, from config); a
  load beyond that unloads the least recently used adapter first, never one with a request in
  flight on that worker (in-flight is counted per (worker, adapter) for exactly this). If every
  loaded adapter is busy, the load goes ahead over the cap (vLLM swaps adapters in from CPU
  memory, so that is slower, not wrong) and the next load evicts again.
- **Health**: :meth:`start` runs a probe loop (``GET /health`` every ``probe_interval_s``) and a
  ``/metrics`` scrape loop. A worker failing a probe, or reported by the request path with
  :meth:`report_failure`, leaves rotation at once; when it answers again its loaded-adapter
  state is reset (a restarted vLLM has nothing loaded; a blip costs at most a no-op reload).
- **Panic routing** (Envoy's name): a probe that times out proves less than a refused one. A
  gateway saturated by its own clients reads a healthy worker's answer late, and with one worker
  that would turn a busy gateway into a 503 for everyone. So when *no* worker is in rotation,
  requests still go to the workers that were taken out only for probes that went unanswered;
  one that then refuses the request's connection is down for good (until it answers probes).
- **Reconciling**: the pool's view of a worker can be stale: a gateway restarted while its
  workers kept running, or a worker came back from a blip with its adapters still loaded. When
  the pool starts and whenever a worker returns to rotation, it lists the worker's adapters and
  adopts those whose directory name (a sha256) is the one it would load now, as least recently
  used, so they count against the cap and are evicted first. Others are left alone: another
  gateway sharing the worker may be serving them, and a lost one is reloaded (:meth:`lost`).
- **Load failures** are reported to the observer and backed off per (worker, adapter),
  exponentially up to a cap, so a broken adapter fails fast instead of being retried forever.

The pool reports events to an observer, so metrics live in the server layer and the pool stays
HTTP-framework free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import parse_qs, urldefrag

from loragate.errors import InvalidRequest, LoragateError, NoWorkerAvailable, UpstreamError, WorkerRejected
from loragate.workers.client import Probe, WorkerAdmin
from loragate.workers.scheduling import Strategy, make_strategy
from loragate.workers.stats import EngineStats, WorkerStats, WorkerView

__all__ = ["DELIVERIES", "FleetObserver", "Lease", "PoolConfig", "PoolObserver", "WorkerPool", "WorkerSpec",
           "WorkerStats", "WorkerView"]

log = logging.getLogger(__name__)


class PoolObserver(Protocol):
    """Receives pool events (the server's metrics implement this)."""

    def adapter_loaded(self, worker: str, adapter: str, seconds: float, ok: bool) -> None: ...

    def adapters_on_worker(self, worker: str, count: int) -> None: ...


@runtime_checkable
class FleetObserver(PoolObserver, Protocol):
    """Optional further events; the pool sends them only to observers that implement all of them.

    A separate protocol so that an observer written for the single-worker pool keeps working.
    """

    def worker_health(self, worker: str, healthy: bool) -> None: ...

    def adapter_evicted(self, worker: str, adapter: str) -> None: ...

    def adapter_load_failed(self, worker: str, adapter: str, message: str) -> None: ...

    def panic_routed(self, worker: str) -> None: ...


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

    strategy: str = "affinity"
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


# -- state --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _LoadFailure:
    count: int
    retry_at: float
    message: str


@dataclass(slots=True)
class _Worker:
    """Mutable per-worker bookkeeping, touched only from the event loop."""

    spec: WorkerSpec
    index: int
    max_loras: int
    healthy: bool = True
    in_flight: int = 0
    loaded: OrderedDict[str, float] = field(default_factory=OrderedDict)  # adapter -> last use; LRU first
    adapter_in_flight: Counter[str] = field(default_factory=Counter)
    loading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    unloading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    engine: EngineStats = field(default_factory=EngineStats)
    good_probes: int = 0
    bad_probes: int = 0
    last_failure: Probe = Probe.OK  # what took it out of rotation last: SLOW keeps it eligible for panic routing
    generation: int = 0  # bumped on reset: a load that finishes after a reset is not recorded
    load_failures: dict[str, _LoadFailure] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.spec.url

    def stats(self) -> WorkerStats:
        victim = next((a for a in self.loaded if not self.adapter_in_flight[a]), None)
        return WorkerStats(url=self.url, index=self.index, healthy=self.healthy, in_flight=self.in_flight,
                           loaded=tuple(self.loaded), max_loras=self.max_loras, loading=tuple(sorted(self.loading)),
                           engine=self.engine,
                           adapter_in_flight=tuple(sorted((a, n) for a, n in self.adapter_in_flight.items() if n)),
                           victim_idle_s=None if victim is None else time.monotonic() - self.loaded[victim])


@dataclass(frozen=True, slots=True)
class Lease:
    """The worker a request runs on, for the duration of ``async with pool.lease(...)``."""

    url: str
    index: int
    adapter: str | None


class WorkerPool:
    """Workers from configuration; picks one per request and keeps adapters loaded where needed."""

    def __init__(self, workers: Sequence[str | WorkerSpec | Mapping[str, object]], client: WorkerAdmin,
                 observer: PoolObserver, config: PoolConfig | None = None, *,
                 strategy: Strategy | None = None, adoptable: Callable[[str], PurePath | None] | None = None
                 ) -> None:
        """``adoptable`` maps an adapter name to the directory the gateway would load it from now
        (the registry's and merge cache's lookup): which adapters a worker already holds that a
        reconcile may count as loaded."""
        if not workers:
            raise ValueError("at least one worker URL is required")
        self.config = config or PoolConfig()
        specs = [WorkerSpec.parse(w) for w in workers]
        if len({s.url for s in specs}) != len(specs):
            raise InvalidRequest(f"duplicate worker URLs in {[s.url for s in specs]}", param="workers")
        self._workers = [_Worker(s, i, s.max_loras or self.config.max_loras) for i, s in enumerate(specs)]
        self._by_url = {w.url: w for w in self._workers}
        self._client = client
        self._observer = observer
        self._fleet = observer if isinstance(observer, FleetObserver) else None
        self.strategy = strategy or make_strategy(self.config.strategy)
        self._delivery = DELIVERIES[self.config.delivery]()
        self._tasks: list[asyncio.Task[None]] = []
        self._adoptable = adoptable or (lambda name: None)
        self._reconciles: set[asyncio.Task[object]] = set()
        self._probe_rounds = 0

    # -- read side ------------------------------------------------------------------------------------
    @property
    def probed(self) -> bool:
        """Whether one probe round has completed: before it, "healthy" is only the starting assumption."""
        return self._probe_rounds > 0

    def views(self) -> list[WorkerStats]:
        """Immutable per-worker snapshots, in configuration order (admin API, metrics, tests)."""
        return [w.stats() for w in self._workers]

    def pick(self, adapter: str | None, exclude: Collection[str] = ()) -> WorkerStats:
        """The worker the strategy would choose now, without reserving it."""
        return self._choose(adapter, exclude).stats()

    def _choose(self, adapter: str | None, exclude: Collection[str]) -> _Worker:
        healthy = [w for w in self._workers if w.healthy and w.url not in exclude]
        if not any(w.healthy for w in self._workers):  # panic: try those that only failed to answer probes in time
            healthy = [w for w in self._workers if w.last_failure is Probe.SLOW and w.url not in exclude]
        if not healthy:
            raise NoWorkerAvailable("no healthy worker is available" + (f" (excluded: {sorted(exclude)})"
                                                                        if exclude else ""))
        candidates = healthy
        if adapter is not None:
            now = time.monotonic()
            candidates = [w for w in healthy if not self._backing_off(w, adapter, now)]
            if not candidates:
                failure = healthy[0].load_failures[adapter]
                raise WorkerRejected(f"adapter {adapter!r} failed to load on every worker; next attempt in "
                                     f"{failure.retry_at - now:.1f}s. Last error: {failure.message}",
                                     status=502, code="adapter_load_failed")
        chosen = self.strategy.choose(adapter, [w.stats() for w in candidates])
        return self._workers[chosen.index]

    @staticmethod
    def _backing_off(worker: _Worker, adapter: str, now: float) -> bool:
        failure = worker.load_failures.get(adapter)
        return failure is not None and failure.retry_at > now

    # -- request path ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def lease(self, adapter: str | None, adapter_path: str | None, *,
                    exclude: Collection[str] = ()) -> AsyncIterator[Lease]:
        """A worker with ``adapter`` loaded, counted as busy until the block exits.

        ``exclude`` lists worker URLs not to use: the request path passes the workers a request
        already failed on (before any response byte), after :meth:`report_failure`, to retry it
        elsewhere.
        """
        worker = self._choose(adapter, exclude)
        if not worker.healthy and self._fleet is not None:
            self._fleet.panic_routed(worker.url)
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

    def report_failure(self, url: str, reason: str = "request failed") -> None:
        """The request path could not reach ``url``: take it out of rotation until probes pass again."""
        worker = self._by_url.get(url.rstrip("/"))
        if worker is None:
            return
        worker.last_failure = Probe.DOWN  # a refused request is proof: no panic routing to it either
        if worker.healthy:
            log.warning("worker %s out of rotation: %s", worker.url, reason)
            worker.bad_probes, worker.good_probes = self.config.unhealthy_after, 0
            self._set_health(worker, False)

    async def _ensure_loaded(self, worker: _Worker, adapter: str, path: str) -> None:
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

    async def _load(self, worker: _Worker, adapter: str, path: str) -> None:
        generation = worker.generation
        started = time.perf_counter()
        try:
            await self._make_room(worker, adapter)
            await self._delivery.load(self._client, worker.url, adapter, path)
        except LoragateError as exc:
            self._observer.adapter_loaded(worker.url, adapter, time.perf_counter() - started, False)
            if isinstance(exc, UpstreamError) and not isinstance(exc, WorkerRejected):
                self.report_failure(worker.url, exc.message)  # transport failure: the worker, not the adapter
            else:
                self._load_failed(worker, adapter, exc.message)
            raise
        finally:
            worker.loading.pop(adapter, None)
        self._observer.adapter_loaded(worker.url, adapter, time.perf_counter() - started, True)
        worker.load_failures.pop(adapter, None)
        if worker.generation == generation:
            worker.loaded[adapter] = time.monotonic()
            worker.loaded.move_to_end(adapter)
        self._observer.adapters_on_worker(worker.url, len(worker.loaded))

    def _load_failed(self, worker: _Worker, adapter: str, message: str) -> None:
        previous = worker.load_failures.get(adapter)
        count = previous.count + 1 if previous else 1
        wait = min(self.config.load_backoff_s * 2 ** (count - 1), self.config.load_backoff_max_s)
        worker.load_failures[adapter] = _LoadFailure(count, time.monotonic() + wait, message)
        log.warning("loading %r on %s failed (%d in a row, next try in %.1fs): %s", adapter, worker.url, count,
                    wait, message)
        if self._fleet is not None:
            self._fleet.adapter_load_failed(worker.url, adapter, message)

    async def _make_room(self, worker: _Worker, adapter: str) -> None:
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

    async def _unload(self, worker: _Worker, adapter: str) -> None:
        try:
            await self._client.unload_adapter(worker.url, adapter)
        except LoragateError as exc:
            # Not fatal for the load that wanted the room: vLLM swaps, and a dead worker is reset anyway.
            log.warning("unloading %r from %s failed: %s", adapter, worker.url, exc.message)
        finally:
            worker.unloading.pop(adapter, None)
        if self._fleet is not None:
            self._fleet.adapter_evicted(worker.url, adapter)
        self._observer.adapters_on_worker(worker.url, len(worker.loaded))

    def lost(self, url: str, adapter: str) -> None:
        """The worker at ``url`` does not have ``adapter`` although the pool loaded it: load it again next time."""
        worker = self._by_url.get(url.rstrip("/"))
        if worker is not None and worker.loaded.pop(adapter, None) is not None:
            log.warning("adapter %r vanished from %s (unloaded by someone else?); it will be reloaded", adapter,
                        worker.url)
            self._observer.adapters_on_worker(worker.url, len(worker.loaded))

    async def forget(self, adapter: str) -> None:
        """Unload a deleted adapter from every healthy worker.

        Every worker is asked, not only those this process loaded it on: a gateway restart or a
        second gateway process may have loaded it without this pool knowing. A worker that cannot
        be reached is skipped: its state is reset when it returns anyway.
        """
        for worker in self._workers:
            worker.loaded.pop(adapter, None)
            worker.load_failures.pop(adapter, None)
            if worker.healthy:
                try:
                    await self._client.unload_adapter(worker.url, adapter)
                except UpstreamError as exc:
                    log.warning("could not unload %r from %s: %s", adapter, worker.url, exc.message)
            self._observer.adapters_on_worker(worker.url, len(worker.loaded))

    # -- health and stats -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the probe and scrape loops (the app's lifespan calls this; idempotent)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(self.config.probe_interval_s, self.probe_once), name="probe"),
                       loop.create_task(self._every(self.config.scrape_interval_s, self.scrape_once),
                                        name="scrape")]
        for worker in self._workers:
            self._schedule_reconcile(worker)

    async def stop(self) -> None:
        """Cancel the loops and wait for them to end."""
        tasks: list[asyncio.Task[Any]] = [*self._tasks, *self._reconciles]
        self._tasks = []
        self._reconciles.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    async def _every(interval: float, step: Callable[[], object]) -> None:
        """Run ``step`` every ``interval`` seconds, measured start to start; errors are logged, never fatal."""
        while True:
            started = time.monotonic()
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("worker pool background step failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def probe_once(self) -> None:
        """Probe every worker concurrently and apply health transitions."""
        results = await asyncio.gather(*(self._client.probe(w.url, self.config.probe_timeout_s)
                                         for w in self._workers))
        for worker, result in zip(self._workers, results, strict=True):
            self._probed(worker, result)
        self._probe_rounds += 1

    def _probed(self, worker: _Worker, result: Probe) -> None:
        if result is Probe.OK:
            worker.good_probes, worker.bad_probes = worker.good_probes + 1, 0
            if not worker.healthy and worker.good_probes >= self.config.healthy_after:
                self._reset(worker)
                self._set_health(worker, True)
                self._schedule_reconcile(worker)
        else:
            worker.bad_probes, worker.good_probes = worker.bad_probes + 1, 0
            worker.last_failure = result
            if worker.healthy and worker.bad_probes >= self.config.unhealthy_after:
                self._set_health(worker, False)

    def _set_health(self, worker: _Worker, healthy: bool) -> None:
        worker.healthy = healthy
        log.warning("worker %s is %s", worker.url, "back in rotation" if healthy else "out of rotation")
        if self._fleet is not None:
            self._fleet.worker_health(worker.url, healthy)

    def _reset(self, worker: _Worker) -> None:
        """Forget what the worker had loaded: it may be a fresh vLLM process that has nothing."""
        worker.generation += 1
        worker.loaded.clear()
        worker.load_failures.clear()
        worker.engine = EngineStats()
        self._observer.adapters_on_worker(worker.url, 0)

    def _schedule_reconcile(self, worker: _Worker) -> None:
        task = asyncio.get_running_loop().create_task(self.reconcile(worker.url), name=f"reconcile {worker.url}")
        self._reconciles.add(task)
        task.add_done_callback(self._reconciles.discard)

    async def reconcile(self, url: str) -> list[str]:
        """Adopt the adapters the worker holds with the files the pool would load now; returns their names.

        Nothing is unloaded here: a name whose files differ, or that this gateway does not know, may
        be served by another gateway sharing the worker (the same adapter loaded from another
        directory looks no different from a stale one). A failure to list is logged and ignored:
        the worker is then down (and reconciled when it returns) or up with adapters the pool does
        not count until the next reconcile.
        """
        worker = self._by_url[url.rstrip("/")]
        generation = worker.generation
        try:
            served = await self._client.list_adapters(worker.url)
        except LoragateError as exc:
            log.warning("could not list the adapters of %s: %s", worker.url, exc.message)
            return []
        if worker.generation != generation:
            return []  # reset meanwhile: a newer reconcile owns this worker
        adopted = []
        for name, root in served.items():
            if name in worker.loaded or name in worker.loading or name in worker.unloading:
                continue  # this pool loaded it (or is changing it) meanwhile
            expected = self._adoptable(name)
            # Store and merge-cache directories are named by the sha256 of their files: same name, same weights.
            if expected is not None and root and PurePath(root).name == expected.name:
                adopted.append(name)
        now = time.monotonic()
        for name in adopted:  # least recently used: first to go when room is needed
            worker.loaded[name] = now
            worker.loaded.move_to_end(name, last=False)
        if adopted:
            log.info("worker %s: adopted %s, loaded before this gateway started", worker.url, adopted)
            self._observer.adapters_on_worker(worker.url, len(worker.loaded))
        return adopted

    async def scrape_once(self) -> None:
        """Scrape every healthy worker's ``/metrics`` concurrently; a failed scrape clears its stats."""
        healthy = [w for w in self._workers if w.healthy]
        results = await asyncio.gather(*(self._client.engine_stats(w.url, self.config.probe_timeout_s)
                                         for w in healthy), return_exceptions=True)
        for worker, result in zip(healthy, results, strict=True):
            worker.engine = result if isinstance(result, EngineStats) else EngineStats()


def _consume_exception(task: asyncio.Task[None]) -> None:
    """Mark a load task's exception retrieved: every waiter may have been cancelled."""
    if not task.cancelled():
        task.exception()
