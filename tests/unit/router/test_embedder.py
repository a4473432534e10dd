"""Embedder backends (real MiniLM and the shipped static model) and the micro-batching service.

The batching, caching and error tests use a counting fake backend so they can see every backend
call; equality with a direct encode and the ranking checks use the real models (loaded once per
module: MiniLM takes a few seconds, the static model well under one).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from loragate.errors import ConfigError
from loragate.router.embedder import (
    EMBEDDER_BACKENDS,
    MAX_NICE,
    STATIC_MODEL_DIR,
    Embedder,
    EmbedderBackend,
    EmbedderClosed,
    MiniLMBackend,
    StaticBackend,
    Vectors,
    make_backend,
    normalise_rows,
)

ANCHOR = "Who is the wife of Barack Obama?"
PARAPHRASE = "Whom is Barack Obama married to?"
UNRELATED = "How do I bake sourdough bread at home?"


class CountingBackend(EmbedderBackend):
    """Deterministic vectors from a hash of the text; records every call and the thread it ran on."""

    name = "counting"

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.identity = f"counting:{dim}"
        self.calls: list[list[str]] = []
        self.threads: set[int] = set()
        self.fail = False

    def vector(self, text: str) -> Vectors:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return normalise_rows(np.random.default_rng(seed).standard_normal((1, self.dim)))[0]

    def encode(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("backend exploded")
        return np.stack([self.vector(t) for t in texts])


@pytest.fixture(scope="module")
def minilm() -> MiniLMBackend:
    backend = make_backend("minilm")
    assert isinstance(backend, MiniLMBackend)
    return backend


@pytest.fixture(scope="module")
def static() -> StaticBackend:
    backend = make_backend("static")
    assert isinstance(backend, StaticBackend)
    return backend


@pytest.fixture
def fake() -> CountingBackend:
    return CountingBackend()


@pytest.fixture
async def embedder(fake: CountingBackend) -> AsyncIterator[Embedder]:
    service = Embedder(fake, max_batch=32, max_wait_ms=2.0, cache_size=16)
    yield service
    await service.close()


def assert_unit_rows(vectors: np.ndarray, dim: int) -> None:
    assert vectors.dtype == np.float32
    assert vectors.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["minilm", "static"])
def test_real_backend_normalised_and_ranks_paraphrase_first(backend_name: str, request: pytest.FixtureRequest) -> None:
    backend: EmbedderBackend = request.getfixturevalue(backend_name)
    vectors = backend.encode([ANCHOR, PARAPHRASE, UNRELATED])
    assert vectors.shape == (3, backend.dim)
    assert_unit_rows(vectors, backend.dim)
    paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def test_backend_dims_and_identities(minilm: MiniLMBackend, static: StaticBackend) -> None:
    assert minilm.dim == 384
    assert static.dim == 128  # the shipped artifact: pca_dims=128 (router/static_model/README.md)
    assert minilm.identity.startswith("minilm:") and static.identity.startswith("static:")
    assert minilm.identity != static.identity
    assert static.encode([]).shape == (0, 128)


def test_static_default_is_the_shipped_artifact() -> None:
    assert (STATIC_MODEL_DIR / "model.safetensors").is_file()
    assert StaticBackend(STATIC_MODEL_DIR).identity == StaticBackend().identity


async def test_concurrent_embeds_are_micro_batched_off_the_loop(fake: CountingBackend, embedder: Embedder) -> None:
    texts = [f"prompt {i}" for i in range(64)]
    vectors = await asyncio.gather(*(embedder.embed(t) for t in texts))
    assert len(fake.calls) < 64
    assert all(len(batch) <= 32 for batch in fake.calls)
    assert sorted(t for batch in fake.calls for t in batch) == sorted(texts)
    assert embedder.batches == len(fake.calls) and embedder.encoded_texts == 64
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(vector, fake.vector(text))
    assert threading.get_ident() not in fake.threads  # encode never ran on the event loop's thread


async def test_batched_vectors_equal_a_direct_encode(minilm: MiniLMBackend) -> None:
    texts = [f"Question {i}: where was person number {i} born?" for i in range(64)]
    service = Embedder(minilm)
    try:
        vectors = await asyncio.gather(*(service.embed(t) for t in texts))
        assert service.batches < 64
    finally:
        await service.close()
    np.testing.assert_allclose(np.stack(vectors), minilm.encode(texts), atol=1e-5)


async def test_repeat_prompt_is_a_cache_hit(fake: CountingBackend, embedder: Embedder) -> None:
    first = await embedder.embed("same prompt")
    first[:] = 0.0  # the caller owns its copy; the cached vector must not change
    second = await embedder.embed("same prompt")
    assert len(fake.calls) == 1
    assert embedder.cache_hits == 1
    np.testing.assert_array_equal(second, fake.vector("same prompt"))


async def test_cache_is_lru_bounded(fake: CountingBackend) -> None:
    service = Embedder(fake, max_wait_ms=0, cache_size=2)
    try:
        for text in ("a", "b", "a", "c", "a", "b"):  # c evicts b (a was used more recently)
            await service.embed(text)
    finally:
        await service.close()
    assert [t for batch in fake.calls for t in batch] == ["a", "b", "c", "b"]
    assert service.cache_hits == 2


async def test_identical_waiting_prompts_share_one_encode(fake: CountingBackend, embedder: Embedder) -> None:
    vectors = await asyncio.gather(*(embedder.embed("dup") for _ in range(10)))
    assert embedder.encoded_texts == 1 and embedder.coalesced == 9
    assert all(np.array_equal(v, vectors[0]) for v in vectors)


async def test_embed_many_shapes_and_order(fake: CountingBackend, embedder: Embedder) -> None:
    out = await embedder.embed_many(["x", "y", "x"])
    assert out.shape == (3, fake.dim)
    np.testing.assert_array_equal(out[0], fake.vector("x"))
    np.testing.assert_array_equal(out[1], fake.vector("y"))
    np.testing.assert_array_equal(out[2], out[0])
    assert (await embedder.embed_many([])).shape == (0, fake.dim)


async def test_backend_error_reaches_every_waiter_then_recovers(fake: CountingBackend, embedder: Embedder) -> None:
    fake.fail = True
    results = await asyncio.gather(*(embedder.embed(f"doomed {i}") for i in range(10)), return_exceptions=True)
    assert len(fake.calls) == 1  # one batch ...
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)  # ... ten failures
    fake.fail = False
    vector = await embedder.embed("doomed 3")  # failures are not cached; the worker is still alive
    np.testing.assert_array_equal(vector, fake.vector("doomed 3"))
    assert embedder.batches == 2


async def test_cancelled_waiter_does_not_cancel_the_shared_encode(fake: CountingBackend, embedder: Embedder) -> None:
    impatient = asyncio.ensure_future(embedder.embed("shared"))
    patient = asyncio.ensure_future(embedder.embed("shared"))
    await asyncio.sleep(0)
    impatient.cancel()
    np.testing.assert_array_equal(await patient, fake.vector("shared"))
    assert impatient.cancelled()


async def test_close_drains_queued_prompts_then_refuses(fake: CountingBackend) -> None:
    service = Embedder(fake, max_wait_ms=50)
    queued = [asyncio.ensure_future(service.embed(f"q{i}")) for i in range(5)]
    await asyncio.sleep(0)
    await service.close()
    assert all(task.done() and not task.cancelled() for task in queued)
    assert sum(len(batch) for batch in fake.calls) == 5
    with pytest.raises(EmbedderClosed) as info:
        await service.embed("late")
    assert info.value.status == 503
    await service.close()  # idempotent


def test_unknown_backend_is_a_config_error_listing_names() -> None:
    with pytest.raises(ConfigError) as info:
        make_backend("bert-large")
    assert info.value.param == "embedder"  # a startup mistake (was a 400 InvalidRequest)
    assert "bert-large" in info.value.message
    for name in EMBEDDER_BACKENDS:
        assert name in info.value.message


def test_unknown_option_and_missing_dir_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model_dir"):
        make_backend("static", modle_dir="/x")
    with pytest.raises(ConfigError, match="does not exist"):
        make_backend("static", model_dir="/nonexistent/static-model")  # never falls back to the hub


def test_batching_limits_are_bounded(fake: CountingBackend) -> None:
    with pytest.raises(ValueError, match="max_wait_ms"):
        Embedder(fake, max_wait_ms=1000)
    with pytest.raises(ValueError, match="max_batch"):
        Embedder(fake, max_batch=0)


class NicenessBackend(CountingBackend):
    """Records the niceness of the thread each encode runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.niceness: list[int] = []

    def encode(self, texts: Sequence[str]) -> Vectors:
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, 0))  # 0: the calling thread, on Linux
        return super().encode(texts)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
