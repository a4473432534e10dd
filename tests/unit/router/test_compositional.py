"""Compositional detection logic on hand-made scores (accuracy is benchmarked on real embeddings)."""

from __future__ import annotations

from loragate.router.compositional import GapDetector, HybridDetector, SegmentDetector, segments


def test_segments_split_clauses_and_relations() -> None:
    assert segments("Where was the spouse of Maren Quillfeather born?") == ["Where was the spouse",
                                                                           "Maren Quillfeather born"]
    assert segments("How do I braise short ribs, and what is the boiling point of ethanol?") == [
        "How do I braise short ribs", "what is the boiling point"]
    assert segments("hello") == []


def test_gap_detector_needs_two_close_relevant_adapters() -> None:
    detector = GapDetector(min_second=0.3, max_gap=0.08)
    assert detector.texts("a b, c d") == []
    assert detector.detect((("a", 0.6), ("b", 0.55)), ()) is True
    assert detector.detect((("a", 0.6), ("b", 0.2)), ()) is False
    assert detector.detect((("a", 0.9), ("b", 0.6)), ()) is False
    assert detector.detect((("a", 0.9),), ()) is False


def test_segment_detector_counts_clear_clause_winners() -> None:
    detector = SegmentDetector(min_score=0.4, margin=0.05)
    parts = ((("a", 0.7), ("b", 0.3)), (("b", 0.6), ("a", 0.2)), (("a", 0.5), ("b", 0.48)))
    candidates = (("a", 0.5), ("b", 0.2))
    assert detector.detect(candidates, parts) is True
    assert detector.detect(candidates, (parts[0], parts[2])) is False  # the tie says nothing
    assert detector.texts("Where was the spouse of Maren Quillfeather born?") == ["Where was the spouse",
                                                                                 "Maren Quillfeather born"]
    assert HybridDetector().detect(candidates, parts) is True
