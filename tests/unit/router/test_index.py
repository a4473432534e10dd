"""The descriptor index: scores, updates without restart, persistence, flat vs HNSW."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from loragate.adapters.types import AdapterRecord, Descriptors
from loragate.router.index import AdapterVectors, DescriptorIndex, build_snapshot, centroids, stable_id
from loragate.router.search import IndexSearcher, Tier

DIM = 16


class HashEncoder:
    """Deterministic unit vectors per text; identical texts give identical vectors."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        return np.vstack([vector(t) for t in texts])


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def record(name: str, description: str, *examples: str) -> AdapterRecord:
    return AdapterRecord(name=name, base_model="b", rank=8, alpha=16, target_modules=("q_proj",), use_rslora=False,
                         sha256="0" * 64, path=Path("/x"), size_bytes=1, created_at=0.0,
                         descriptors=Descriptors(description, tuple(examples)))


REGISTRY = {"a": record("a", "alpha things", "first a", "second a"), "b": record("b", "beta things", "only b")}


async def test_scores_are_the_max_over_an_adapters_vectors(tmp_path: Path) -> None:
    index = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate="max")
    await index.sync(REGISTRY)
    found = dict(index.search(vector("second a"), 5))
    assert found["a"] == pytest.approx(1.0, abs=1e-5)
    assert found["b"] < 0.99
    assert index.snapshot().size == 5 and index.snapshot().kind == "flat"


async def test_register_patch_delete_take_effect_without_restart(tmp_path: Path) -> None:
    encoder = HashEncoder()
    index = DescriptorIndex(encoder, tmp_path, "hash", aggregate="max")
    await index.sync(REGISTRY)
    assert index.search(vector("new c"), 1) != (("c", pytest.approx(1.0)),)
    await index.sync({**REGISTRY, "c": record("c", "new c")})
    assert index.search(vector("new c"), 1)[0][0] == "c"
    assert index.embedded_on_last_sync == 1  # only the new adapter was embedded
    await index.sync({**REGISTRY, "c": record("c", "patched c")})
    assert index.search(vector("patched c"), 1)[0][0] == "c"
    await index.sync({"a": REGISTRY["a"]})
    assert {n for n, _ in index.search(vector("only b"), 5)} == {"a"}


async def test_persisted_index_is_reused_and_rebuilt_when_stale(tmp_path: Path) -> None:
    first = HashEncoder()
    await DescriptorIndex(first, tmp_path, "hash", aggregate="max").sync(REGISTRY)
    again = HashEncoder()
    reopened = DescriptorIndex(again, tmp_path, "hash", aggregate="max")
    assert reopened.search(vector("only b"), 1)[0][0] == "b"  # usable before any sync
    await reopened.sync(REGISTRY)
    assert again.texts == 0  # nothing re-embedded
    other_embedder = HashEncoder()
    switched = DescriptorIndex(other_embedder, tmp_path, "another-model", aggregate="max")
    await switched.sync(REGISTRY)
    assert other_embedder.texts == 5  # a different embedder invalidates every vector


async def test_hnsw_above_the_exact_limit_finds_the_same_best(tmp_path: Path) -> None:
    registry = {f"n{i}": record(f"n{i}", f"desc {i}", f"ex {i}") for i in range(200)}
    exact = DescriptorIndex(HashEncoder(), tmp_path / "e", "hash", exact_max=10_000, aggregate="max")
    approx = DescriptorIndex(HashEncoder(), tmp_path / "h", "hash", exact_max=100, aggregate="max")
    await exact.sync(registry)
    await approx.sync(registry)
    assert approx.snapshot().kind == "hnsw" and exact.snapshot().kind == "flat"
    hits = sum(exact.search(vector(f"ex {i}"), 1)[0][0] == approx.search(vector(f"ex {i}"), 1)[0][0]
               for i in range(200))
    assert hits >= 195


def test_stable_ids_do_not_depend_on_order_or_process() -> None:
    assert stable_id("a", 0) == stable_id("a", 0)
    assert stable_id("a", 0) != stable_id("a", 1) != stable_id("b", 0)
    assert 0 <= stable_id("zzz", 3) < 2**63