async def test_a_nice_worker_thread_runs_at_lower_priority_and_the_loop_does_not() -> None:
    backend = NicenessBackend()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = Embedder(backend, nice=5)
    plain = Embedder(backend)
    try:
        await nice.embed("a prompt")
        await plain.embed("another prompt")
    finally:
        await nice.close()
        await plain.close()
    assert backend.niceness == [min(base + 5, MAX_NICE), base]
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's thread (the event loop) is untouched
    with pytest.raises(ValueError, match="nice"):
        Embedder(backend, nice=MAX_NICE + 1)


async def test_a_cheap_backend_embeds_inline_with_the_same_cache_and_counters(fake: CountingBackend) -> None:
    """Static tables are cheaper to run than to hand to a thread: inline, one backend call per embed_many,
    the cache and the counters as on the worker path; transformers stay off the loop by default."""
    embedder = Embedder(fake, inline=True)
    vectors = await embedder.embed_many(["a", "b", "a", "c"])
    assert fake.calls == [["a", "b", "c"]] and fake.threads == {threading.get_ident()}
    np.testing.assert_array_equal(vectors[2], fake.vector("a"))
    assert (embedder.batches, embedder.encoded_texts, embedder.coalesced) == (1, 3, 1)
    again = await embedder.embed("b")
    assert fake.calls == [["a", "b", "c"]] and embedder.cache_hits == 1  # from the LRU, no backend call
    again[0] = 99.0  # callers get their own copy
    np.testing.assert_array_equal(await embedder.embed("b"), fake.vector("b"))
    await embedder.close()
    with pytest.raises(EmbedderClosed):
        await embedder.embed_many(["d"])
    assert Embedder(fake).inline is False and StaticBackend.cheap and not MiniLMBackend.cheap


@pytest.mark.parametrize("backend_name", ["static", "static-256"])
def test_static_encode_matches_model2vec(backend_name: str) -> None:
    """The table lookup reads the same vectors model2vec's own ``encode`` makes, for every kind of text the
    router sends: prompts, clauses, single words, no known token, empty, and longer than the model reads."""
    backend = make_backend(backend_name)
    assert isinstance(backend, StaticBackend)
    texts = [ANCHOR, PARAPHRASE, UNRELATED, "dough", "and then the oven", "", "   ", "\u2603\u2603",
             "Z" * 50, " ".join(["knead the bread dough"] * 1200)]
    ours = backend.encode(texts)
    theirs = backend._model.encode(texts, use_multiprocessing=False).astype(np.float32)
    norms = np.linalg.norm(theirs, axis=1, keepdims=True)
    expected = np.divide(theirs, norms, out=np.zeros_like(theirs), where=norms > 0)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), backend.dim)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert not ours[5].any()  # nothing to read: the zero vector, as model2vec gives
