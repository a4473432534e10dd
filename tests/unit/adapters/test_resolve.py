"""Resolving a decision: base -> nothing to load, one adapter as registered, several -> a cached merge."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loragate.adapters.merge_cache import MergeCache
from loragate.adapters.objectstore import S3Location, S3Store
from loragate.adapters.peft_format import inspect_dir
from loragate.adapters.registry import AdapterRegistry, RegistryLimits
from loragate.adapters.resolve import Resolver
from loragate.adapters.store import AdapterStore
from loragate.adapters.types import Descriptors
from loragate.errors import NotFound
from tests.lora_files import write_lora
from tests.s3 import S3Server


@dataclass(frozen=True)
class Weight:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Choice:
    adapters: tuple[Weight, ...] = ()
    method: str | None = None
    merge_params: dict[str, str | int | float | bool] = field(default_factory=dict)


@pytest.fixture
async def resolver(tmp_path: Path) -> Resolver:
    limits = RegistryLimits(base_models=frozenset({"tiny-llama"}), max_rank=64, max_bytes=10**9,
                            import_roots=(tmp_path,))
    registry = AdapterRegistry.open(tmp_path / "data", limits)
    for seed, name in enumerate(("alpha", "beta")):
        await registry.add_from_path(name, write_lora(tmp_path / name, rank=8, seed=seed), Descriptors())
    return Resolver(registry, MergeCache(tmp_path / "merges", max_bytes=10**9), default_method="cat", max_rank=64)


async def test_base_and_single_adapters(resolver: Resolver) -> None:
    assert await resolver.resolve(Choice()) is None
    single = await resolver.resolve(Choice((Weight("alpha"),)))
    assert single is not None and single.name == "alpha" and single.method is None and single.merge_s == 0.0
    with pytest.raises(NotFound):
        await resolver.resolve(Choice((Weight("ghost"),)))


async def test_a_merge_is_built_once_then_found(resolver: Resolver) -> None:
    choice = Choice((Weight("alpha", 0.5), Weight("beta", 0.5)))  # no method: the configured default
    built = await resolver.resolve(choice)
    again = await resolver.resolve(choice)
    assert built is not None and again is not None
    assert (built.method, built.built, again.built) == ("cat", True, False) and built.name == again.name
    assert built.path.startswith(str(resolver.merges.root)) and built.merge_s > 0 and built.build_s > 0


async def test_merge_parameters_reach_the_cache_key_and_come_back_canonical(resolver: Resolver) -> None:
    pair = (Weight("alpha", 0.5), Weight("beta", 0.5))
    ties = await resolver.resolve(Choice(pair, "ties", {"density": 0.5}))
    named = await resolver.resolve(Choice(pair, "ties", {"density": 0.5, "majority": "total"}))
    other = await resolver.resolve(Choice(pair, "ties", {"density": 0.25}))
    assert ties is not None and named is not None and other is not None
    assert ties.method == "ties" and dict(ties.params) == {"density": 0.5, "majority": "total"}
    assert named.name == ties.name and not named.built  # the default, named or not, is one merge
    assert other.name != ties.name and other.built


async def test_an_object_store_replica_serves_and_merges_from_its_own_downloads(tmp_path: Path,
                                                                                s3_server: S3Server) -> None:
    """Registered through one replica's store; another replica (its own disk, the same rows) resolves the
    adapter to files it downloaded, and a merge reads its inputs from there: the writer's disk is gone."""
    limits = RegistryLimits(base_models=frozenset({"tiny-llama"}), max_rank=64, max_bytes=10**9,
                            import_roots=(tmp_path,))
    bucket = s3_server.new_bucket()

    def store(replica: str) -> S3Store:
        return S3Store(tmp_path / replica / "adapters", s3_server.client(), S3Location(bucket, "p"),
                       cache_bytes=10**9)

    writer = AdapterRegistry.open(tmp_path / "shared", limits, store=store("writer"))
    for seed, name in enumerate(("alpha", "beta")):
        await writer.add_from_path(name, write_lora(tmp_path / name, rank=8, seed=seed), Descriptors())
    shutil.rmtree(tmp_path / "writer")
    reader_store = store("reader")
    reader = Resolver(AdapterRegistry.open(tmp_path / "shared", limits, store=reader_store),
                      MergeCache(tmp_path / "reader" / "merges", max_bytes=10**9), default_method="cat", max_rank=64)
    single = await reader.resolve(Choice((Weight("alpha"),)))
    sha = writer.get("alpha").sha256
    assert single is not None and single.path == str(reader_store.path_for(sha))
    assert AdapterStore.content_hash(Path(single.path))[0] == sha
    merged = await reader.resolve(Choice((Weight("alpha", 0.5), Weight("beta", 0.5))))
    assert merged is not None and merged.built and inspect_dir(Path(merged.path)).rank == 16
    assert reader_store.downloads == 2 and reader_store.path_for(writer.get("beta").sha256).is_dir()
