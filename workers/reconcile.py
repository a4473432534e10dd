"""Reconciling: counting as loaded what a worker already holds with the files the pool would load now.

The pool's view of a worker can be stale: a gateway restarted while its workers kept running, or
a worker came back from a blip with its adapters still loaded. When the pool starts and whenever a
worker returns to rotation, the :class:`Reconciler` lists the worker's adapters and adopts those
whose directory name (a sha256) is the one the gateway would load now, as least recently used, so
they count against the cap and are evicted first. Others are left alone: another gateway sharing
the worker may be serving them, and a lost one is reloaded (``WorkerPool.lost``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import PurePath

from loragate.errors import LoragateError
from loragate.workers.client import WorkerAdmin
from loragate.workers.health import cancel_all
from loragate.workers.state import WorkerState

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    """Adopts adapters workers already hold; ``adopted`` is told the worker whose count changed."""

    def __init__(self, client: WorkerAdmin, adoptable: Callable[[str], PurePath | None],
                 adopted: Callable[[WorkerState], None]) -> None:
        """``adoptable`` maps an adapter name to the directory the gateway would load it from now
        (the registry's and merge cache's lookup)."""
        self._client = client
        self._adoptable = adoptable
        self._adopted = adopted
        self._tasks: set[asyncio.Task[list[str]]] = set()

    def schedule(self, worker: WorkerState) -> None:
        """Reconcile ``worker`` in the background."""
        task = asyncio.get_running_loop().create_task(self.reconcile(worker), name=f"reconcile {worker.url}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        await cancel_all(tasks)

    async def reconcile(self, worker: WorkerState) -> list[str]:
        """Adopt the adapters the worker holds with the files the pool would load now; returns their names.

        Nothing is unloaded here: a name whose files differ, or that this gateway does not know, may
        be served by another gateway sharing the worker (the same adapter loaded from another
        directory looks no different from a stale one). A failure to list is logged and ignored:
        the worker is then down (and reconciled when it returns) or up with adapters the pool does
        not count until the next reconcile.
        """
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
            self._adopted(worker)
        return adopted
