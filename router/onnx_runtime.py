"""A sentence-transformers model as one ONNX graph, run by ONNX Runtime: the same vectors in half the time.

Why: routing embeds every ``select``/``average`` prompt before it can dispatch, so the embedding is the
gateway's own latency. all-MiniLM-L6-v2 takes ~14 ms for one prompt through sentence-transformers on
one CPU thread here and ~7 ms as an ONNX Runtime graph (MLAS kernels, fused ops, no per-layer Python),
with vectors equal to within float32 rounding (cosine >= 0.99999).

An int8 variant (:func:`load_or_quantize`, the ``minilm-int8`` backend) is the same graph with its
weights dynamically quantised by ONNX Runtime: ~2.8x faster again for one prompt, but the vectors
move (per-tensor int8: cosine 0.87 worst on the labelled routing prompts; per-channel int8, the scheme
used: 0.976 worst, 0.994 mean), so it is judged by routing accuracy, not by cosine, and is not the default.

The graph is exported from the loaded model at first start (about a second) and cached as a file named
by the model's fingerprint and the exporter's versions, so later starts only load it. The whole
pipeline is exported, pooling and normalisation included (whatever modules the model directory
declares), and the caller checks the graph's output against the torch model's before trusting it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from loragate.files import replaced_atomically

if TYPE_CHECKING:
    import onnxruntime
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
"""Bumped when the exported graph's inputs, outputs or wrapper change, so old cache files are not reused."""

OPSET = 17


def default_cache_dir() -> Path:
    """Per-user cache for exported graphs (``$XDG_CACHE_HOME/loragate/embedders``), unless ``embedder_cache_dir``
    names another: one export serves every gateway, test and benchmark of this user."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loragate" / "embedders"


def graph_path(cache_dir: Path, fingerprint: str) -> Path:
    """The cache file for one model: its fingerprint plus the versions that shape the exported graph."""
    import onnx
    import torch

    versions = f"t{torch.__version__}-o{onnx.__version__}-op{OPSET}-f{EXPORT_FORMAT}".replace("+", "_")
    return cache_dir / f"{fingerprint}-{versions}.onnx"


def export(model: SentenceTransformer, path: Path) -> None:
    """Write ``model``'s whole pipeline (tokens in, sentence embedding out) to ``path`` atomically.

    Written to a temporary file in the same directory and renamed, so a concurrent start (two gateway
    processes, parallel tests) never reads a half-written graph and the last writer simply wins.
    """
    import torch

    features = {k: v for k, v in model.preprocess(["probe text", "a second, longer probe text"]).items()
                if isinstance(v, torch.Tensor)}
    names = list(features)

    class Pipeline(torch.nn.Module):
        """Positional inputs in ``names`` order -> the model's ``sentence_embedding`` output."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.model(dict(zip(names, inputs, strict=True)))["sentence_embedding"]
            return out

    dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
    with replaced_atomically(path) as tmp, warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes (checked after)
        torch.onnx.export(Pipeline().eval(), tuple(features[n] for n in names), str(tmp), dynamo=False,
                          input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes={**dynamic, "sentence_embedding": {0: "batch"}}, opset_version=OPSET)


def session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads that do not spin when idle.

    Spinning threads would take a core from the event loop and the proxy between prompts.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per core
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_or_build(path: Path, build: Callable[[Path], None], threads: int | None
                   ) -> tuple[onnxruntime.InferenceSession, Path]:
    """``path``'s session, building the file first if it is missing or does not load (a torn file).

    Returns the path actually used: a cache that cannot be written (read-only home, a file in the
    way) must not stop the gateway, so the file is then built in a per-user temp directory instead.
    """
    if path.is_file():
        try:
            return session(path, threads), path
        except Exception as exc:  # a corrupt cache entry is rebuilt, not fatal
            log.warning("embedder graph %s does not load (%s); building it again", path, exc)
    log.info("building the embedding graph %s (once per model and version)", path)
    try:
        build(path)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"loragate-embedders-{os.getuid()}" / path.name
        log.warning("cannot write %s (%s); building it at %s instead", path, exc, fallback)
        build(fallback)
        path = fallback
    return session(path, threads), path


def load_or_export(model: SentenceTransformer, cache_dir: Path, fingerprint: str,
                   threads: int | None) -> onnxruntime.InferenceSession:
    """The cached graph's session, exporting it first if it is missing or does not load (a torn file)."""
    return _load_or_build(graph_path(cache_dir, fingerprint), lambda path: export(model, path), threads)[0]


INT8_SCHEME = "s8pc"
"""Weights int8 (signed), one scale per output channel; activations quantised per call (dynamic).

Measured on the 200 labelled routing prompts against the fp32 graph (cosine worst / mean, one prompt
on one thread): per-tensor int8 0.869 / 0.965, 2.3 ms; per-tensor uint8 0.925 / 0.983, 8.1 ms (no
VNNI fast path); per-channel uint8 0.972 / 0.994, 3.5 ms; per-channel int8 0.976 / 0.994, 2.0 ms;
``reduce_range`` 0.58 worst. fp32: 5.6 ms. Bump the name when the settings change: it keys the cache
file and the backend's identity.
"""


