"""S3Store against a real S3-protocol server (moto, tests/s3.py): upload verified, another replica with an
empty disk materializes the same content, corruption refused and not cached, a bounded LRU cache, garbage
collection with a grace period, and one download for concurrent requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loragate.adapters import objectstore
from loragate.adapters.objectstore import S3Location, S3Store, StoreError, open_store
from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.errors import ConfigError
from tests.lora_files import write_lora
from tests.s3 import REGION, S3Server

Replica = Callable[..., S3Store]


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def replica(s3_server: S3Server, bucket: str, tmp_path: Path) -> Replica:
    """A new S3Store on the shared bucket with its own (empty) local dir: another replica on another host."""
    count = iter(range(100))

    def make(cache_bytes: int = 10**9, grace_s: float = 3600.0) -> S3Store:
        return S3Store(tmp_path / f"replica{next(count)}" / "adapters", s3_server.client(),
                       S3Location(bucket, "fleet"), cache_bytes=cache_bytes, grace_s=grace_s)

    return make


def staged_lora(store: AdapterStore, tmp_path: Path, seed: int, hidden: int = 32) -> tuple[Path, str, int]:
    """A LoRA staged in ``store`` as a registration would leave it: (staged dir, sha256, bytes)."""
    source = write_lora(tmp_path / f"src{seed}-{hidden}", rank=4, hidden=hidden, seed=seed)
    staged = store.stage_copy([source / n for n in ADAPTER_FILES])
    sha, size = AdapterStore.content_hash(staged)
    return staged, sha, size


def object_bytes(client: Any, bucket: str, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


async def test_commit_uploads_verified_and_another_replica_materializes(
        replica: Replica, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    first, second = replica(), replica()
    staged, sha, _ = staged_lora(first, tmp_path, seed=1)
    expected = {n: (staged / n).read_bytes() for n in ADAPTER_FILES}
    path, created = await asyncio.to_thread(first.commit, staged, sha)
    assert created and path == first.path_for(sha) and not staged.exists()
    client = s3_server.client()
    for name, data in expected.items():  # in the bucket under the content address, byte for byte
        assert object_bytes(client, bucket, f"fleet/adapters/{sha}/{name}") == data
        head = client.head_object(Bucket=bucket, Key=f"fleet/adapters/{sha}/{name}")
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert await first.materialize(sha) == path and first.downloads == 0  # its own commit is cached

    assert not second.path_for(sha).exists()
    local = await second.materialize(sha)
    assert local == second.path_for(sha) and local.parent != path.parent
    assert {n: (local / n).read_bytes() for n in ADAPTER_FILES} == expected
    assert second.downloads == 1 and AdapterStore.content_hash(local)[0] == sha
    assert await second.materialize(sha) == local and second.downloads == 1  # a hit

    again, _, _ = staged_lora(second, tmp_path, seed=1)  # the same content registered on the other replica
    assert await asyncio.to_thread(second.commit, again, sha) == (local, False)


async def test_a_corrupted_object_is_refused_and_not_cached(replica: Replica, s3_server: S3Server, bucket: str,
                                                           tmp_path: Path) -> None:
    first, second = replica(), replica()
    staged, sha, _ = staged_lora(first, tmp_path, seed=2)
    await asyncio.to_thread(first.commit, staged, sha)
    key = f"fleet/adapters/{sha}/adapter_model.safetensors"
    client = s3_server.client()
    tampered = bytearray(object_bytes(client, bucket, key))
    tampered[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(tampered))
    with pytest.raises(StoreError) as refused:
        await second.materialize(sha)
    assert f"s3://{bucket}/{key}" in refused.value.message and refused.value.code == "object_corrupt"
    assert refused.value.status == 502
    assert not second.path_for(sha).exists() and sha not in second.cache
    assert list(second.staging.iterdir()) == []  # the download's staging dir went too
    # forged metadata does not help: the dir's content hash must still equal its address
    client.put_object(Bucket=bucket, Key=key, Body=bytes(tampered),
                      Metadata={"sha256": hashlib.sha256(tampered).hexdigest()})
    with pytest.raises(StoreError, match="not its address"):
        await second.materialize(sha)
    assert not second.path_for(sha).exists()


async def test_a_missing_object_names_its_key(replica: Replica, s3_server: S3Server, bucket: str,
                                              tmp_path: Path) -> None:
    first, second = replica(), replica()
    staged, sha, _ = staged_lora(first, tmp_path, seed=3)
    await asyncio.to_thread(first.commit, staged, sha)
    s3_server.client().delete_object(Bucket=bucket, Key=f"fleet/adapters/{sha}/adapter_config.json")
    with pytest.raises(StoreError, match=f"adapters/{sha}/adapter_config.json is missing"):
        await second.materialize(sha)


async def test_the_local_cache_is_bounded_by_bytes_least_recently_used_first(
        replica: Replica, tmp_path: Path) -> None:
    writer = replica()
    shas = []
    for seed in range(3):
        staged, sha, size = staged_lora(writer, tmp_path, seed=10 + seed)
        await asyncio.to_thread(writer.commit, staged, sha)
        shas.append((sha, size))
    assert len({size for _, size in shas}) == 1
    size = shas[0][1]
    reader = replica(cache_bytes=2 * size)  # room for two
    await reader.materialize(shas[0][0])
    await reader.materialize(shas[1][0])
    await reader.materialize(shas[0][0])  # a hit: the first is now the most recently used
    await reader.materialize(shas[2][0])  # evicts the second
    assert reader.path_for(shas[0][0]).is_dir() and reader.path_for(shas[2][0]).is_dir()
    assert not reader.path_for(shas[1][0]).exists()
    assert (reader.cache.entries, reader.cache.bytes, reader.cache.evictions) == (2, 2 * size, 1)
    assert reader.downloads == 3

    tiny = replica(cache_bytes=1)  # smaller than one entry: the one being returned is still kept
    path = await tiny.materialize(shas[1][0])
    assert path.is_dir() and AdapterStore.content_hash(path)[0] == shas[1][0]
    restarted = S3Store(reader.root, reader.objects.client, reader.location, cache_bytes=2 * size)
    assert restarted.cache.entries == 2  # the local dir is the index across restarts
    assert await restarted.materialize(shas[2][0]) == reader.path_for(shas[2][0]) and restarted.downloads == 0


async def test_garbage_collection_spares_referenced_and_recent_objects(
        replica: Replica, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = replica()
    kept_staged, kept, _ = staged_lora(store, tmp_path, seed=20)
    gone_staged, gone, _ = staged_lora(store, tmp_path, seed=21)
    for staged, sha in ((kept_staged, kept), (gone_staged, gone)):
        await asyncio.to_thread(store.commit, staged, sha)
    client = s3_server.client()

    def keys() -> set[str]:
        return {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="fleet/").get("Contents", [])}

    removed = await asyncio.to_thread(store.collect_garbage, {kept})  # within the grace period: objects stay
    assert gone in removed and not store.path_for(gone).exists() and gone not in store.cache  # the local copy went
    assert {f"fleet/adapters/{sha}/{n}" for sha in (kept, gone) for n in ADAPTER_FILES} <= keys()

    store.grace_s = -60.0  # as if the unreferenced upload were older than the grace period
    removed = await asyncio.to_thread(store.collect_garbage, {kept})
    assert removed == [f"s3://{bucket}/fleet/adapters/{gone}/"]
    assert keys() == {f"fleet/adapters/{kept}/{n}" for n in ADAPTER_FILES}
    assert store.path_for(kept).is_dir()

    await asyncio.to_thread(store.remove, kept)
    assert keys() == set() and not store.path_for(kept).exists() and kept not in store.cache


async def test_concurrent_materialize_of_one_sha_shares_one_download(
        replica: Replica, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = replica()
    staged, sha, _ = staged_lora(writer, tmp_path, seed=30)
    await asyncio.to_thread(writer.commit, staged, sha)
    reader = replica()
    gate = threading.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    real = objectstore.ObjectDirs.download

    def held_download(self: objectstore.ObjectDirs, name: str, files: Any, into: Path) -> None:
        calls.append(threading.get_ident())
        loop.call_soon_threadsafe(started.set)
        assert gate.wait(30), "the test never released the download"
        real(self, name, files, into)

    monkeypatch.setattr(objectstore.ObjectDirs, "download", held_download)
    waiters = [asyncio.create_task(reader.materialize(sha)) for _ in range(5)]
    await started.wait()  # the download started; every other caller is queued behind it
    waiters[0].cancel()  # one caller giving up does not cancel the others' download
    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert set(results) == {reader.path_for(sha)} and len(calls) == 1 and reader.downloads == 1
    assert calls[0] != threading.get_ident()  # downloaded off the event loop's thread
    assert waiters[0].cancelled()


async def test_open_store_is_local_by_default_and_checks_the_bucket(s3_server: S3Server, bucket: str,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from loragate.server.settings import Settings

    local = open_store(tmp_path, Settings(data_dir=tmp_path))
    assert type(local) is AdapterStore and local.root == tmp_path / "adapters"
    sha = "0" * 64
    assert await local.materialize(sha) == local.path_for(sha)  # no lookup, no thread hop

    for name, value in (("AWS_ENDPOINT_URL", s3_server.endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)  # boto3's environment chain, no s3_* settings
    remote = open_store(tmp_path, Settings(data_dir=tmp_path, store_url=f"s3://{bucket}/p/"))
    assert isinstance(remote, S3Store) and remote.location == S3Location(bucket, "p")
    assert remote.objects.key(sha, "x") == f"p/adapters/{sha}/x"
    with pytest.raises(ConfigError, match="store_url s3://no-such-bucket-here: the bucket cannot be reached"):
        open_store(tmp_path, Settings(data_dir=tmp_path, store_url="s3://no-such-bucket-here"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    settings = Settings(data_dir=tmp_path, store_url=f"s3://{bucket}", s3_endpoint_url=s3_server.endpoint,
                        s3_region=REGION, s3_access_key_id="testing", s3_secret_access_key="testing")
    assert os.environ.get("AWS_ENDPOINT_URL") is None and isinstance(open_store(tmp_path, settings), S3Store)
