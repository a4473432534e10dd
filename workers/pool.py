"""The worker pool: which worker serves a request, and making sure its adapter is loaded there.

Loads are single-flight: concurrent first requests for one adapter on one worker share a single
``load_lora_adapter`` call (an ``asyncio`` future per (worker, adapter)). The pool reports loads
to an observer it is given, so metrics live in the server layer and the pool stays HTTP-framework free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from loragate.errors import NoWorkerAvailable
from loragate.workers.client import VLLMAdminClient


class PoolObserver(Protocol):
    """Receives pool events (the server's metrics implement this)."""

    def adapter_loaded(self, worker: str, adapter: str, seconds: float, ok: bool) -> None: ...

    def adapters_on_worker(self, worker: str, count: int) -> None: ...


@dataclass(slots=True)
class WorkerState:
    """Mutable per-worker bookkeeping, touched only from the event loop."""

    url: str
    loaded: dict[str, float] = field(default_factory=dict)  # adapter -> last use (monotonic)
    in_flight: int = 0
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class WorkerView:
    """An immutable view of one worker for the admin API."""

    url: str
    healthy: bool
    in_flight: int
    loaded: tuple[str, ...]


class WorkerPool:
    """Workers from configuration; picks one per request and keeps adapters loaded where needed."""

    def __init__(self, urls: list[str], client: VLLMAdminClient, observer: PoolObserver) -> None:
        if not urls:
            raise ValueError("at least one worker URL is required")
        self._workers = [WorkerState(url.rstrip("/")) for url in urls]
        self._client = client
        self._observer = observer
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}

    def views(self) -> list[WorkerView]:
        return [WorkerView(w.url, w.healthy, w.in_flight, tuple(sorted(w.loaded))) for w in self._workers]

    def pick(self, adapter: str | None) -> WorkerState:
        """Prefer a healthy worker that already has the adapter, then the least busy (ties: config order)."""
        healthy = [w for w in self._workers if w.healthy]
        if not healthy:
            raise NoWorkerAvailable("no healthy worker is available")
        return min(healthy, key=lambda w: (adapter is not None and adapter not in w.loaded, w.in_flight))

    @asynccontextmanager
    async def lease(self, adapter: str | None, adapter_path: str | None) -> AsyncIterator[WorkerState]:
        """A worker with ``adapter`` loaded, counted as busy until the block exits."""
        worker = self.pick(adapter)
        worker.in_flight += 1
        try:
            if adapter is not None and adapter_path is not None:
                await self.ensure_loaded(worker, adapter, adapter_path)
            yield worker
        finally:
            worker.in_flight -= 1

    async def ensure_loaded(self, worker: WorkerState, adapter: str, path: str) -> None:
        if adapter in worker.loaded:
            worker.loaded[adapter] = time.monotonic()
            return
        key = (worker.url, adapter)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            started = time.perf_counter()
            try:
                await self._client.load_adapter(worker.url, adapter, path)
            except BaseException as exc:
                self._observer.adapter_loaded(worker.url, adapter, time.perf_counter() - started, False)
                pending.set_exception(exc)
                pending.exception()  # mark retrieved: followers may not exist
                raise
            else:
                self._observer.adapter_loaded(worker.url, adapter, time.perf_counter() - started, True)
                worker.loaded[adapter] = time.monotonic()
                self._observer.adapters_on_worker(worker.url, len(worker.loaded))
                pending.set_result(None)
            finally:
                del self._loading[key]
            return
        await asyncio.shield(pending)

    async def forget(self, adapter: str) -> None:
        """Unload a deleted adapter from every healthy worker.

        Every worker is asked, not only those this process loaded it on: a gateway restart or a
        second gateway process may have loaded it without this pool knowing.
        """
        for worker in self._workers:
            worker.loaded.pop(adapter, None)
            if worker.healthy:
                await self._client.unload_adapter(worker.url, adapter)
            self._observer.adapters_on_worker(worker.url, len(worker.loaded))