def int8_graph_path(cache_dir: Path, fingerprint: str) -> Path:
    """The quantised graph's cache file: the fp32 file's key plus the scheme and the quantiser's version."""
    import onnxruntime as ort

    fp32 = graph_path(cache_dir, fingerprint)
    return fp32.with_name(f"{fp32.stem}-{INT8_SCHEME}-ort{ort.__version__}".replace("+", "_") + ".onnx")


def quantize(fp32: Path, path: Path) -> None:
    """Write the int8 (:data:`INT8_SCHEME`) version of the graph at ``fp32`` to ``path``, atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with replaced_atomically(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)


def load_or_quantize(model: SentenceTransformer, cache_dir: Path, fingerprint: str,
                     threads: int | None) -> onnxruntime.InferenceSession:
    """The cached int8 graph's session; quantised from the fp32 graph (exported first if need be) when the
    int8 file is missing or torn. The fp32 graph is only read, so it is loaded only when quantising."""

    def build(path: Path) -> None:
        _, fp32 = _load_or_build(graph_path(cache_dir, fingerprint), lambda p: export(model, p), 1)
        quantize(fp32, path)

    return _load_or_build(int8_graph_path(cache_dir, fingerprint), build, threads)[0]


TOKENIZER_PROBES = ("warm-up", "  Mixed CASE,  spaces\tand tabs  ", "Who is the spouse of the mother of Alice?",
                    "Émile's naïve café, 3.5 km away? " * 40, "")
"""Texts the direct tokenizer must tokenize exactly as the model's own preprocessing does before it is used:
accents, case, odd whitespace, an empty text, and one past the model's ``max_seq_length`` (truncation)."""

Features = Mapping[str, npt.NDArray[np.int64]]


class OnnxEncoder:
    """Tokenise as the model does, run the graph, return the embeddings.

    The model's own ``preprocess`` goes through transformers' tokenizer wrappers and torch tensors: a few
    hundred microseconds of Python per call, on the embedder's worker thread, where every step needs the
    GIL that the event loop holds while it serves requests (measured with a busy Python thread beside it:
    3.9 ms of CPU per prompt through ``preprocess``, 2.8 ms calling the Rust tokenizer directly). So the
    model's Rust tokenizer is called directly, with the model's truncation, when it gives the same ids
    as ``preprocess`` on :data:`TOKENIZER_PROBES`; otherwise (another tokenizer, another pipeline)
    ``preprocess`` is used as before.
    """

    def __init__(self, model: SentenceTransformer, graph: onnxruntime.InferenceSession) -> None:
        self._preprocess = model.preprocess
        self._graph = graph
        self._inputs = [i.name for i in graph.get_inputs()]
        direct = self._direct_tokenizer(model)
        self.direct = direct is not None
        self._features: Callable[[Sequence[str]], Features] = direct or self._preprocessed

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = self._graph.run(["sentence_embedding"], dict(self._features(texts)))[0]
        return np.asarray(out, dtype=np.float32)

    def _preprocessed(self, texts: Sequence[str]) -> Features:
        features: Mapping[str, Any] = self._preprocess(list(texts))
        return {name: features[name].numpy() for name in self._inputs}

    def _direct_tokenizer(self, model: SentenceTransformer) -> Callable[[Sequence[str]], Features] | None:
        backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        max_length = getattr(model, "max_seq_length", None)
        if backend is None or not max_length or not set(self._inputs) <= _TOKEN_ARRAYS.keys():
            return None
        tokenizer = type(backend).from_str(backend.to_str())  # a copy: the model's own keeps its settings
        tokenizer.enable_truncation(max_length)
        tokenizer.no_padding()
        inputs = self._inputs
        read = [(name, _TOKEN_ARRAYS[name]) for name in inputs]

        def features(texts: Sequence[str]) -> Features:
            encoded = tokenizer.encode_batch(list(texts))
            width = max(len(e.ids) for e in encoded)
            arrays = {name: np.zeros((len(encoded), width), dtype=np.int64) for name in inputs}
            for row, encoding in enumerate(encoded):
                for name, attribute in read:
                    values = getattr(encoding, attribute)
                    arrays[name][row, :len(values)] = values
            return arrays

        probes = list(TOKENIZER_PROBES)
        for batch in [*([p] for p in probes), probes]:
            want, got = self._preprocessed(batch), features(batch)
            if any(want[name].shape != got[name].shape or not np.array_equal(want[name], got[name])
                   for name in inputs):
                log.info("the model's tokenizer called directly differs from its preprocessing; using the latter")
                return None
        return features


_TOKEN_ARRAYS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
"""The graph's token inputs and the ``tokenizers.Encoding`` attribute each is read from."""
