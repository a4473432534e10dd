"""MergeCache: hits reuse directories (also after a restart), builds happen once, LRU keeps disk bounded."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from loragate.adapters import merge_cache, staging, store
from loragate.adapters.merge import MergePlan, build_merge, safetensors_intact
from loragate.adapters.merge_cache import MERGE_FILES, MergeCache
from loragate.adapters.objectstore import ObjectDirs, S3Location
from loragate.adapters.peft_format import WEIGHTS_FILE, inspect_dir
from loragate.adapters.store import AdapterStore
from loragate.adapters.types import AdapterRecord
from loragate.database import PostgresDatabase
from loragate.errors import InvalidRequest, Unprocessable
from tests.lora_files import write_lora
from tests.s3 import S3Server


def record(directory: Path, name: str) -> AdapterRecord:
    spec = inspect_dir(directory)
    sha, size = AdapterStore.content_hash(directory)
    return AdapterRecord(name=name, base_model=spec.base_model, rank=spec.rank, alpha=spec.alpha,
                         target_modules=spec.target_modules, use_rslora=spec.use_rslora, sha256=sha, path=directory,
                         size_bytes=size, created_at=0.0, modules_to_save=spec.modules_to_save)


@pytest.fixture
def adapters(tmp_path: Path) -> list[AdapterRecord]:
    return [record(write_lora(tmp_path / "src" / n, rank=4, alpha=8, hidden=32, seed=i), n)
            for i, n in enumerate(("spouses", "birthplaces", "cooking"))]


class BuildSpy:
    """Counts real builds (and can slow them down or hold them on a gate, so concurrent callers overlap a build)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.gate = gate
        monkeypatch.setattr(merge_cache, "build_merge", self)

    def __call__(self, plan: MergePlan, target: Path, *, staging_root: Path | None = None,
                 durable: bool = True) -> tuple[Path, bool]:
        self.calls.append(plan.key)
        self.threads.add(threading.get_ident())
        self.durable = durable
        time.sleep(self.delay)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the build's gate"
        return build_merge(plan, target, staging_root=staging_root, durable=durable)


def entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name != "tmp"}


async def test_a_repeat_is_a_hit_on_the_same_directory(tmp_path: Path, adapters: list[AdapterRecord],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spy = BuildSpy(monkeypatch)
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    first = await cache.get_or_build(adapters[:2], [0.6, 0.4], "cat", 16)
    assert first.built and first.rank == 8 and first.name == f"merge-{first.key[:16]}"
    assert first.path == tmp_path / "merges" / first.key and inspect_dir(first.path).rank == 8
    assert first.size_bytes > 0 and first.method == "cat" and first.base_model == "tiny-llama"
    assert threading.get_ident() not in spy.threads  # built off the event loop's thread
    again = await cache.get_or_build(list(reversed(adapters[:2])), [0.4, 0.6], "cat", 16)  # same merge
    assert not again.built and again.path == first.path and again.key == first.key
    assert len(spy.calls) == 1
    stats = cache.stats()
    assert (stats.hits, stats.builds, stats.entries, stats.bytes) == (1, 1, 1, first.size_bytes)
    assert stats.last_build_seconds > 0


async def test_concurrent_identical_requests_build_once(tmp_path: Path, adapters: list[AdapterRecord],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spy = BuildSpy(monkeypatch, delay=0.2)
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    results = await asyncio.gather(*(cache.get_or_build(adapters[:2], [0.5, 0.5], "svd", 16) for _ in range(10)))
    assert len(spy.calls) == 1
    assert len({r.path for r in results}) == 1 and all(r.built for r in results)
    assert entries(tmp_path / "merges") == {results[0].key}
    stats = cache.stats()
    assert (stats.builds, stats.joins, stats.hits) == (1, 9, 0)
    assert not list((tmp_path / "merges" / "tmp").iterdir())  # staging cleaned up


async def test_a_cancelled_caller_does_not_cancel_the_shared_build(tmp_path: Path, adapters: list[AdapterRecord],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()  # the build stays in flight until the impatient caller is gone (a delay could lapse)
    BuildSpy(monkeypatch, gate=gate)
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    impatient = asyncio.create_task(cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16))
    await asyncio.sleep(0.05)
    patient = asyncio.create_task(cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16))
    await asyncio.sleep(0.01)
    impatient.cancel()
    gate.set()
    result = await patient
    assert result.built and inspect_dir(result.path).rank == 8 and cache.stats().builds == 1


async def test_lru_eviction_keeps_disk_under_budget(tmp_path: Path, adapters: list[AdapterRecord],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spy = BuildSpy(monkeypatch)
    probe = MergeCache(tmp_path / "probe", max_bytes=10**9)
    size = (await probe.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)).size_bytes
    root = tmp_path / "merges"
    cache = MergeCache(root, max_bytes=int(size * 2.5))  # room for two merges of this size
    one = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    two = await cache.get_or_build(adapters[:2], [0.7, 0.3], "cat", 16)
    assert (await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)).built is False  # one is now recent
    three = await cache.get_or_build(adapters[1:], [0.5, 0.5], "cat", 16)
    assert entries(root) == {one.key, three.key}  # two was least recently used
    assert not two.path.exists() and not list((root / "tmp").iterdir())
    stats = cache.stats()
    assert stats.evictions == 1 and stats.bytes <= cache.max_bytes and stats.entries == 2
    rebuilt = await cache.get_or_build(adapters[:2], [0.7, 0.3], "cat", 16)
    assert rebuilt.built and rebuilt.path == two.path and entries(root) == {three.key, two.key}
    assert spy.calls.count(two.key) == 2


