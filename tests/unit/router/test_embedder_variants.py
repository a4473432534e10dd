"""The cheaper embedder variants: ``minilm-int8`` (MiniLM's ONNX graph with int8 weights) and ``static-256``.

Real models throughout (the packaged all-MiniLM-L6-v2, exported and quantised once into a module-scoped
cache directory). Vectors are compared with tolerances, never bit for bit across runs of different
graphs; a corrupted graph is a real ONNX file with damaged weights, not a fake runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from loragate.errors import LoragateError
from loragate.router import onnx_runtime
from loragate.router.embedder import (
    ONNX_INT8_MIN_COSINE,
    MiniLMBackend,
    MiniLMInt8Backend,
    Static256Backend,
    StaticBackend,
    backend_names,
    make_backend,
)

TEXTS = [
    "Who is the wife of Barack Obama?",
    "hi",
    "Ünïcödé prompts, emoji 🍞 and punctuation?!",
    "How long should sourdough proof before baking?",
    "Where was the spouse of the author of 'The Old Town' born? " * 40,  # past the 256-token limit
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedder-variants-cache")


@pytest.fixture(scope="module")
def int8(cache_dir: Path) -> MiniLMInt8Backend:
    backend = make_backend("minilm-int8", cache_dir=cache_dir)
    assert isinstance(backend, MiniLMInt8Backend)
    return backend


@pytest.fixture(scope="module")
def fp32(cache_dir: Path, int8: MiniLMInt8Backend) -> MiniLMBackend:
    backend = make_backend("minilm", cache_dir=cache_dir)  # reuses the fp32 graph the int8 one was made from
    assert type(backend) is MiniLMBackend
    return backend


def test_variants_are_registered() -> None:
    assert {"minilm-int8", "static-256"} <= set(backend_names())


def test_static_256_loads_its_shipped_artifact() -> None:
    backend, base = make_backend("static-256"), make_backend("static")
    assert isinstance(backend, Static256Backend) and isinstance(base, StaticBackend)
    vectors = backend.encode(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, backend.encode(TEXTS))
    assert backend.identity.startswith("static-256:") and backend.identity != base.identity
    query, paraphrase, other = backend.encode(["Who is Maren married to?", "Name Maren's husband.", "What is pH?"])
    assert query @ paraphrase > query @ other


def test_int8_rows_are_unit_float32_near_minilm(int8: MiniLMInt8Backend, fp32: MiniLMBackend) -> None:
    vectors = int8.encode(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * fp32.encode(TEXTS), axis=1)
    assert cosines.min() >= ONNX_INT8_MIN_COSINE  # close to fp32, but not equal: that is the point of the bound
    assert int8.encode([]).shape == (0, 384)


def test_int8_ranks_a_paraphrase_first(int8: MiniLMInt8Backend) -> None:
    query, paraphrase, *others = int8.encode(
        ["Who is Maren married to?", "Name the husband of Maren.", "How do I bake rye bread?", "What is pH?"])
    scores = [float(query @ v) for v in (paraphrase, *others)]
    assert scores[0] == max(scores)


def test_int8_has_its_own_identity(int8: MiniLMInt8Backend, fp32: MiniLMBackend) -> None:
    """Different vectors: an index saved with ``minilm`` must be re-embedded, not searched with int8 queries."""
    assert int8.identity != fp32.identity
    assert int8.identity.startswith("minilm-int8:") and int8.identity.endswith(onnx_runtime.INT8_SCHEME)


def test_int8_is_deterministic_and_batch_independent(int8: MiniLMInt8Backend) -> None:
    """Same text, same vector on this machine, whatever else is in the batch (one text per graph run)."""
    np.testing.assert_array_equal(int8.encode(TEXTS), int8.encode(TEXTS))
    alone = np.concatenate([int8.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(int8.encode(TEXTS), alone, atol=1e-6)


def test_the_int8_graph_is_cached_next_to_the_fp32_one(int8: MiniLMInt8Backend, cache_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fingerprint = int8.identity.split(":")[3]
    fp32_graph = onnx_runtime.graph_path(cache_dir, fingerprint)
    int8_graph = onnx_runtime.int8_graph_path(cache_dir, fingerprint)
    assert fp32_graph.is_file() and int8_graph.is_file() and int8_graph.parent == fp32_graph.parent
    assert int8_graph.name.startswith(fp32_graph.stem)  # keyed like the fp32 graph, plus scheme and version
    assert int8_graph.stat().st_size < fp32_graph.stat().st_size / 3
    built: list[Path] = []
    monkeypatch.setattr(onnx_runtime, "quantize", lambda src, path: built.append(path))
    monkeypatch.setattr(onnx_runtime, "export", lambda model, path: built.append(path))
    again = MiniLMInt8Backend(cache_dir=cache_dir)
    assert built == []  # loaded from the cache: neither exported nor quantised again
    np.testing.assert_allclose(again.encode(TEXTS[:2]), int8.encode(TEXTS[:2]), atol=1e-6)


def test_a_torn_int8_graph_is_quantised_again(tmp_path: Path, int8: MiniLMInt8Backend, cache_dir: Path) -> None:
    fingerprint = int8.identity.split(":")[3]
    for path in (onnx_runtime.graph_path(cache_dir, fingerprint), onnx_runtime.int8_graph_path(cache_dir, fingerprint)):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    good = onnx_runtime.int8_graph_path(cache_dir, fingerprint)
    torn = tmp_path / good.name
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    backend = MiniLMInt8Backend(cache_dir=tmp_path)
    assert torn.stat().st_size == good.stat().st_size  # rewritten whole
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file behind
    np.testing.assert_allclose(backend.encode(TEXTS[:2]), int8.encode(TEXTS[:2]), atol=1e-6)


def test_a_graph_with_damaged_weights_is_refused(tmp_path: Path, int8: MiniLMInt8Backend, cache_dir: Path) -> None:
    """A file that loads but computes other vectors (bit rot, a bad copy) fails the startup check."""
    fingerprint = int8.identity.split(":")[3]
    model = onnx.load(str(onnx_runtime.int8_graph_path(cache_dir, fingerprint)))
    rng = np.random.default_rng(0)
    damaged = 0
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.int8 and weights.ndim == 2 and min(weights.shape) >= 384:  # quantised matrices
            init.CopyFrom(numpy_helper.from_array(rng.permutation(weights.ravel()).reshape(weights.shape), init.name))
            damaged += 1
    assert damaged
    onnx.save(model, str(onnx_runtime.int8_graph_path(tmp_path, fingerprint)))
    with pytest.raises(LoragateError, match="disagrees with the model") as info:
        MiniLMInt8Backend(cache_dir=tmp_path)
    assert "embedder=minilm" in info.value.message  # the message names the way out
