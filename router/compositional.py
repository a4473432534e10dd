"""Compositional-query detection: does a prompt's content span more than one adapter's domain?

The canonical case is a two-hop question whose hops live in different adapters ("where was the
spouse of X born?": spouses, then birthplaces). The reuse-limit literature finds that averaging and
selection mostly fail there, so the gateway flags these queries to show operators where.

Detectors, in a registry, measured on ``tests/data/routing`` by ``make bench``:
- ``gap`` (default): the two best adapters are both similar to the prompt and close to each other.
  Free: it reads the scores the router already has.
- ``segments``: split the prompt into clauses; if different clauses are each clearly nearest to a
  different adapter, the prompt spans domains.
- ``hybrid``: either of the two; the best recall, for one larger embedding batch per request.
- ``learned`` (default): a logistic model over a few domain-free features of the prompt's and its clauses'
  score patterns and its wording (:data:`FEATURES`), trained by ``bench/train_detector.py`` on the labelled
  set ``tests/data/routing`` and reported on ``tests/data/routing_heldout`` (other domains, other names,
  written apart). Its weights depend on the embedder's score scale, so they are shipped per embedder
  in ``router/detector_models.json``.

A detector names the extra texts it needs embedded (:meth:`Detector.probe`, a :class:`Probe`); the router's
searcher embeds them in the same batch as the prompt and hands the detector the probe back with each text's
nearest adapters, so detection never costs a second round trip, the prompt is split once, and a detector is
pure logic over scores.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loragate.errors import ConfigError
from loragate.router.embedder import EMBEDDER_BACKENDS
from loragate.router.index import CENTROID

Candidates = tuple[tuple[str, float], ...]

_CLAUSE_SPLIT = re.compile(
    r"[.?!;:]+\s*|,?\s+(?:and|then|but|also|plus|whose|who|which|where|that|of)\s+|,\s*",
    re.IGNORECASE,
)


def segments(prompt: str, window: int = 6, stride: int = 3) -> list[str]:
    """Clauses of the prompt; a long clause also yields overlapping word windows."""
    clauses = [c.strip() for c in _CLAUSE_SPLIT.split(prompt) if c and len(c.split()) >= 2]
    out: list[str] = []
    for clause in clauses:
        words = clause.split()
        if len(words) <= window + stride:
            out.append(clause)
        else:
            out.extend(" ".join(words[i:i + window]) for i in range(0, len(words) - window + stride, stride))
    return out


@dataclass(frozen=True, slots=True)
class Probe:
    """A prompt and the extra texts a detector wants embedded beside it, in the detector's groups (the learned
    one's: clauses, words, requests). The router embeds :attr:`texts` as one flat batch; the detector gets the
    probe back and cuts the results along its groups, so the prompt is parsed once per request."""

    prompt: str
    groups: tuple[tuple[str, ...], ...] = ()

    @property
    def texts(self) -> list[str]:
        return [text for group in self.groups for text in group]

    def results(self, parts: Sequence[Candidates]) -> list[Sequence[Candidates]]:
        """``parts`` (the nearest adapters of each of :attr:`texts`, in order) cut back into the groups."""
        if len(parts) != sum(map(len, self.groups)):
            raise ValueError(f"{len(parts)} results for a probe of {sum(map(len, self.groups))} texts")
        out, start = [], 0
        for group in self.groups:
            out.append(parts[start:start + len(group)])
            start += len(group)
        return out


class Detector(ABC):
    name: ClassVar[str]

    def probe(self, prompt: str) -> Probe:
        """The prompt with the extra texts to embed together with it (none by default)."""
        return Probe(prompt)

    @abstractmethod
    def detect(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        """True when ``probe.prompt`` spans more than one adapter's domain.

        ``candidates`` are the prompt's nearest adapters; ``parts`` the nearest adapters of each of
        ``probe.texts``.
        """


class GapDetector(Detector):
    """Top-2 adapters both relevant and nearly tied."""

    name = "gap"

    def __init__(self, min_second: float = 0.35, max_gap: float = 0.1) -> None:
        self.min_second = min_second
        self.max_gap = max_gap

    def detect(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        if len(candidates) < 2:
            return False
        (_, first), (_, second) = candidates[0], candidates[1]
        return second >= self.min_second and first - second <= self.max_gap


class SegmentDetector(Detector):
    """Different clauses of the prompt are nearest to different adapters, each clearly."""

    name = "segments"

    def __init__(self, min_score: float = 0.35, margin: float = 0.03) -> None:
        self.min_score = min_score
        self.margin = margin

    def probe(self, prompt: str) -> Probe:
        parts = segments(prompt)
        return Probe(prompt, (tuple(parts),) if len(parts) >= 2 else ())

    def detect(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        if len(candidates) < 2 or len(parts) < 2:
            return False
        winners: set[str] = set()
        for found in parts:
            if not found or found[0][1] < self.min_score:
                continue
            if len(found) > 1 and found[0][1] - found[1][1] < self.margin:
                continue  # a clause that cannot tell two domains apart says nothing
            winners.add(found[0][0])
        return len(winners) >= 2


class HybridDetector(Detector):
    """Either a near tie of the top-2 adapters or clauses that point at different adapters."""

    name = "hybrid"

    def __init__(self) -> None:
        self.gap = GapDetector()
        self.segments = SegmentDetector()

    def probe(self, prompt: str) -> Probe:
        return self.segments.probe(prompt)

    def detect(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        return self.gap.detect(probe, candidates, parts) or self.segments.detect(probe, candidates, parts)


# -- the learned detector --------------------------------------------------------------------------

FEATURES: tuple[str, ...] = (
    "top1", "top2", "gap12", "gap23",  # the prompt's score pattern
    "parts", "part_winners", "other_winner", "other_winner_gap", "top2_wins_a_part",  # its clauses'
    "word_domains", "word_domains_strong", "other_word", "word_best", "word_second", "word_gap",  # its words'
    "joins", "questions", "possessives", "relatives", "log_words",  # its wording
    "asks", "ask_winners", "ask_cross", "ask_cross_top",  # its separate requests' (see :func:`asks`)
    "question_winners", "question_cross", "question_cross_top",  # the same over those phrased as questions
)
"""What the learned detector reads. None names an adapter or a domain, so a model trained on one registry's
adapters applies to another's (the held-out set checks exactly that)."""

