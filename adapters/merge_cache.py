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

Across replicas (an object store, ``<prefix>/merges/<key>/``): a local miss first looks in the
``remote``; only if it is not there does it take the injected build lock for the key
(:class:`BuildLocks`: a PostgreSQL advisory lock in a fleet, nothing by default), look again (the
holder before us may just have uploaded it), build locally, upload, and release. So one replica
builds a merge and the others download it. The merge info file is uploaded last and is what a
reader looks for: a merge dir in the bucket is complete once it is there. Sharing is an
optimisation: a failed upload or a corrupt remote copy is logged and the merge is built locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loragate.adapters.merge import (
    INFO_FILE,
    NO_PARAMS,
    MergeParams,
    MergePlan,
    build_merge,
    plan_merge,
    safetensors_intact,
)
from loragate.adapters.objectstore import ObjectDirs, StoreError
from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.staging import new_dir, remove_stale
from loragate.adapters.store import ADAPTER_FILES, AdapterStore, LruDirs, dir_size, has_files, remove_all, touch
from loragate.adapters.types import AdapterRecord

_KEY = re.compile(r"[0-9a-f]{64}")
#: what a merge dir holds, in upload order: the info file last marks a complete upload
MERGE_FILES = (CONFIG_FILE, WEIGHTS_FILE, INFO_FILE)
logger = logging.getLogger("loragate.merges")


class BuildLocks(Protocol):
    """Mutual exclusion per merge key across replicas, so a merge wanted everywhere at once is built once."""

    def hold(self, key: str) -> contextlib.AbstractAsyncContextManager[None]: ...


class NoBuildLocks:
    """One replica (or no shared database): the in-process sharing of one build is all there is."""

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        yield


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
    params: MergeParams = field(default_factory=lambda: NO_PARAMS)  # the method's parameters, as keyed


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
    downloads: int = 0  # merges another replica built, downloaded from the object store


class MergeCache:
    """Merged adapters under ``root``, at most ``max_bytes`` of them (least recently used go first).

    Built once at startup and passed to whoever serves merge decisions. Construction scans ``root``
    synchronously (before serving) so that merges built by an earlier process are hits.
    """

    def __init__(self, root: Path, *, max_bytes: int, remote: ObjectDirs | None = None,
                 locks: BuildLocks | None = None) -> None:
        """``remote``: where replicas share merges (the object store's merges/); ``locks``: the build lock
        per key that replicas share (default: none)."""
        self.root = root
        self.max_bytes = max_bytes
        self.remote = remote
        self.locks: BuildLocks = locks or NoBuildLocks()
        self._downloads = 0
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
                               bytes=self._lru.bytes, downloads=self._downloads)

    def _scan(self) -> None:
        remove_stale(self.staging)
        self._lru.scan(_intact)
        for trash in self._lru.evict():
            shutil.rmtree(trash, ignore_errors=True)

    async def get_or_build(self, records: Sequence[AdapterRecord], weights: Sequence[float], method: str,
                           max_rank: int, *, params: Mapping[str, object] | None = None,
                           inputs: AdapterStore | None = None) -> MergedAdapter:
        """The merged adapter for these inputs: reused if on disk, else built (once, off the event loop).

        Invalid requests fail before any lookup (see :func:`plan_merge`): the same 4xx whether or not
        an equal merge happens to be cached. ``params``: the method's parameters (every one enters the
        key). ``inputs``: the store holding the records' files, which a
        build materializes first (an object store downloads them) and keeps from eviction while it reads.
        """
        started = time.perf_counter()
        plan = plan_merge(records, weights, method, max_rank=max_rank, params=params)
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
                             size_bytes=self._lru.size(plan.key), params=plan.params)

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

    async def _shared(self, plan: MergePlan, inputs: AdapterStore | None) -> tuple[int, bool]:
        """Downloaded if another replica built it, else built here under the key's lock and uploaded."""
        if self.remote is None:
            return await self._built_from(plan, inputs)
        size = await asyncio.to_thread(self._download, self.remote, plan.key)
        if size is not None:
            return size, False
        async with self.locks.hold(plan.key):
            size = await asyncio.to_thread(self._download, self.remote, plan.key)
            if size is not None:
                return size, False
            size, created = await self._built_from(plan, inputs)
            await asyncio.to_thread(self._upload, self.remote, plan.key)
        return size, created

    def _download(self, remote: ObjectDirs, key: str) -> int | None:
        """The merge's size once it is in ``root`` from the remote; None when the remote lacks it (or
        holds a copy that fails verification, which the build that follows replaces)."""
        target = self.path_for(key)
        if has_files(target, MERGE_FILES):
            return dir_size(target)
        try:
            if not remote.exists(key, INFO_FILE):
                return None
            staged = new_dir(self.staging)
            try:
                remote.download(key, MERGE_FILES, staged)
                if not safetensors_intact(staged / WEIGHTS_FILE):
                    raise StoreError(f"object store: {remote.url(key, WEIGHTS_FILE)} is not a complete safetensors "
                                     "file")
                try:
                    staged.rename(target)
                except OSError:
                    if not has_files(target, MERGE_FILES):
                        raise
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        except StoreError as exc:
            logger.warning("merge %s: the shared copy is unusable, building it here: %s", key[:16], exc.message)
            return None
        self._downloads += 1
        return dir_size(target)

    def _upload(self, remote: ObjectDirs, key: str) -> None:
        try:
            remote.upload(self.path_for(key), key, MERGE_FILES)
        except StoreError as exc:
            logger.warning("merge %s: not shared with other replicas: %s", key[:16], exc.message)

    async def _build(self, plan: MergePlan, inputs: AdapterStore | None) -> MergedAdapter:
        started = time.perf_counter()
        try:
            size, created = await self._shared(plan, inputs)
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