async def test_the_entry_being_returned_is_never_evicted(tmp_path: Path, adapters: list[AdapterRecord]) -> None:
    cache = MergeCache(tmp_path / "merges", max_bytes=1)  # smaller than any merge
    first = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    assert first.path.is_dir()
    second = await cache.get_or_build(adapters[1:], [0.5, 0.5], "cat", 16)
    assert second.path.is_dir() and not first.path.exists() and cache.stats().evictions == 1


async def test_a_new_cache_over_the_same_directory_finds_old_merges(tmp_path: Path, adapters: list[AdapterRecord],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "merges"
    old = await MergeCache(root, max_bytes=10**9).get_or_build(adapters, [0.5, 0.3, 0.2], "linear", 16)
    spy = BuildSpy(monkeypatch)
    restarted = MergeCache(root, max_bytes=10**9)
    assert restarted.stats().entries == 1 and restarted.stats().bytes == old.size_bytes
    again = await restarted.get_or_build(adapters, [0.5, 0.3, 0.2], "linear", 16)
    assert not again.built and again.path == old.path and again.rank == 4 and spy.calls == []
    assert restarted.stats().hits == 1


async def test_restart_keeps_lru_order_and_applies_a_smaller_budget(tmp_path: Path,
                                                                   adapters: list[AdapterRecord]) -> None:
    root = tmp_path / "merges"
    cache = MergeCache(root, max_bytes=10**9)
    older = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    newer = await cache.get_or_build(adapters[1:], [0.5, 0.5], "cat", 16)
    await asyncio.sleep(0.02)
    await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)  # a hit marks `older` as used (mtime)
    smaller = MergeCache(root, max_bytes=older.size_bytes + newer.size_bytes // 2)
    assert entries(root) == {older.key} and smaller.stats().entries == 1


async def test_a_merge_deleted_behind_the_cache_is_rebuilt(tmp_path: Path, adapters: list[AdapterRecord]) -> None:
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    first = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    for file in first.path.iterdir():
        file.unlink()
    first.path.rmdir()
    again = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    assert again.built and inspect_dir(again.path).rank == 8 and cache.stats().builds == 2


async def test_failures_reach_every_waiter_and_are_retried(tmp_path: Path, adapters: list[AdapterRecord]) -> None:
    broken = tmp_path / "src" / "broken"
    write_lora(broken, rank=4, alpha=8, hidden=32, seed=9)
    bad = record(broken, "broken")
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                '"target_modules": ["q_proj", "v_proj"], '
                                                '"base_model_name_or_path": "tiny-llama", "use_dora": true}')
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    results = await asyncio.gather(*(cache.get_or_build([adapters[0], bad], [0.5, 0.5], "cat", 16)
                                     for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, Unprocessable) and "DoRA" in str(r) for r in results)
    assert cache.stats().failures == 1 and cache.stats().entries == 0
    assert entries(tmp_path / "merges") == set() and not list((tmp_path / "merges" / "tmp").iterdir())
    with pytest.raises(Unprocessable):  # not a cached failure: the next request tries again
        await cache.get_or_build([adapters[0], bad], [0.5, 0.5], "cat", 16)
    assert cache.stats().failures == 2