async def test_the_centroid_aggregate_scores_the_mean_of_an_adapters_vectors(tmp_path: Path) -> None:
    """The default: one normalised mean vector per adapter is indexed and searched, and chain's similarity reads
    the same score; a restart builds the same centroids from the saved descriptor vectors."""
    index = DescriptorIndex(HashEncoder(), tmp_path, "hash")
    await index.sync(REGISTRY)
    mean = np.mean([vector(t) for t in ("alpha things", "first a", "second a")], axis=0)
    mean /= np.linalg.norm(mean)
    query = vector("second a")
    found = dict(index.search(query, 5))
    assert found["a"] == pytest.approx(float(mean @ query), abs=1e-5) and found["a"] < 0.99
    b = vector("beta things") + vector("only b")
    assert found["b"] == pytest.approx(float(b @ query / np.linalg.norm(b)), abs=1e-5)
    assert index.similarity(query, "a") == pytest.approx(found["a"], abs=1e-5)
    assert index.snapshot().size == 2  # one vector per adapter
    reopened = DescriptorIndex(HashEncoder(), tmp_path, "hash")
    assert dict(reopened.search(query, 5)) == pytest.approx(found, abs=1e-6)


def test_a_centroid_snapshot_serves_every_search_path() -> None:
    """Dense, flat FAISS and HNSW answer a centroid snapshot alike (it is a max over one vector per adapter)."""
    registry = {f"n{i}": [vector(f"d {i}"), vector(f"e {i}")] for i in range(300)}
    entries = [AdapterVectors(name, name, np.vstack(vs)) for name, vs in sorted(registry.items())]
    dense = build_snapshot(entries, exact_max=10_000, aggregate="centroid")
    approx = build_snapshot(entries, exact_max=100, aggregate="centroid")
    assert dense.dense is not None and approx.kind == "hnsw" and dense.size == approx.size == 300
    assert [e.vectors.shape for e in centroids(entries[:2])] == [(1, DIM), (1, DIM)]
    np.testing.assert_allclose(np.linalg.norm(dense.dense, axis=1), 1.0, atol=1e-5)
    queries = np.vstack([e.vectors for e in centroids(entries)])
    best_dense = [r[0][0] for r in dense.search_many(queries, 1)]
    best_approx = [r[0][0] for r in approx.search_many(queries, 1)]
    assert sum(a == b for a, b in zip(best_dense, best_approx, strict=True)) >= 290
    assert best_dense == [f"n{i}" for i in sorted(range(300), key=lambda i: f"n{i}")]  # itself, exact


async def test_top2mean_aggregate(tmp_path: Path) -> None:
    index = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate="top2mean")
    await index.sync(REGISTRY)
    score = dict(index.search(vector("second a"), 5))["a"]
    assert score < 0.999  # the mean of the best two is below the exact match


async def test_two_processes_saving_one_dir_never_collide(tmp_path: Path) -> None:
    """Gateway processes share ``<data_dir>/index``: concurrent saves must not trip over each other's files."""
    first = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate="max")
    second = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate="max")
    await first.sync(REGISTRY)
    await second.sync({**REGISTRY, "c": record("c", "gamma things")})
    errors: list[BaseException] = []

    def save_many(index: DescriptorIndex) -> None:
        try:
            for _ in range(200):
                index._save()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=save_many, args=(index,)) for index in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # whichever saved last, vectors match names
    reopened = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate="max")
    assert set(reopened.snapshot().adapters) in ({"a", "b"}, {"a", "b", "c"})
    assert reopened.search(vector("only b"), 1)[0] == ("b", pytest.approx(1.0, abs=1e-5))
    assert os.listdir(tmp_path) == ["index.npz"]  # no temp files left behind


