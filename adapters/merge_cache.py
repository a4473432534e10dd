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
import functools
import os
import re
import shutil
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loragate.adapters.merge import MergePlan, build_merge, plan_merge, safetensors_intact
from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.staging import current_owner, remove_stale
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


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _complete(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _touch(path: Path) -> bool:
    """Mark a merge dir as used now (its mtime is the LRU clock across restarts); False if it is gone."""
    if not _complete(path):
        return False
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


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
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._inflight: dict[str, asyncio.Task[MergedAdapter]] = {}
        self._leases: Counter[str] = Counter()
        self._hits = self._builds = self._joins = self._evictions = self._failures = 0
        self._last_build_seconds = 0.0
        self._scan()

    def path_for(self, key: str) -> Path:
        return self.root / key

    def stats(self) -> MergeCacheStats:
        return MergeCacheStats(hits=self._hits, builds=self._builds, joins=self._joins,
                               evictions=self._evictions, failures=self._failures,
                               last_build_seconds=self._last_build_seconds, entries=len(self._index),
                               bytes=sum(self._index.values()))

    def _scan(self) -> None:
        remove_stale(self.staging)
        found = []
        for entry in self.root.iterdir():
            if not (entry.is_dir() and _KEY.fullmatch(entry.name) and _complete(entry)):
                continue
            try:
                if not safetensors_intact(entry / WEIGHTS_FILE):  # written without fsync, torn by a crash
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
                found.append((entry.stat().st_mtime, entry.name, _dir_size(entry)))
            except FileNotFoundError:  # another gateway process sharing the dir evicted it meanwhile
                continue
        for _, key, size in sorted(found):
            self._index[key] = size
        for trash in self._select_victims(protect=None):
            shutil.rmtree(trash, ignore_errors=True)

    async def get_or_build(self, records: Sequence[AdapterRecord], weights: Sequence[float], method: str,
                           max_rank: int, *, target_rank: int | None = None) -> MergedAdapter:
        """The merged adapter for these inputs: reused if on disk, else built (once, off the event loop).

        Invalid requests fail before any lookup (see :func:`plan_merge`): the same 4xx whether or not
        an equal merge happens to be cached.
        """
        started = time.perf_counter()
        plan = plan_merge(records, weights, method, max_rank=max_rank, target_rank=target_rank)
        if plan.key in self._index:
            self._leases[plan.key] += 1
            try:
                present = await asyncio.to_thread(_touch, self.path_for(plan.key))
            finally:
                self._leases[plan.key] -= 1
                if not self._leases[plan.key]:
                    del self._leases[plan.key]
            if present and plan.key in self._index:
                self._index.move_to_end(plan.key)
                self._hits += 1
                return self._result(plan, built=False, seconds=time.perf_counter() - started)
            self._index.pop(plan.key, None)  # removed behind our back: build it again
        task = self._inflight.get(plan.key)
        if task is None:
            task = asyncio.create_task(self._build(plan))
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
                             size_bytes=self._index.get(plan.key, 0))

    def _build_sync(self, plan: MergePlan) -> tuple[int, bool]:
        target = self.path_for(plan.key)
        created = False
        if not _complete(target):  # another process may have built it since our scan
            # No fsync: a merge is derived data, rebuilt on demand; _scan drops one a crash tore.
            _, created = build_merge(plan, target, staging_root=self.staging, durable=False)
        return _dir_size(target), created

    async def _build(self, plan: MergePlan) -> MergedAdapter:
        started = time.perf_counter()
        try:
            size, created = await asyncio.to_thread(self._build_sync, plan)
        except BaseException:
            self._failures += 1
            raise
        seconds = time.perf_counter() - started
        self._index[plan.key] = size
        self._index.move_to_end(plan.key)
        if created:
            self._builds += 1
            self._last_build_seconds = seconds
        else:
            self._hits += 1
        victims = self._select_victims(protect=plan.key)
        if victims:
            await asyncio.to_thread(_remove_all, victims)
        return self._result(plan, built=created, seconds=seconds)

    def _select_victims(self, protect: str | None) -> list[Path]:
        """Drop least recently used entries until under budget; returns their (renamed) dirs to delete.

        The rename out of ``root`` happens here, on the event loop, in the same step as the index
        update: a single metadata syscall, and it guarantees that no build or hit for the same key
        can interleave with a half-deleted directory.
        """
        total = sum(self._index.values())
        victims = []
        for key in list(self._index):
            if total <= self.max_bytes:
                break
            if key == protect or self._leases[key]:
                continue
            total -= self._index.pop(key)
            trash = self.staging / f"{current_owner().prefix()}evicted-{key[:16]}-{uuid.uuid4().hex[:8]}"
            try:
                self.path_for(key).rename(trash)
            except FileNotFoundError:
                continue
            victims.append(trash)
            self._evictions += 1
        return victims


def _remove_all(paths: Sequence[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