async def test_invalid_requests_fail_before_the_cache(tmp_path: Path, adapters: list[AdapterRecord]) -> None:
    cache = MergeCache(tmp_path / "merges", max_bytes=10**9)
    with pytest.raises(InvalidRequest, match="valid methods: cat, dare_linear, dare_ties, linear, svd, ties"):
        await cache.get_or_build(adapters[:2], [0.5, 0.5], "task_arithmetic", 16)
    with pytest.raises(InvalidRequest, match="density must be a number in"):
        await cache.get_or_build(adapters[:2], [0.5, 0.5], "ties", 16, params={"density": 0})
    with pytest.raises(Unprocessable, match="4 \\+ 4 \\+ 4 = 12"):
        await cache.get_or_build(adapters, [0.4, 0.3, 0.3], "cat", 8)
    assert cache.stats() == merge_cache.MergeCacheStats(0, 0, 0, 0, 0, 0.0, 0, 0)


async def test_cache_entries_skip_fsync_and_a_torn_one_is_dropped_at_startup(
        tmp_path: Path, adapters: list[AdapterRecord], monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges are rebuilt on demand, so they are written without fsync; a crash can tear one, and the
    next process must not hand a truncated file to a worker."""
    spy = BuildSpy(monkeypatch)
    cache = MergeCache(tmp_path / "merges", max_bytes=1 << 30)
    first = await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", max_rank=64)
    second = await cache.get_or_build(adapters[1:], [0.5, 0.5], "cat", max_rank=64)
    assert spy.durable is False
    weights = first.path / WEIGHTS_FILE
    with weights.open("r+b") as handle:  # what an unsynced write looks like after a power cut
        handle.truncate(weights.stat().st_size // 2)
    reopened = MergeCache(tmp_path / "merges", max_bytes=1 << 30)
    assert entries(tmp_path / "merges") == {second.path.name}
    again = await reopened.get_or_build(adapters[:2], [0.5, 0.5], "cat", max_rank=64)
    assert again.built and again.path == first.path and safetensors_intact(again.path / WEIGHTS_FILE)


async def test_startup_scan_survives_entries_another_process_removes(tmp_path: Path, adapters: list[AdapterRecord],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateway processes share the merge dir: one may evict an entry (or sweep a leftover) while another scans."""
    root = tmp_path / "merges"
    first = await MergeCache(root, max_bytes=10**9).get_or_build(adapters, [0.5, 0.3, 0.2], "linear", 16)
    second = await MergeCache(root, max_bytes=10**9).get_or_build(adapters[1:], [0.5, 0.5], "linear", 16)
    (root / "tmp" / "gone").symlink_to(tmp_path / "nowhere")  # stat() of it fails as if just removed
    sizes = store.dir_size

    def evicted_meanwhile(path: Path) -> int:
        if path == first.path:
            raise FileNotFoundError(path)
        return sizes(path)

    monkeypatch.setattr(store, "dir_size", evicted_meanwhile)
    restarted = MergeCache(root, max_bytes=10**9)
    assert restarted.stats().entries == 1 and restarted.stats().bytes == second.size_bytes


def finished_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()


async def test_a_dead_builders_staging_and_trash_are_collected_at_the_next_start(
        tmp_path: Path, adapters: list[AdapterRecord], monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge builds and evictions stage under this process's name (staging.py), so what a crash leaves
    in the cache's staging dir is collected at the next start, not an hour later."""
    from loragate.adapters import merge

    staged: list[Path] = []
    monkeypatch.setattr(merge, "new_dir", lambda root: staged.append(staging.new_dir(root)) or staged[-1])
    trash: list[Path] = []
    monkeypatch.setattr(merge_cache, "remove_all", trash.extend)  # keep evicted dirs, as a crash would
    cache = MergeCache(tmp_path / "merges", max_bytes=1)  # every new merge evicts the previous one
    await cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    await cache.get_or_build(adapters[:2], [0.7, 0.3], "cat", 16)
    await asyncio.sleep(0)
    mine = staging.current_owner().prefix()
    assert len(staged) == 2 and trash and all(p.name.startswith(mine) for p in [*staged, *trash])
    live = staging.new_dir(cache.staging)  # a build in flight in this (live) process
    owner = live.name.split("~")
    dead = finished_pid()
    for path in trash:  # the same leftovers, had their owner been the finished process
        path.rename(cache.staging / "~".join([owner[0], owner[1], dead, owner[3], path.name[len(mine):]]))
    MergeCache(tmp_path / "merges", max_bytes=1)  # the next start, however soon
    assert [p.name for p in cache.staging.iterdir()] == [live.name]


class SharedLock:
    """One asyncio lock per key shared by every cache: what the PostgreSQL advisory lock is across replicas."""

    def __init__(self) -> None:
        self.locks: dict[str, asyncio.Lock] = {}
        self.held: list[str] = []

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        async with self.locks.setdefault(key, asyncio.Lock()):
            self.held.append(key)
            yield


@pytest.fixture(params=["asyncio", "postgresql"])
def build_lock(request: pytest.FixtureRequest) -> Iterator[SharedLock | PostgresDatabase]:
    """The stand-in lock, and the real one: PostgreSQL advisory locks (each holder on its own connection)."""
    if request.param == "asyncio":
        yield SharedLock()
        return
    database = PostgresDatabase(request.getfixturevalue("postgres_url"))
    yield database
    database.close()


async def test_replicas_share_merges_through_the_object_store_and_build_once(
        tmp_path: Path, adapters: list[AdapterRecord], monkeypatch: pytest.MonkeyPatch, s3_server: S3Server,
        build_lock: SharedLock | PostgresDatabase) -> None:
    """The same merge asked of three replicas at once is built by one; the others download it."""
    spy = BuildSpy(monkeypatch, delay=0.2)  # builds overlap the other replicas' requests
    bucket = s3_server.new_bucket()
    remote = ObjectDirs(s3_server.client(), S3Location(bucket, "fleet/merges"))
    lock = SharedLock()
    one, two, four = (MergeCache(tmp_path / name, max_bytes=10**9, remote=remote, locks=build_lock)
                      for name in ("r1", "r2", "r4"))
    first, second, fourth = await asyncio.gather(*(cache.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
                                                   for cache in (one, two, four)))
    assert len(spy.calls) == 1 and [first.built, second.built, fourth.built].count(True) == 1
    assert first.key == second.key == fourth.key
    assert first.path.parent != second.path.parent
    assert {n: (first.path / n).read_bytes() for n in MERGE_FILES} == {n: (second.path / n).read_bytes()
                                                                       for n in MERGE_FILES}
    assert one.stats().downloads + two.stats().downloads + four.stats().downloads == 2
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"fleet/merges/{first.key}/{n}" for n in MERGE_FILES}

    third = MergeCache(tmp_path / "r3", max_bytes=10**9, remote=remote, locks=lock)  # a later replica
    held = len(lock.held)
    found = await third.get_or_build(adapters[:2], [0.5, 0.5], "cat", 16)
    assert not found.built and third.stats().downloads == 1 and len(lock.held) == held  # no lock for a remote hit
    assert inspect_dir(found.path).rank == 8 and len(spy.calls) == 1


async def test_a_corrupt_shared_merge_is_rebuilt_and_replaced(tmp_path: Path, adapters: list[AdapterRecord],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              s3_server: S3Server) -> None:
    spy = BuildSpy(monkeypatch)
    bucket = s3_server.new_bucket()
    remote = ObjectDirs(s3_server.client(), S3Location(bucket, "merges"))
    built = await MergeCache(tmp_path / "r1", max_bytes=10**9, remote=remote).get_or_build(
        adapters[1:], [0.5, 0.5], "linear", 16)
    key = f"merges/{built.key}/{WEIGHTS_FILE}"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"not the merge")
    again = await MergeCache(tmp_path / "r2", max_bytes=10**9, remote=remote).get_or_build(
        adapters[1:], [0.5, 0.5], "linear", 16)
    assert again.built and len(spy.calls) == 2 and safetensors_intact(again.path / WEIGHTS_FILE)
    stored = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == (again.path / WEIGHTS_FILE).read_bytes()  # the shared copy is whole again
