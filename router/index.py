"""The descriptor index: FAISS inner-product search over every adapter's descriptor vectors.

Each adapter contributes one vector for its description and one per example prompt. Vectors are
L2-normalised, so inner product is cosine similarity. An adapter's score for a prompt is the cosine to
its centroid (the normalised mean of its vectors), or the max (or the mean of the best two) over its
vectors among the nearest ones found.

The centroid is the default (``index_aggregate``). With the max, one example written broadly (a "hub":
"How do I delete duplicate rows in PostgreSQL but keep one of each?") is nearest to prompts of other
domains and wins them; the mean of an adapter's examples is where its topic is. Measured on both
labelled sets (docs/BENCHMARKS.md, "Semantic routing"): static-256 alone 90.0% -> 95.8% nearest = label
on the training split and 71.7% -> 90.8% held out, minilm-int8 98.3% / 93.3% -> 96.7% / 97.5%. A centroid
snapshot indexes one vector per adapter, so every search path below serves it as a max over one vector.

Concurrency model: the FAISS index and its id -> adapter map are wrapped in an immutable
:class:`IndexSnapshot`. Updates (register/patch/delete) build a new snapshot off the event loop and
swap it in, so searches never see a half-updated index and never take a lock. Ids are stable: a
hash of (adapter name, descriptor position), the same across rebuilds and processes.

Persistence: vectors and a fingerprint of (embedder, descriptors) per adapter are saved as one
file in the data dir, which every gateway process of a deployment shares. At startup, adapters
whose fingerprint matches are not re-embedded, so a restart with an unchanged registry embeds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import numpy.typing as npt

from loragate.adapters.types import AdapterRecord
from loragate.errors import ConfigError
from loragate.files import replaced_atomically
from loragate.router.embedder import normalise_rows

Vectors = npt.NDArray[np.float32]
#: The saved index in its directory: vectors plus the names and fingerprints they belong to.
INDEX_FILE = "index.npz"
CENTROID = "centroid"
AGGREGATES = (CENTROID, "max", "top2mean")

THREAD_MIN_VECTORS = 10_000
"""Exact (flat) searches over at least this many vectors run in a thread, off the event loop.

Measured on this 2-core Xeon (384-d, one OpenMP thread): a flat search takes 0.12 ms over 1k
vectors, 0.67 ms over 5k, 2.0 ms over 20k and 4.8 ms over 50k (``index_exact_max``); a thread hop
(``asyncio.to_thread``) costs about 40 us. From 10k vectors a search would stall every other
request for a millisecond or more, and the hop adds under 5% to it; below, the stall is under a
millisecond and the hop a larger share of it, so small indexes are searched inline. HNSW (above
``index_exact_max``) answers in ~0.1 ms at any size and stays inline. FAISS releases the GIL
while it searches, so the loop runs meanwhile."""


DENSE_MAX_VECTORS = 4096
"""Indexes up to this many vectors also keep them as one matrix (6 MB at 384-d): a routed request searches
its prompt and the detector's dozen texts with one matrix product and a per-adapter ``reduceat``, exact,
in ~20 us, where FAISS plus gathering each query's neighbours per adapter took ~200 us."""


class TextEncoder(Protocol):
    """What the index needs from the embedder."""

    async def embed_many(self, texts: Sequence[str]) -> Vectors: ...


def descriptor_texts(record: AdapterRecord) -> list[str]:
    """The texts an adapter is found by: its description (if any) and each example prompt."""
    texts = [record.descriptors.description] if record.descriptors.description.strip() else []
    return texts + [e for e in record.descriptors.examples if e.strip()]


def fingerprint(record: AdapterRecord, embedder_id: str) -> str:
    payload = json.dumps([embedder_id, descriptor_texts(record)])
    return hashlib.sha256(payload.encode()).hexdigest()


