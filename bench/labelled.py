"""The three hand-labelled routing sets, and the searches every routing measurement starts from.

``tests/data/routing`` is the training split: every threshold the router ships with (the cascade's
margin and floor, the learned detector's weights and threshold) is chosen on it. ``tests/data/routing_heldout``
was written apart from it (other adapters, domains, names and phrasings) and only ever reported on, though it
was looked at while some rules and features were chosen; ``tests/data/routing_fresh`` was written blind on
2026-12-07 (a third world and five more domains) so that one split stays untouched by every choice.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from bench import report
from loragate.adapters.types import AdapterRecord, Descriptors
from loragate.router.compositional import Probe, learned_probe
from loragate.router.embedder import Embedder, EmbedderBackend
from loragate.router.index import CENTROID, DescriptorIndex
from loragate.router.search import Candidates, Tier

DATA = report.ROOT / "tests" / "data" / "routing"
HELDOUT = report.ROOT / "tests" / "data" / "routing_heldout"
FRESH = report.ROOT / "tests" / "data" / "routing_fresh"
SPLITS = {"train": DATA, "held-out": HELDOUT, "fresh": FRESH}
"""Every split, the training one first: the others are only ever reported on."""


@dataclass(frozen=True, slots=True)
class Labelled:
    prompt: str
    adapters: tuple[str, ...]
    compositional: bool
    kind: str


@dataclass(frozen=True, slots=True)
class LabelledSet:
    """One split: its adapters as registry records (descriptors only) and its prompts."""

    name: str
    records: dict[str, AdapterRecord]
    prompts: list[Labelled]

    def of_kind(self, *kinds: str) -> list[Labelled]:
        return [p for p in self.prompts if p.kind in kinds]


def load_set(directory: Path = DATA, name: str = "train") -> LabelledSet:
    adapters = json.loads((directory / "adapters.json").read_text())
    records = {a["name"]: AdapterRecord(
        name=a["name"], base_model="bench", rank=8, alpha=16, target_modules=("q_proj",), use_rslora=False,
        sha256=a["name"].ljust(64, "0"), path=Path("/nonexistent"), size_bytes=0, created_at=0.0,
        descriptors=Descriptors(a["description"], tuple(a["examples"]))) for a in adapters}
    prompts = [Labelled(d["prompt"], tuple(d["adapters"]), bool(d["compositional"]), d["kind"])
               for d in map(json.loads, (directory / "prompts.jsonl").read_text().splitlines()) if d]
    return LabelledSet(name, records, prompts)


def load_splits() -> dict[str, LabelledSet]:
    return {name: load_set(directory, name) for name, directory in SPLITS.items()}


async def make_tier(backend: EmbedderBackend, records: dict[str, AdapterRecord], *, cache: int = 4096,
                    aggregate: str = CENTROID) -> Tier:
    """``backend`` with the gateway's default batching and an index of ``records``' descriptors (in a temp dir)."""
    embedder = Embedder(backend, cache_size=cache)
    directory = Path(tempfile.mkdtemp(prefix="loragate-bench-index-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # a bench run makes dozens of these
    tier = Tier(backend.name, embedder, DescriptorIndex(embedder, directory, embedder.identity, aggregate=aggregate))
    await tier.index.sync(records)
    return tier


@dataclass(frozen=True, slots=True)
class Searched:
    """One prompt searched as the router does (prompt and its clauses in one batch): what detectors read."""

    prompt: Labelled
    candidates: Candidates
    probe: Probe  # the learned detector's (compositional.learned_probe)
    parts: tuple[Candidates, ...]  # its texts' nearest adapters, in order


async def search_all(tier: Tier, labelled: LabelledSet, k: int = 5) -> list[Searched]:
    """Every prompt with the extra texts of the learned detector (a superset of the other detectors')."""
    out = []
    for p in labelled.prompts:
        probe = learned_probe(p.prompt)
        found, _, _ = await tier.search([p.prompt, *probe.texts], k, labelled.records)
        out.append(Searched(p, found[0], probe, tuple(found[1:])))
    return out


def precision_recall(flagged: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Precision and recall of boolean flags against 0/1 labels (0 where nothing is flagged or labelled)."""
    tp = float(np.sum(flagged & (y == 1)))
    return tp / max(float(flagged.sum()), 1.0), tp / max(float(y.sum()), 1.0)


def best_f1(y: np.ndarray, prob: np.ndarray) -> tuple[float, float, float]:
    """The threshold on ``prob`` with the best F1 against labels ``y``, and its precision and recall."""
    precision, recall, thresholds = precision_recall_curve(y, prob)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(precision[best]), float(recall[best])
