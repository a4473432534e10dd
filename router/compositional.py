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

A detector names the extra texts it needs embedded (:meth:`Detector.texts`); the router's searcher embeds
them in the same batch as the prompt and hands the detector each one's nearest adapters, so detection
never costs a second round trip and a detector is pure logic over scores.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from loragate.errors import ConfigError

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


class Detector(ABC):
    name: ClassVar[str]

    def texts(self, prompt: str) -> list[str]:
        """Extra texts to embed together with the prompt (none by default)."""
        return []

    @abstractmethod
    def detect(self, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        """True when the prompt spans more than one adapter's domain.

        ``candidates`` are the prompt's nearest adapters; ``parts`` the nearest adapters of each of :meth:`texts`.
        """


class GapDetector(Detector):
    """Top-2 adapters both relevant and nearly tied."""

    name = "gap"

    def __init__(self, min_second: float = 0.35, max_gap: float = 0.1) -> None:
        self.min_second = min_second
        self.max_gap = max_gap

    def detect(self, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
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

    def texts(self, prompt: str) -> list[str]:
        parts = segments(prompt)
        return parts if len(parts) >= 2 else []

    def detect(self, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
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

    def texts(self, prompt: str) -> list[str]:
        return self.segments.texts(prompt)

    def detect(self, candidates: Candidates, parts: Sequence[Candidates]) -> bool:
        return self.gap.detect(candidates, parts) or self.segments.detect(candidates, parts)


DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (GapDetector, SegmentDetector, HybridDetector)}


def make_detector(name: str) -> Detector:
    try:
        return DETECTORS[name]()
    except KeyError:
        raise ConfigError(f"unknown compositional detector {name!r}; valid: {', '.join(sorted(DETECTORS))}",
                          param="compositional_detector") from None