def stable_id(name: str, position: int) -> int:
    """A 63-bit id from (name, position): stable across rebuilds, processes and restarts."""
    digest = hashlib.blake2b(f"{name}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class AdapterVectors:
    name: str
    fingerprint: str
    vectors: Vectors


@dataclass(frozen=True)
class IndexSnapshot:
    """An immutable searchable view: FAISS index + id -> adapter name.

    ``names`` (sorted) and ``ids``/``id_owner`` (the vector ids, sorted, and the position in ``names`` of each
    one's adapter) let :meth:`search_many` turn FAISS's neighbour ids into per-adapter scores with numpy
    rather than a Python loop over every neighbour of every text.
    """

    index: faiss.Index | None
    owners: Mapping[int, str]
    kind: str  # "flat" | "hnsw" | "empty"
    size: int = 0
    adapters: frozenset[str] = field(default_factory=frozenset)
    names: tuple[str, ...] = ()
    ids: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    id_owner: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    dense: Vectors | None = None  # every vector, grouped by adapter in ``names`` order (small indexes only)
    starts: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))  # each group's first row

    def search(self, query: Vectors, k: int, aggregate: str = "max") -> tuple[tuple[str, float], ...]:
        """The best ``k`` adapters for one normalised query vector, best first, with their scores."""
        return self.search_many(query.reshape(1, -1), k, aggregate)[0]

    def search_many(self, queries: Vectors, k: int, aggregate: str = "max") -> list[tuple[tuple[str, float], ...]]:
        """:meth:`search` for every row of ``queries``, in one FAISS call (a prompt and its detector's texts).

        An adapter's score is the max (or the mean of the best two) of its vectors among each query's
        nearest ``max(64, 8k)``; ties go to the adapter whose name sorts first.
        """
        if self.index is None or self.size == 0 or not len(queries):
            return [() for _ in range(len(queries))]
        if self.dense is not None and aggregate == "max":
            # exact, and for a few thousand vectors one matrix product beats FAISS plus a per-neighbour gather
            per_adapter = np.maximum.reduceat(queries @ self.dense.T, self.starts, axis=1)
            return self._ranked(per_adapter, k)
        depth = min(self.size, max(64, 8 * k))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
        if len(self.names) > 4 * depth:  # many adapters: rank only the few among each query's neighbours
            return [self._ranked_neighbours(row_scores, row_ids, k, aggregate)
                    for row_scores, row_ids in zip(scores, ids, strict=True)]
        found = ids >= 0
        owner = self.id_owner[np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)]
        per_adapter = np.full((len(queries), len(self.names)), -np.inf, dtype=np.float32)
        rows = np.broadcast_to(np.arange(len(queries))[:, None], ids.shape)
        if aggregate == "max":
            np.maximum.at(per_adapter, (rows[found], owner[found]), scores[found])
        else:  # top2mean: FAISS returns each query's neighbours best first, so an adapter's first two are its best
            per_adapter = _top2mean(per_adapter, rows, owner, scores, found)
        return self._ranked(per_adapter, k)

    def _ranked_neighbours(self, scores: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int,
                           aggregate: str) -> tuple[tuple[str, float], ...]:
        """One query's best ``k`` adapters from its neighbours alone: with 100k adapters a row per adapter
        would cost more than the search itself."""
        per_adapter: dict[str, list[float]] = {}
        for score, vid in zip(scores.tolist(), ids.tolist(), strict=True):
            if vid >= 0:
                per_adapter.setdefault(self.owners[vid], []).append(score)
        ranked = {name: max(s) if aggregate == "max" else float(np.mean(sorted(s, reverse=True)[:2]))
                  for name, s in per_adapter.items()}
        return tuple(sorted(ranked.items(), key=lambda kv: (-kv[1], kv[0]))[:k])

    def _ranked(self, per_adapter: npt.NDArray[np.float32], k: int) -> list[tuple[tuple[str, float], ...]]:
        """The best ``k`` of each row's adapter scores (``-inf``: the adapter was not among the neighbours)."""
        order = np.argsort(-per_adapter, axis=1, kind="stable")[:, :k]  # names are sorted: ties in name order
        best = np.take_along_axis(per_adapter, order, axis=1)
        names = self.names
        return [tuple((names[i], score) for i, score in zip(row_order, row_best, strict=True) if score > -np.inf)
                for row_order, row_best in zip(order.tolist(), best.tolist(), strict=True)]

    def similarity(self, query: Vectors, name: str, aggregate: str = "max") -> float | None:
        """``query``'s score against one adapter's own descriptor vectors (as :meth:`search` aggregates them),
        exact whatever the index kind; None for an adapter without descriptors."""
        if self.index is None or name not in self.adapters:
            return None
        ids = list(itertools.takewhile(self.owners.__contains__, (stable_id(name, i) for i in itertools.count())))
        vectors = np.vstack([self.index.reconstruct(vid) for vid in ids])
        scores = sorted((vectors @ query.reshape(-1)).tolist(), reverse=True)
        return float(scores[0] if aggregate == "max" else np.mean(scores[:2]))