_STOPWORDS = frozenset((
    "a", "about", "again", "also", "am", "an", "and", "any", "are", "as", "at", "be", "been", "but", "by", "can",
    "could", "did", "do", "does", "for", "from", "had", "has", "have", "he", "her", "him", "his", "how", "i", "if",
    "in", "into", "is", "it", "its", "just", "know", "may", "me", "might", "must", "my", "name", "no", "not", "now",
    "of", "on", "or", "our", "out", "over", "please", "plus", "say", "she", "should", "so", "tell", "than", "that",
    "the", "their", "them", "then", "they", "this", "to", "under", "up", "us", "was", "we", "were", "what", "when",
    "where", "which", "who", "whom", "whose", "why", "will", "with", "would", "yes", "you", "your",
))
_WORD = re.compile(r"[a-z]{3,}")


def content_words(prompt: str, limit: int = 12) -> list[str]:
    """The prompt's distinct content words (lower case, no stopwords), at most ``limit``: each is embedded
    alone so the detector can see which adapters single words point at."""
    return list(dict.fromkeys(w for w in _WORD.findall(prompt.lower()) if w not in _STOPWORDS))[:limit]

_JOINS = re.compile(r"\b(?:and|also|plus|as well as|another thing|separately)\b|;", re.IGNORECASE)
_POSSESSIVES = re.compile(r"\w'?s\b(?=\s+\w)|\bof (?:the|his|her|their|that|this)\b", re.IGNORECASE)
_RELATIVES = re.compile(r"\b(?:who|whose|whom|which|where|that)\b", re.IGNORECASE)


_ASK_WORDS = ("what|what's|whats|who|who's|whos|whom|whose|where|which|why|how|when|is|are|was|were|do|does|did|can|"
              "could|should|would|will|tell|give|explain|write|find|name|list|show|define|help|remind|describe")
_ASK_SPLIT = re.compile(
    r"(?<=[?!])\s*|(?<=\.)\s+|\n+|\s*;\s*|\s+\+\s+|\s*\((?:[a-z]|\d)\)\s*|(?:^|\s)\d[.)]\s+|(?:^|\n)\s*-\s+"
    rf"|,?\s+(?:and then|and also|also|plus|besides|as well as|and|then)\s*,?\s+(?=(?:{_ASK_WORDS})\b)"
    rf"|:\s+(?=(?:{_ASK_WORDS})\b)",
    re.IGNORECASE)
_ASK_LEAD = re.compile(r"^(?:also|and|plus|besides|separately|unrelated|then|second|first|question \w+)\W+",
                       re.IGNORECASE)
_QUESTION = re.compile(rf"^(?:{_ASK_WORDS})\b", re.IGNORECASE)


