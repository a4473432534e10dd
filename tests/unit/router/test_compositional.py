"""Compositional detection logic on hand-made scores and vectors (accuracy is benchmarked on real embeddings)."""

from __future__ import annotations

import numpy as np

from loragate.router.compositional import GapDetector, HybridDetector, SegmentDetector, segments

NONE = np.zeros((0, 4), np.float32)


def test_segments_split_clauses_and_relations() -> None:
    assert segments("Where was the spouse of Maren Quillfeather born?") == ["Where was the spouse",
                                                                           "Maren Quillfeather born"]
    assert segments("How do I braise short ribs, and what is the boiling point of ethanol?") == [
        "How do I braise short ribs", "what is the boiling point"]
    assert segments("hello") == []


def test_gap_detector_needs_two_close_relevant_adapters() -> None:
    detector = GapDetector(min_second=0.3, max_gap=0.08)

    def never(*_: object) -> tuple[tuple[str, float], ...]:
        raise AssertionError("gap detection needs no search")

    assert detector.texts("a b, c d") == []
    assert detector.detect((("a", 0.6), ("b", 0.55)), NONE, never) is True
    assert detector.detect((("a", 0.6), ("b", 0.2)), NONE, never) is False
    assert detector.detect((("a", 0.9), ("b", 0.6)), NONE, never) is False
    assert detector.detect((("a", 0.9),), NONE, never) is False


def test_segment_detector_counts_clear_clause_winners() -> None:
    detector = SegmentDetector(min_score=0.4, margin=0.05)
    answers = {0: (("a", 0.7), ("b", 0.3)), 1: (("b", 0.6), ("a", 0.2)), 2: (("a", 0.5), ("b", 0.48))}

    def search(vector: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        return answers[int(vector[0])]

    vectors = np.array([[0], [1], [2]], np.float32)
    candidates = (("a", 0.5), ("b", 0.2))
    assert detector.detect(candidates, vectors, search) is True
    assert detector.detect(candidates, vectors[[0, 2]], search) is False  # the tie says nothing
    assert detector.texts("Where was the spouse of Maren Quillfeather born?") == ["Where was the spouse",
                                                                                 "Maren Quillfeather born"]
    assert HybridDetector().detect(candidates, vectors, search) is True
