"""Compositional detection logic on hand-made scores (accuracy is measured on real embeddings elsewhere)."""

from __future__ import annotations

from loragate.router.compositional import GapDetector, segments


def test_segments_split_clauses_and_relations() -> None:
    parts = segments("Where was the spouse of Maren Quillfeather born?")
    assert parts == ["Where was the spouse", "Maren Quillfeather born"]
    assert segments("How do I braise short ribs, and what is the boiling point of ethanol?") == [
        "How do I braise short ribs", "what is the boiling point"]
    assert segments("hello") == []


async def test_gap_detector_needs_two_close_relevant_adapters() -> None:
    detector = GapDetector(min_second=0.3, max_gap=0.08)

    async def never(*_: object) -> None:
        raise AssertionError("gap detection needs no embedding")

    assert await detector.detect("q", (("a", 0.6), ("b", 0.55)), None, never) is True  # type: ignore[arg-type]
    assert await detector.detect("q", (("a", 0.6), ("b", 0.2)), None, never) is False  # type: ignore[arg-type]
    assert await detector.detect("q", (("a", 0.9), ("b", 0.6)), None, never) is False  # type: ignore[arg-type]
    assert await detector.detect("q", (("a", 0.9),), None, never) is False  # type: ignore[arg-type]