def asks(prompt: str) -> list[str]:
    """The prompt's separate requests: split at sentence ends, semicolons, list markers, and at a join ("and",
    "also", "plus", ...) or colon followed by a question word or an imperative. Coarser than :func:`segments`
    (which also cuts at "of", "who", ...): a conjunction is two requests each nearest its own adapter, while a
    near-miss's second domain usually sits inside one request."""
    pieces = (_ASK_LEAD.sub("", piece.strip(" ,.-")) for piece in _ASK_SPLIT.split(prompt) if piece)
    return [piece for piece in pieces if len(piece.split()) >= 2]


def learned_probe(prompt: str) -> Probe:
    """The learned detector's extra texts, in three groups: the prompt's clauses, its content words, and its
    requests (clauses and requests only when there are two or more)."""
    clauses, requests = segments(prompt), asks(prompt)
    return Probe(prompt, (tuple(clauses) if len(clauses) >= 2 else (), tuple(content_words(prompt)),
                          tuple(requests) if len(requests) >= 2 else ()))


def _score_of(found: Candidates, name: str) -> float:
    """``name``'s score in ``found``, or at most the last one's when it is not among them."""
    return next((score for n, score in found if n == name), found[-1][1] if found else 0.0)


def _ask_features(requests: Sequence[tuple[str, Candidates]]) -> list[float]:
    """How many requests, how many adapters they are clearly nearest to, and the pair of requests nearest to
    different adapters that most prefer their own: each one's margin over the other's adapter (the smaller of
    the two), and the lower of their top scores."""
    found = [f for _, f in requests if f]
    winners = {f[0][0] for f in found if len(f) < 2 or f[0][1] - f[1][1] >= 0.03}
    cross = top = 0.0
    for i, first in enumerate(found):
        for other in found[i + 1:]:
            if first[0][0] != other[0][0]:
                both = min(first[0][1] - _score_of(first, other[0][0]), other[0][1] - _score_of(other, first[0][0]))
                if both > cross:
                    cross, top = both, min(first[0][1], other[0][1])
    return [float(len(found)), float(len(winners)), cross, top]


def features(prompt: str, candidates: Candidates, parts: Sequence[Candidates],
             words: Sequence[Candidates] = (), requests: Sequence[tuple[str, Candidates]] = ()) -> list[float]:
    """The values of :data:`FEATURES` for one prompt: its nearest adapters, its clauses', its words' and its
    requests' (each request's text with its nearest adapters)."""
    scores = [score for _, score in candidates[:3]]
    s1, s2, s3 = ([*scores, 0.0, 0.0, 0.0])[:3]
    top = candidates[0][0] if candidates else None
    second = candidates[1][0] if len(candidates) > 1 else None
    winners = [found for found in parts if found]
    others = [found for found in winners if found[0][0] != top]  # clauses nearest to another adapter than the prompt
    best_other = max(others, key=lambda found: found[0][1], default=None)
    other_gap = 0.0
    if best_other is not None and len(best_other) > 1:
        other_gap = best_other[0][1] - best_other[1][1]
    return [
        s1, s2, s1 - s2, s2 - s3,
        float(len(parts)), float(len({found[0][0] for found in winners})),
        best_other[0][1] if best_other else 0.0, other_gap,
        float(second is not None and any(found[0][0] == second for found in winners)),
        *_word_features(top, words),
        float(len(_JOINS.findall(prompt))), float(prompt.count("?")), float(len(_POSSESSIVES.findall(prompt))),
        float(len(_RELATIVES.findall(prompt))), math.log1p(len(prompt.split())),
        *_ask_features(requests), *_ask_features([(t, f) for t, f in requests if _is_question(t, prompt)])[1:],
    ]


