"""Grading answers against expected ones, and the interval of a success rate: the one evaluation toolkit.

The gateway grades responses against ``X-Expected-Answer`` into its outcome log, and the load
generator grades the same responses on the client side; the demo prints both and recounts one
from the other. They agree only if both use one grader, so this is the only place that decides
what "the answer contains the expected one" means.

Normalisation: accents folded (``José`` matches ``Jose``), lower case, punctuation to spaces,
whitespace collapsed. Accents are folded by dropping combining marks after NFKD, so letters
without an ASCII form (``北京``, ``Москва``) stay as they are instead of vanishing.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    """Lower-case, accents folded, punctuation dropped, whitespace collapsed."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(_PUNCT.sub(" ", folded.lower()).split())


def contains_answer(output: str, expected: str) -> bool:
    """Normalised containment on word boundaries: "Paris" is in "It is paris." but not in "Parisian"."""
    want = normalise(expected)
    return bool(want) and f" {want} " in f" {normalise(output)} "


def is_correct(answer: str, expected: Iterable[str]) -> bool | None:
    """Whether any expected answer is contained in ``answer`` (:func:`contains_answer`).

    ``None`` when nothing is expected (ungraded). An expected answer that normalises to nothing
    (``"!!"``) never matches.
    """
    wanted = tuple(expected)
    if not wanted:
        return None
    return any(contains_answer(answer, e) for e in wanted)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default); (0, 1) with no data."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