async def test_a_large_exact_index_is_searched_off_the_event_loop(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """From THREAD_MIN_VECTORS flat vectors the router searches (and detects) in a thread; below, inline."""
    from loragate.router import index as index_module
    from loragate.router.compositional import make_detector
    from loragate.router.grammar import parse_policy
    from loragate.router.service import Router

    encoder = HashEncoder()
    index = DescriptorIndex(encoder, tmp_path, "hash", aggregate="max")
    await index.sync(REGISTRY)
    router = Router(parse_policy("base", source="default"),
                    searcher=IndexSearcher(Tier("hash", encoder, index)),  # type: ignore[arg-type]
                    detector=make_detector("segments", "hash"))
    searched_on: list[int] = []
    search = index.search_many

    def recording(queries: np.ndarray, k: int) -> list[tuple[tuple[str, float], ...]]:
        searched_on.append(threading.get_ident())
        return search(queries, k)

    monkeypatch.setattr(index, "search_many", recording)
    spec = parse_policy("select;min_score=-1", source="header")
    assert not index.blocks_loop  # 3 vectors
    assert (await router.decide("first a", spec, REGISTRY)).adapters[0].name == "a"
    assert set(searched_on) == {threading.get_ident()}
    monkeypatch.setattr(index_module, "THREAD_MIN_VECTORS", 3)
    assert index.blocks_loop
    searched_on.clear()
    decision = await router.decide("first a, and then only b", spec, REGISTRY)
    assert decision.adapters[0].name == "a" and decision.search_s > 0
    assert searched_on and threading.get_ident() not in searched_on  # the prompt's and its clauses' (one call)


async def test_similarity_is_one_adapters_score_exactly_even_in_an_hnsw_index(tmp_path: Path) -> None:
    """What ``chain;topic=`` reads: a text against one adapter's own vectors (max, as search scores it), whether
    or not that adapter would be among the nearest."""
    registry = {f"n{i}": record(f"n{i}", f"desc {i}", f"ex {i}") for i in range(200)}
    for kind, exact_max in (("flat", 10_000), ("hnsw", 100)):
        index = DescriptorIndex(HashEncoder(), tmp_path / kind, "hash", exact_max=exact_max, aggregate="max")
        await index.sync(registry)
        assert index.snapshot().kind == kind
        query = vector("ex 7")
        assert index.similarity(query, "n7") == pytest.approx(1.0, abs=1e-5)
        expected = max(float(vector("desc 3") @ query), float(vector("ex 3") @ query))
        assert index.similarity(query, "n3") == pytest.approx(expected, abs=1e-5)
        assert index.similarity(query, "ghost") is None


async def test_the_routers_fit_scores_each_text_against_its_own_adapter(tmp_path: Path) -> None:
    from loragate.router.grammar import PolicySpec
    from loragate.router.service import Router

    encoder = HashEncoder()
    index = DescriptorIndex(encoder, tmp_path, "hash", aggregate="max")
    await index.sync(REGISTRY)
    router = Router(PolicySpec("base"), searcher=IndexSearcher(Tier("hash", encoder, index)))  # type: ignore[arg-type]
    fits = await router.fit(["first a", "first a", "x"], ["a", "b", "ghost"])
    assert fits[0] == pytest.approx(1.0, abs=1e-5) and fits[1] < 0.99 and fits[2] == 0.0
    assert await Router(PolicySpec("base")).fit(["first a"], ["a"]) == [0.0]  # no routing: nothing to add


@pytest.mark.parametrize("aggregate", ["max", "top2mean"])
async def test_searching_many_queries_at_once_ranks_as_one_at_a_time(tmp_path: Path, aggregate: str) -> None:
    """The vectorised per-adapter aggregation agrees with a plain loop over each query's neighbours."""
    registry = {f"n{i:02d}": record(f"n{i:02d}", f"desc {i}", f"ex {i}", f"more {i}") for i in range(20)}
    # 60 vectors: every query sees all of them (depth 64), so top2mean is exact too
    index = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate=aggregate)
    await index.sync(registry)
    snapshot = index.snapshot()
    queries = np.vstack([vector(f"q{i}") for i in range(7)])
    for query, got in zip(queries, index.search_many(queries, 4), strict=True):
        scores = {name: sorted((float(vector(t) @ query) for t in (f"desc {i}", f"ex {i}", f"more {i}")),
                               reverse=True) for i, name in enumerate(sorted(registry))}
        expected = {name: s[0] if aggregate == "max" else (s[0] + s[1]) / 2 for name, s in scores.items()}
        ranked = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
        assert [name for name, _ in got] == [name for name, _ in ranked]
        assert [score for _, score in got] == pytest.approx([score for _, score in ranked], abs=1e-5)
    assert snapshot.search(queries[0], 4, aggregate) == index.search_many(queries[:1], 4)[0]
    assert index.search_many(queries[:0], 4) == []


@pytest.mark.parametrize("aggregate", ["max", "top2mean"])
async def test_an_index_of_many_adapters_ranks_each_querys_neighbours_alone(tmp_path: Path, aggregate: str) -> None:
    """Past 4x the search depth in adapters (here 300, depth 64) no row per adapter is built; the ranking is
    the same as the per-adapter arrays give."""
    registry = {f"m{i:03d}": record(f"m{i:03d}", f"about {i}", f"ask {i}") for i in range(300)}
    index = DescriptorIndex(HashEncoder(), tmp_path, "hash", aggregate=aggregate, exact_max=100)  # HNSW: no dense
    await index.sync(registry)
    snapshot = index.snapshot()
    assert snapshot.kind == "hnsw" and snapshot.dense is None and len(snapshot.names) > 4 * 64
    queries = np.vstack([vector(f"ask {i}") for i in (3, 150, 299)])
    many = index.search_many(queries, 3)
    assert [found[0][0] for found in many] == ["m003", "m150", "m299"]
    scores, ids = snapshot.index.search(queries, 64)
    for found, row_scores, row_ids in zip(many, scores, ids, strict=True):
        assert found == snapshot._ranked_neighbours(row_scores, row_ids, 3, aggregate)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
