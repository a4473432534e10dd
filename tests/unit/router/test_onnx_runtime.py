"""The default ``minilm`` backend runs an exported ONNX graph: same vectors as torch, exported once, self-checked.

Real models throughout (the packaged all-MiniLM-L6-v2); the graph is exported once into a module-scoped
cache directory. The only fake is a graph runner that returns wrong vectors, to prove the startup check
refuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loragate.errors import LoragateError
from loragate.router import onnx_runtime
from loragate.router.embedder import MiniLMBackend, MiniLMTorchBackend, make_backend

TEXTS = [
    "Who is the wife of Barack Obama?",
    "hi",
    "  Leading and trailing spaces are stripped the same way.  ",
    "Ünïcödé prompts, emoji 🍞 and punctuation?!",
    "Where was the spouse of the author of 'The Old Town' born? " * 40,  # past the 256-token limit: truncated
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="module")
def onnx_backend(cache_dir: Path) -> MiniLMBackend:
    backend = make_backend("minilm", cache_dir=cache_dir)
    assert isinstance(backend, MiniLMBackend)
    return backend


@pytest.fixture(scope="module")
def torch_backend() -> MiniLMTorchBackend:
    backend = make_backend("minilm-torch")
    assert type(backend) is MiniLMTorchBackend
    return backend


def graphs(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.onnx"))


def test_onnx_vectors_equal_torch_vectors(onnx_backend: MiniLMBackend, torch_backend: MiniLMTorchBackend) -> None:
    onnx_vectors, torch_vectors = onnx_backend.encode(TEXTS), torch_backend.encode(TEXTS)
    assert onnx_vectors.dtype == np.float32 and onnx_vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=1e-4)
    # one text alone equals the same text inside a padded batch (the attention mask is honoured)
    np.testing.assert_allclose(onnx_backend.encode([TEXTS[1]])[0], onnx_vectors[1], atol=1e-5)


def test_both_runtimes_share_one_identity(onnx_backend: MiniLMBackend, torch_backend: MiniLMTorchBackend) -> None:
    """Saved descriptor vectors stay valid when a deployment switches runtime: the identity is the model's."""
    assert onnx_backend.identity == torch_backend.identity
    assert onnx_backend.identity.startswith("minilm:")


def test_large_inputs_are_chunked_and_keep_their_order(onnx_backend: MiniLMBackend) -> None:
    texts = [f"prompt {i} " + "word " * (i % 13) for i in range(150)]  # > batch_size, mixed lengths
    vectors = onnx_backend.encode(texts)
    for i in (0, 7, 64, 149):
        np.testing.assert_allclose(vectors[i], onnx_backend.encode([texts[i]])[0], atol=1e-5)
    assert onnx_backend.encode([]).shape == (0, 384)


def test_the_graph_is_exported_once_and_reused(onnx_backend: MiniLMBackend, cache_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    [graph] = graphs(cache_dir)
    assert graph.name.startswith(onnx_backend.identity.rsplit(":", 1)[1])  # named by the model fingerprint
    exports: list[Path] = []
    monkeypatch.setattr(onnx_runtime, "export", lambda model, path: exports.append(path))
    again = MiniLMBackend(cache_dir=cache_dir)
    assert exports == []  # loaded from the cache, not exported again
    np.testing.assert_allclose(again.encode(TEXTS[:2]), onnx_backend.encode(TEXTS[:2]), atol=1e-6)


def test_a_torn_graph_file_is_exported_again(tmp_path: Path, onnx_backend: MiniLMBackend, cache_dir: Path) -> None:
    [graph] = graphs(cache_dir)
    torn = tmp_path / graph.name
    torn.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    backend = MiniLMBackend(cache_dir=tmp_path)
    assert torn.stat().st_size == graph.stat().st_size  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file behind
    np.testing.assert_allclose(backend.encode(TEXTS[:2]), onnx_backend.encode(TEXTS[:2]), atol=1e-6)


def test_an_unwritable_cache_falls_back_to_the_temp_dir(tmp_path: Path, onnx_backend: MiniLMBackend,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setattr(onnx_runtime.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    backend = MiniLMBackend(cache_dir=blocker / "embedders")
    [graph] = (tmp_path / "tmp").rglob("*.onnx")
    assert graph.parent.name.startswith("loragate-embedders-")
    np.testing.assert_allclose(backend.encode(TEXTS[:2]), onnx_backend.encode(TEXTS[:2]), atol=1e-6)


def test_a_graph_that_disagrees_with_the_model_is_refused(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = onnx_runtime.OnnxEncoder.__call__

    def shuffled(self: onnx_runtime.OnnxEncoder, texts: list[str]) -> np.ndarray:
        return np.roll(wrong(self, texts), 1, axis=1)  # a graph computing something else

    monkeypatch.setattr(onnx_runtime.OnnxEncoder, "__call__", shuffled)
    with pytest.raises(LoragateError, match="disagrees with the model") as info:
        MiniLMBackend(cache_dir=cache_dir)
    assert "minilm-torch" in info.value.message  # the message names the way out


def test_the_direct_tokenizer_gives_the_models_own_token_arrays(onnx_backend: MiniLMBackend) -> None:
    """The Rust tokenizer called directly must feed the graph exactly what the model's preprocessing would, on
    every labelled routing prompt, one at a time and as one padded batch (else routing vectors would move)."""
    from bench.labelled import load_splits

    encoder = onnx_backend._onnx
    assert encoder.direct
    texts = [p.prompt for split in load_splits().values() for p in split.prompts]
    for batch in [*([t] for t in texts[::7]), texts[:64]]:
        want, got = encoder._preprocessed(batch), encoder._features(batch)
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_a_tokenizer_that_disagrees_on_the_probes_falls_back_to_preprocessing(
        onnx_backend: MiniLMBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(onnx_runtime._TOKEN_ARRAYS, "attention_mask", "type_ids")  # a wrong mask
    encoder = onnx_runtime.OnnxEncoder(onnx_backend._model, onnx_backend._onnx._graph)
    assert not encoder.direct
    np.testing.assert_array_equal(encoder(["a prompt"]), onnx_backend._onnx(["a prompt"]))