def _top2mean(per_adapter: npt.NDArray[np.float32], rows: npt.NDArray[np.intp], owner: npt.NDArray[np.intp],
              scores: npt.NDArray[np.float32], found: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Each (query, adapter)'s mean of its two best neighbours (its best alone if it has one), vectorised: a
    stable sort groups each pair's neighbours and keeps FAISS's best-first order within the group."""
    out = per_adapter.copy()
    key = rows[found].astype(np.int64) * per_adapter.shape[1] + owner[found]
    if not len(key):
        return out
    order = np.argsort(key, kind="stable")
    key, ranked = key[order], scores[found][order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    has_second = np.r_[starts[1:], len(key)] - starts > 1
    best = ranked[starts]
    second = np.where(has_second, ranked[np.minimum(starts + 1, len(ranked) - 1)], best)
    out.reshape(-1)[key[starts]] = (best + second) / 2
    return out


def centroids(entries: Sequence[AdapterVectors]) -> list[AdapterVectors]:
    """Each adapter's one normalised mean vector (what a ``centroid`` snapshot indexes)."""
    return [AdapterVectors(e.name, e.fingerprint, normalise_rows(e.vectors.mean(axis=0, keepdims=True)))
            for e in entries]


def build_snapshot(entries: Sequence[AdapterVectors], exact_max: int, hnsw_m: int = 32, *,
                   aggregate: str = "max") -> IndexSnapshot:
    """A new FAISS index over all vectors (``centroid``: one per adapter): exact (flat) up to ``exact_max``
    vectors, HNSW above."""
    if aggregate == CENTROID:
        entries = centroids([e for e in entries if len(e.vectors)])
    total = sum(len(e.vectors) for e in entries)
    if total == 0:
        return IndexSnapshot(index=None, owners={}, kind="empty")
    dim = entries[0].vectors.shape[1]
    if total <= exact_max:
        inner: faiss.Index = faiss.IndexFlatIP(dim)
        kind = "flat"
    else:
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 64
        kind = "hnsw"
    index = faiss.IndexIDMap2(inner)
    owners: dict[int, str] = {}
    all_ids = []
    for entry in entries:
        ids = [stable_id(entry.name, i) for i in range(len(entry.vectors))]
        owners.update(dict.fromkeys(ids, entry.name))
        all_ids.extend(ids)
    matrix = np.ascontiguousarray(np.vstack([e.vectors for e in entries]), dtype=np.float32)
    index.add_with_ids(matrix, np.asarray(all_ids, dtype=np.int64))
    names = tuple(sorted({e.name for e in entries}))
    position = {name: i for i, name in enumerate(names)}
    sorted_ids = np.asarray(sorted(owners), dtype=np.int64)
    id_owner = np.asarray([position[owners[int(i)]] for i in sorted_ids], dtype=np.intp)
    dense, starts = None, np.zeros(0, np.intp)
    if kind == "flat" and total <= DENSE_MAX_VECTORS:
        grouped = sorted(entries, key=lambda e: e.name)
        dense = np.ascontiguousarray(np.vstack([e.vectors for e in grouped]), dtype=np.float32)
        starts = np.cumsum([0] + [len(e.vectors) for e in grouped[:-1]]).astype(np.intp)
    return IndexSnapshot(index=index, owners=owners, kind=kind, size=total, adapters=frozenset(names), names=names,
                         ids=sorted_ids, id_owner=id_owner, dense=dense, starts=starts)


def check_aggregate(aggregate: str) -> None:
    """Raise :class:`ConfigError` unless ``aggregate`` is one of :data:`AGGREGATES`."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"unknown index aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}",
                          param="index_aggregate")


class DescriptorIndex:
    """Keeps the snapshot in step with the registry; built once at startup."""

    def __init__(self, encoder: TextEncoder, directory: Path, embedder_id: str, *, exact_max: int = 50_000,
                 aggregate: str = CENTROID) -> None:
        check_aggregate(aggregate)
        self._encoder = encoder
        self._dir = directory
        self._embedder_id = embedder_id
        self.exact_max = exact_max
        self.aggregate = aggregate
        self._scored = "max" if aggregate == CENTROID else aggregate  # over the one vector a centroid snapshot has
        self._entries: dict[str, AdapterVectors] = {}
        self._snapshot = IndexSnapshot(index=None, owners={}, kind="empty")
        self._lock = asyncio.Lock()
        self.embedded_on_last_sync = 0
        self._load()

    def snapshot(self) -> IndexSnapshot:
        return self._snapshot

    def search(self, query: Vectors, k: int) -> tuple[tuple[str, float], ...]:
        return self._snapshot.search(query, k, self._scored)

    def search_many(self, queries: Vectors, k: int) -> list[tuple[tuple[str, float], ...]]:
        return self._snapshot.search_many(queries, k, self._scored)

    def similarity(self, query: Vectors, name: str) -> float | None:
        return self._snapshot.similarity(query, name, self._scored)

    @property
    def blocks_loop(self) -> bool:
        """Whether searching now would stall the event loop enough to run in a thread (:data:`THREAD_MIN_VECTORS`)."""
        snapshot = self._snapshot
        return snapshot.kind == "flat" and snapshot.size >= THREAD_MIN_VECTORS

    async def sync(self, adapters: Mapping[str, AdapterRecord]) -> None:
        """Bring the index in step with the registry: embed new/changed adapters, drop removed ones."""
        async with self._lock:
            stale = [r for r in adapters.values()
                     if (e := self._entries.get(r.name)) is None or e.fingerprint != fingerprint(r, self._embedder_id)]
            entries = {name: e for name, e in self._entries.items() if name in adapters}
            for record in stale:
                texts = descriptor_texts(record)
                vectors = await self._encoder.embed_many(texts) if texts else np.zeros((0, 1), np.float32)
                entries[record.name] = AdapterVectors(record.name, fingerprint(record, self._embedder_id), vectors)
            self.embedded_on_last_sync = len(stale)
            if stale or len(entries) != len(self._entries):
                ordered = [entries[name] for name in sorted(entries) if len(entries[name].vectors)]
                self._snapshot = await asyncio.to_thread(self._build, ordered)
                self._entries = entries
                await asyncio.to_thread(self._save)

    def _build(self, entries: Sequence[AdapterVectors]) -> IndexSnapshot:
        return build_snapshot(entries, self.exact_max, aggregate=self.aggregate)

    # -- persistence -----------------------------------------------------------------------------
    def _save(self) -> None:
        """Write vectors and their names as one file, swapped in by an atomic rename.

        Every gateway process sharing the data dir saves here: one file (not vectors plus a separate
        meta file) keeps a reader from pairing one process's vectors with another's names, and a
        private temp name keeps two writers from renaming each other's half-written file.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(self._entries.values(), key=lambda e: e.name)
        nonempty = [e.vectors for e in entries if len(e.vectors)]
        matrix = np.vstack(nonempty) if nonempty else np.zeros((0, 1), np.float32)
        meta = {"embedder": self._embedder_id,
                "adapters": [{"name": e.name, "fingerprint": e.fingerprint, "count": len(e.vectors)} for e in entries]}
        with replaced_atomically(self._dir / INDEX_FILE, suffix=".npz") as tmp, tmp.open("wb") as handle:
            np.savez(handle, vectors=matrix, meta=np.array(json.dumps(meta)))

    def _load(self) -> None:
        """Load saved vectors; anything unreadable or from another embedder is simply re-embedded."""
        try:
            with np.load(self._dir / INDEX_FILE) as saved:
                meta = json.loads(str(saved["meta"]))
                matrix = saved["vectors"]
        except (OSError, ValueError, KeyError):
            return
        if meta.get("embedder") != self._embedder_id:
            return
        offset = 0
        for item in meta.get("adapters", []):
            count = int(item["count"])
            vectors = matrix[offset:offset + count].astype(np.float32) if count else np.zeros((0, 1), np.float32)
            self._entries[item["name"]] = AdapterVectors(item["name"], item["fingerprint"], vectors)
            offset += count
        if offset != len(matrix):  # inconsistent files: start over
            self._entries = {}
            return
        ordered = [self._entries[n] for n in sorted(self._entries) if len(self._entries[n].vectors)]
        self._snapshot = self._build(ordered)