def probe_features(probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> list[float]:
    """:func:`features` of a :func:`learned_probe` and its texts' results (what the detector and its training
    both read)."""
    clauses, words, requests = probe.results(parts)
    return features(probe.prompt, candidates, clauses, words, tuple(zip(probe.groups[2], requests, strict=True)))


def _is_question(request: str, prompt: str) -> bool:
    """A request phrased as a question or an instruction, not a statement of context ("I think she works at ...")."""
    return bool(_QUESTION.match(request)) or f"{request}?" in prompt


def _word_features(top: str | None, words: Sequence[Candidates]) -> list[float]:
    """How many adapters single words point at (clearly, and strongly), the best word score for an adapter other
    than the prompt's nearest, and the two best adapters' best word scores."""
    clear = [found[0] for found in words if found and (len(found) < 2 or found[0][1] - found[1][1] >= 0.03)]
    best: dict[str, float] = {}
    for found in words:
        for name, score in found[:3]:
            best[name] = max(best.get(name, -1.0), score)
    first, second = ([*sorted(best.values(), reverse=True), 0.0, 0.0])[:2]
    return [float(len({name for name, score in clear if score >= 0.35})),
            float(len({name for name, score in clear if score >= 0.45})),
            max((score for name, score in clear if name != top), default=0.0), first, second, first - second]


DETECTOR_MODELS = Path(__file__).resolve().parent / "detector_models.json"
"""The learned detector's weights, one model per embedder (``bench/train_detector.py`` writes them)."""


@dataclass(frozen=True, slots=True)
class DetectorModel:
    """Standardised logistic regression over :data:`FEATURES`, with the decision threshold chosen in training."""

    embedder: str
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float

    def __post_init__(self) -> None:
        if not len(self.mean) == len(self.scale) == len(self.weights) == len(FEATURES):
            raise ValueError(f"a detector model needs {len(FEATURES)} means, scales and weights")

    def probability(self, values: Sequence[float]) -> float:
        z = self.bias + sum(w * (v - m) / s for w, v, m, s in zip(self.weights, values, self.mean, self.scale,
                                                                    strict=True))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_json(cls, embedder: str, data: Mapping[str, Any]) -> DetectorModel:
        if tuple(data.get("features", ())) != FEATURES:
            raise ConfigError(f"the learned detector's model for {embedder!r} was trained on other features; "
                              "retrain it with `python -m bench.train_detector`", param="compositional_detector")
        return cls(embedder, tuple(data["mean"]), tuple(data["scale"]), tuple(data["weights"]), float(data["bias"]),
                   float(data["threshold"]))


def model_key(embedder: str, aggregate: str = CENTROID) -> str:
    """A model's name in the file: its features read the scores one embedder's index gives with one aggregate
    (``static-256`` for the default centroid, ``static-256+max`` otherwise)."""
    return embedder if aggregate == CENTROID else f"{embedder}+{aggregate}"


def load_models(path: Path = DETECTOR_MODELS) -> dict[str, Mapping[str, Any]]:
    try:
        return dict(json.loads(path.read_text())["models"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read the learned detector's models ({path.name}): {exc}",
                          param="compositional_detector") from None


class LearnedDetector(Detector):
    """A prompt is compositional when the trained model's probability reaches its threshold."""

    name = "learned"

    def __init__(self, model: DetectorModel) -> None:
        self.model = model

    @classmethod
    def for_embedder(cls, embedder: str, path: Path = DETECTOR_MODELS, aggregate: str = CENTROID) -> LearnedDetector:
        models, key = load_models(path), model_key(embedder, aggregate)
        if key not in models:
            raise ConfigError(f"the learned compositional detector has no model for embedder {embedder!r} with "
                              f"index_aggregate={aggregate} (trained: {', '.join(sorted(models))}); train one with "
                              "`python -m bench.train_detector`, or set compositional_detector=gap",
                              param="compositional_detector")
        return cls(DetectorModel.from_json(embedder, models[key]))

    def probe(self, prompt: str) -> Probe:
        return learned_probe(prompt)

    def probability(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> float:
        return self.model.probability(probe_features(probe, candidates, parts))

    def detect(self, probe: Probe, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        return self.probability(probe, candidates, parts) >= self.model.threshold


DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (GapDetector, SegmentDetector, HybridDetector, LearnedDetector)}


AUTO = "auto"
"""The default detector: ``learned`` on a cheap (static) embedder, ``gap`` on a transformer. ``learned`` embeds
a prompt's clauses and content words (about ten texts); a static table does that in microseconds, MiniLM in
~30 ms, which would make every routed request ten times slower than the routing itself."""


def make_detector(name: str, embedder: str, aggregate: str = CENTROID) -> Detector:
    """The detector ``name`` for prompts embedded by backend ``embedder`` and scored with ``aggregate`` (the
    learned one's model depends on both)."""
    if name == AUTO:
        backend = EMBEDDER_BACKENDS.get(embedder)
        name = LearnedDetector.name if backend is not None and backend.cheap else GapDetector.name
    if name == LearnedDetector.name:
        return LearnedDetector.for_embedder(embedder, aggregate=aggregate)
    try:
        return DETECTORS[name]()
    except KeyError:
        raise ConfigError(f"unknown compositional detector {name!r}; valid: {', '.join(sorted([AUTO, *DETECTORS]))}",
                          param="compositional_detector") from None
