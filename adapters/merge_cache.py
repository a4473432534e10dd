"""An on-disk, content-addressed cache of merged adapters, built once under concurrency.

A merge takes from milliseconds (small adapters) to seconds (``svd`` on a 7B adapter set), and the
same few merges recur: routing rounds its weights so nearby decisions share a key. So merges live
in ``<root>/<key>/`` as ordinary PEFT dirs that workers load by path, and:

- a repeat is a hit that reuses the directory, also after a restart (the directory is the index);
- concurrent requests for one key share a single build (an asyncio task the callers await through
  ``shield``, so one caller's cancellation does not cancel the others' build);
- the build runs in a thread (``asyncio.to_thread``): tensor math and file I/O never block the loop;
- disk use stays under a byte budget by evicting the least recently *used* merge (directory mtime
  records last use across restarts); the merge being returned is never evicted, nor one a
  concurrent hit is returning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loragate.adapters.merge import MergePlan, build_merge, plan_merge, safetensors_intact
from loragate.adapters.peft_format import WEIGHTS_FILE
from loragate.adapters.staging import remove_stale
from loragate.adapters.store import ADAPTER_FILES, AdapterStore, LruDirs, dir_size, has_files, remove_all, touch
from loragate.adapters.types import AdapterRecord

_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class MergedAdapter:
    """A servable merge: the adapter name and directory to hand a worker, and how it was obtained."""

    name: str
    path: Path
    key: str
    rank: int
    built: bool  # True when this call (or the in-flight build it joined) created the directory
    seconds: float  # build time when built, else the lookup time
    method: str
    base_model: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class MergeCacheStats:
    """Counters since construction, as an immutable snapshot (metrics read it; nothing else)."""

    hits: int
    builds: int
    joins: int  # callers that waited on another caller's in-flight build
    evictions: int
    failures: int
    last_build_seconds: float
    entries: int
    bytes: int


class MergeCache:
    """Merged adapters under ``root``, at most ``max_bytes`` of them (least recently used go first).

    Built once at startup and passed to whoever serves merge decisions. Construction scans ``root``
    synchronously (before serving) so that merges built by an earlier process are hits.
    """

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.staging = root / "tmp"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._lru = LruDirs(root, self.staging, max_bytes)
        self._inflight: dict[str, asyncio.Task[MergedAdapter]] = {}
        self._hits = self._builds = self._joins = self._failures = 0
        self._last_build_seconds = 0.0
        self._scan()

    def path_for(self, key: str) -> Path:
        return self.root / key

    def stats(self) -> MergeCacheStats:
        return MergeCacheStats(hits=self._hits, builds=self._builds, joins=self._joins,
                               evictions=self._lru.evictions, failures=self._failures,
                               last_build_seconds=self._last_build_seconds, entries=self._lru.entries,
                               bytes=self._lru.bytes)

    def _scan(self) -> None:
        remove_stale(self.staging)
        self._lru.scan(_intact)
        for trash in self._lru.evict():
            shutil.rmtree(trash, ignore_errors=True)

    async def get_or_build(self, records: Sequence[AdapterRecord], weights: Sequence[float], method: str,
                           max_rank: int, *, target_rank: int | None = None,
                           inputs: AdapterStore | None = None) -> MergedAdapter:
        """The merged adapter for these inputs: reused if on disk, else built (once, off the event loop).

        Invalid requests fail before any lookup (see :func:`plan_merge`): the same 4xx whether or not
        an equal merge happens to be cached. ``inputs``: the store holding the records' files, which a
        build materializes first (an object store downloads them) and keeps from eviction while it reads.
        """
        started = time.perf_counter()
        plan = plan_merge(records, weights, method, max_rank=max_rank, target_rank=target_rank)
        if plan.key in self._lru:
            with self._lru.leased([plan.key]):
                present = await asyncio.to_thread(touch, self.path_for(plan.key), ADAPTER_FILES)
            if present and self._lru.used(plan.key):
                self._hits += 1
                return self._result(plan, built=False, seconds=time.perf_counter() - started)
            self._lru.discard(plan.key)  # removed behind our back: build it again
        task = self._inflight.get(plan.key)
        if task is None:
            task = asyncio.create_task(self._build(plan, inputs))
            self._inflight[plan.key] = task
            task.add_done_callback(functools.partial(self._forget, plan.key))
        else:
            self._joins += 1
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[MergedAdapter]) -> None:
        """Done callback: the next request for ``key`` looks at the index (or retries a failed build)."""
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: a failure nobody awaited any more is not an asyncio warning

    def _result(self, plan: MergePlan, *, built: bool, seconds: float) -> MergedAdapter:
        return MergedAdapter(name=plan.name, path=self.path_for(plan.key), key=plan.key, rank=plan.rank,
                             built=built, seconds=seconds, method=plan.method, base_model=plan.base_model,
                             size_bytes=self._lru.size(plan.key))

    def _build_sync(self, plan: MergePlan) -> tuple[int, bool]:
        target = self.path_for(plan.key)
        created = False
        if not has_files(target):  # another process may have built it since our scan
            # No fsync: a merge is derived data, rebuilt on demand; _scan drops one a crash tore.
            _, created = build_merge(plan, target, staging_root=self.staging, durable=False)
        return dir_size(target), created

    async def _built_from(self, plan: MergePlan, inputs: AdapterStore | None) -> tuple[int, bool]:
        """Build with the inputs' files on local disk (materialized, and held against eviction)."""
        if inputs is None:
            return await asyncio.to_thread(self._build_sync, plan)
        with inputs.held(record.sha256 for record, _ in plan.inputs):
            local = [(dataclasses.replace(record, path=await inputs.materialize(record.sha256)), weight)
                     for record, weight in plan.inputs]
            return await asyncio.to_thread(self._build_sync, dataclasses.replace(plan, inputs=tuple(local)))

    async def _build(self, plan: MergePlan, inputs: AdapterStore | None) -> MergedAdapter:
        started = time.perf_counter()
        try:
            size, created = await self._built_from(plan, inputs)
        except BaseException:
            self._failures += 1
            raise
        seconds = time.perf_counter() - started
        self._lru.add(plan.key, size)
        if created:
            self._builds += 1
            self._last_build_seconds = seconds
        else:
            self._hits += 1
        victims = self._lru.evict(protect=plan.key)
        if victims:
            await asyncio.to_thread(remove_all, victims)
        return self._result(plan, built=created, seconds=seconds)


def _intact(entry: Path) -> bool:
    """A complete merge dir named by its key; one whose weights a crash tore (written without fsync) is deleted."""
    if not (_KEY.fullmatch(entry.name) and has_files(entry)):
        return False
    if not safetensors_intact(entry / WEIGHTS_FILE):
        shutil.rmtree(entry, ignore_errors=True)
        return False
    return True
