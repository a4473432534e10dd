"""Workload parsing and generated workloads (grading: tests/unit/test_grading.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.loadtest.workloads import (
    WorkItem,
    WorkloadError,
    generated,
    load_jsonl,
    parse_jsonl,
)


def test_parse_jsonl_reads_optional_fields_and_skips_comments() -> None:
    text = "\n".join([
        '# a comment',
        '{"prompt": "Who is Ana\'s spouse?", "policy": "select", "expected": "Bo"}',
        '',
        '{"prompt": "hello", "expected": ["Paris", "paris france"], "model": "alpha", "id": 7}',
        '{"prompt": "plain"}',
    ])
    items = parse_jsonl(text)
    assert items == (WorkItem("Who is Ana's spouse?", "select", ("Bo",)),
                     WorkItem("hello", None, ("Paris", "paris france"), "alpha"), WorkItem("plain"))


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "w:1: not JSON"),
    ('["prompt"]', "JSON object"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "x", "expected": 3}', "'expected' must be"),
    ('{"prompt": "x", "policy": ""}', "'policy' must be"),
    ('{"prompt": "x", "answer": "y"}', "unknown field"),
])
def test_parse_jsonl_errors_name_the_line(line: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_jsonl(line, "w")


def test_empty_and_missing_workloads_are_errors(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="no prompts"):
        parse_jsonl("# nothing\n\n")
    with pytest.raises(WorkloadError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "w.jsonl").write_text('{"prompt": "hi"}\n')
    assert load_jsonl(tmp_path / "w.jsonl") == (WorkItem("hi"),)


def test_generated_prompts_are_reproducible_and_distinct() -> None:
    a, b = generated(50, words=8, seed=3), generated(50, words=8, seed=3)
    assert a == b
    assert len({item.prompt for item in a}) == 50
    assert all(len(item.prompt.split()) == 8 for item in a)
    assert generated(5, seed=4) != a[:5]
    with pytest.raises(WorkloadError):
        generated(0)
