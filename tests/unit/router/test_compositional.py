"""Compositional detection logic on hand-made scores (accuracy is benchmarked on real embeddings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loragate.errors import ConfigError
from loragate.router.compositional import (
    FEATURES,
    DetectorModel,
    GapDetector,
    HybridDetector,
    LearnedDetector,
    Probe,
    SegmentDetector,
    asks,
    content_words,
    features,
    learned_probe,
    load_models,
    make_detector,
    segments,
)
from loragate.router.embedder import backend_names


def test_segments_split_clauses_and_relations() -> None:
    assert segments("Where was the spouse of Maren Quillfeather born?") == ["Where was the spouse",
                                                                           "Maren Quillfeather born"]
    assert segments("How do I braise short ribs, and what is the boiling point of ethanol?") == [
        "How do I braise short ribs", "what is the boiling point"]
    assert segments("hello") == []


P = Probe("p")


def test_gap_detector_needs_two_close_relevant_adapters() -> None:
    detector = GapDetector(min_second=0.3, max_gap=0.08)
    assert detector.probe("a b, c d") == Probe("a b, c d")
    assert detector.detect(P, (("a", 0.6), ("b", 0.55)), ()) is True
    assert detector.detect(P, (("a", 0.6), ("b", 0.2)), ()) is False
    assert detector.detect(P, (("a", 0.9), ("b", 0.6)), ()) is False
    assert detector.detect(P, (("a", 0.9),), ()) is False


def test_segment_detector_counts_clear_clause_winners() -> None:
    detector = SegmentDetector(min_score=0.4, margin=0.05)
    parts = ((("a", 0.7), ("b", 0.3)), (("b", 0.6), ("a", 0.2)), (("a", 0.5), ("b", 0.48)))
    candidates = (("a", 0.5), ("b", 0.2))
    assert detector.detect(P, candidates, parts) is True
    assert detector.detect(P, candidates, (parts[0], parts[2])) is False  # the tie says nothing
    assert detector.probe("Where was the spouse of Maren Quillfeather born?").texts == ["Where was the spouse",
                                                                                       "Maren Quillfeather born"]
    assert HybridDetector().detect(P, candidates, parts) is True


def test_content_words_and_detector_texts() -> None:
    assert content_words("Where was the spouse of Maren Quillfeather born, and who employs her?") == [
        "spouse", "maren", "quillfeather", "born", "employs"]
    assert content_words("is it a or the") == []
    assert len(content_words(" ".join(f"word{chr(97 + i)}x" for i in range(20)))) == 12  # bounded per prompt
    probe = learned_probe("hello there")
    assert probe.groups == ((), ("hello", "there"), ())  # one clause and one request: nothing to compare them with
    assert probe.texts == ["hello", "there"] and probe.results(("w1", "w2")) == [(), ("w1", "w2"), ()]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 results for a probe of 2 texts"):
        probe.results(((), (), ()))


def test_asks_split_requests_not_the_clauses_of_one() -> None:
    assert asks("Who is Rurik Halden married to, and what's the pH of pure water?") == [
        "Who is Rurik Halden married to", "what's the pH of pure water?"]
    assert asks("1. Balance the equation\n2. Which company does Perrin work for?") == [
        "Balance the equation", "Which company does Perrin work for?"]
    assert asks("Who is Iver's wife? I think she works at Tidewell Bank.") == [
        "Who is Iver's wife?", "I think she works at Tidewell Bank"]
    assert asks("Which company employs the husband of Rosalind Quarrow?") == [
        "Which company employs the husband of Rosalind Quarrow?"]  # one request, though several clauses


def test_request_features_need_requests_that_prefer_different_adapters() -> None:
    prompt = "Who is Iver's wife? I think she works at Tidewell Bank."
    requests = ((("spouses", 0.6), ("employers", 0.4)), (("employers", 0.7), ("spouses", 0.5)))
    paired = tuple(zip(asks(prompt), requests, strict=True))
    values = dict(zip(FEATURES, features(prompt, (("spouses", 0.5),), (), (), paired), strict=True))
    assert values["asks"] == 2 and values["ask_winners"] == 2
    assert values["ask_cross"] == pytest.approx(0.2) and values["ask_cross_top"] == 0.6
    assert values["question_winners"] == 1 and values["question_cross"] == 0  # the second is a statement


def test_features_read_score_patterns_and_wording_but_no_names() -> None:
    prompt = "Which company employs the husband of Rosalind Quarrow?"
    candidates = (("spouses", 0.6), ("employers", 0.55), ("birthplaces", 0.3))
    parts = ((("employers", 0.5), ("spouses", 0.2)), (("spouses", 0.7), ("employers", 0.3)))
    words = ((("employers", 0.6), ("spouses", 0.1)), (("spouses", 0.5), ("birthplaces", 0.1)))
    values = dict(zip(FEATURES, features(prompt, candidates, parts, words), strict=True))
    assert values["top1"] == 0.6 and values["gap12"] == pytest.approx(0.05) and values["gap23"] == pytest.approx(0.25)
    assert values["parts"] == 2 and values["part_winners"] == 2 and values["top2_wins_a_part"] == 1
    assert values["other_winner"] == 0.5 and values["other_winner_gap"] == pytest.approx(0.3)
    assert values["word_domains"] == 2 and values["other_word"] == 0.6
    assert values["word_best"] == 0.6 and values["word_second"] == 0.5
    assert values["possessives"] == 1 and values["questions"] == 1 and values["joins"] == 0
    renamed = {"spouses": "x", "employers": "y", "birthplaces": "z"}  # no feature depends on adapter names

    def rename(found: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        return tuple((renamed[n], s) for n, s in found)

    assert features(prompt, rename(candidates), [rename(p) for p in parts], [rename(w) for w in words]) == list(
        values.values())
    empty = dict(zip(FEATURES, features("hi", (), ()), strict=True))
    assert empty["top1"] == 0 and empty["parts"] == 0 and empty["word_domains"] == 0


def model(weights: dict[str, float], threshold: float = 0.5, bias: float = 0.0) -> DetectorModel:
    return DetectorModel("test", (0.0,) * len(FEATURES), (1.0,) * len(FEATURES),
                         tuple(weights.get(f, 0.0) for f in FEATURES), bias, threshold)


def test_the_learned_detector_thresholds_its_models_probability() -> None:
    detector = LearnedDetector(model({"part_winners": 2.0}, bias=-3.0))  # two clause domains: p = sigmoid(1)
    two = ((("a", 0.5),), (("b", 0.5),))
    prompt = "where is the x and what is the y"
    assert len(segments(prompt)) == 2
    probe = detector.probe(prompt)
    assert probe.groups == (tuple(segments(prompt)), (), ("where is the x", "what is the y"))  # no content words
    assert detector.probability(probe, (("a", 0.5),), two + two) == pytest.approx(1 / (1 + math.exp(-1)))
    assert detector.detect(probe, (("a", 0.5),), two + two) is True
    assert detector.detect(probe, (("a", 0.5),), (two[0], two[0], *two)) is False  # one clause domain: sigmoid(-1)
    # parts arrive as the clauses' results, then the words': the detector splits them the way texts() made them
    prompt = "Where was the spouse of Maren born?"
    assert detector.probe(prompt).texts == [*segments(prompt), *content_words(prompt)]  # one request: none of them
    words_only = LearnedDetector(model({"word_domains": 5.0}, bias=-7.5))
    clauses = len(segments(prompt))
    strong = (("a", 0.9), ("b", 0.1))
    none = (("c", 0.0),)
    assert content_words(prompt) == ["spouse", "maren", "born"]
    mixed = [none] * clauses + [strong, (("b", 0.9), ("a", 0.1)), none]
    assert words_only.detect(words_only.probe(prompt), strong, mixed) is True  # two words, two clear adapters
    assert words_only.detect(words_only.probe(prompt), strong, [none] * clauses + [strong, strong, none]) is False


def test_detector_models_load_per_embedder_and_refuse_mismatches(tmp_path: Path) -> None:
    trained = model({"top1": 1.0}).to_json()
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"static": trained}}))
    assert LearnedDetector.for_embedder("static", path).model.weights[0] == 1.0
    with pytest.raises(ConfigError, match=r"no model for embedder 'minilm'.*static"):
        LearnedDetector.for_embedder("minilm", path)
    path.write_text(json.dumps({"models": {"static": {**trained, "features": ["top1"]}}}))
    with pytest.raises(ConfigError, match="other features"):
        LearnedDetector.for_embedder("static", path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        LearnedDetector.for_embedder("static", path)
    with pytest.raises(ValueError):
        DetectorModel("x", (0.0,), (1.0,), (1.0,), 0.0, 0.5)


def test_the_shipped_models_cover_every_embedder_backend() -> None:
    """compositional_detector=learned (the default) must start with whichever embedder is configured."""
    shipped = load_models()
    assert set(backend_names()) <= set(shipped)
    for name in backend_names():
        detector = make_detector("learned", name)
        assert isinstance(detector, LearnedDetector) and 0.0 < detector.model.threshold < 1.0
    with pytest.raises(ConfigError, match="unknown compositional detector"):
        make_detector("magic", "static")
