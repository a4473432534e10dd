"""The one grader (loragate/grading.py): normalised containment, accents folded, and the Wilson interval.

The gateway's outcome log and the load generator grade with it; the last test sends accented
expected answers through both and checks they agree (before, only the gateway folded accents).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from loragate.grading import contains_answer, is_correct, normalise, wilson
from loragate.loadtest.loadgen import LoadSpec, run_load
from loragate.loadtest.stub import StubApp
from loragate.loadtest.workloads import WorkItem
from loragate.server.app import create_app
from loragate.workers.launch import free_port
from tests.servers import serving
from tests.unit.server.test_app import AUTH, TOKEN
from tests.unit.server.test_request_parsing import stub_settings


@pytest.mark.parametrize(("output", "expected", "ok"), [
    ("The capital is Paris.", "paris", True),
    ("It was born in  SAN  josé!", "San Jose", True),
    ("Parisian food", "Paris", False),
    ("", "x", False),
    ("anything", "   ", False),
])
def test_normalised_containment(output: str, expected: str, ok: bool) -> None:
    assert contains_answer(output, expected) is ok


def test_wilson_interval_known_values() -> None:
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(10, 10)[1] == pytest.approx(1.0)


def test_normalise() -> None:
    assert normalise("  Ana's   SPOUSE, is: Bo!\n") == "ana s spouse is bo"


@pytest.mark.parametrize(("answer", "expected", "correct"), [
    ("The answer is Paris.", ("paris",), True),
    ("PARIS, France", ("Paris France",), True),
    ("banana", ("Ana",), False),  # whole words only
    ("it is Lyon", ("Paris", "Lyon"), True),
    ("no idea", ("Paris",), False),
    ("anything", (), None),  # ungraded
    ("anything", ("!!",), False),  # an expected answer that normalizes to nothing never matches
])
def test_is_correct_is_normalized_whole_word_containment(answer: str, expected: tuple[str, ...],
                                                         correct: bool | None) -> None:
    assert is_correct(answer, expected) is correct


@pytest.mark.parametrize(("text", "folded"), [
    ("José Müller", "jose muller"),  # combining marks dropped, the letters kept
    ("Ünïcödé, façade!", "unicode facade"),
    ("北京 Москва", "北京 москва"),  # no ASCII form: kept, not dropped
])
def test_accents_fold_and_other_scripts_stay(text: str, folded: str) -> None:
    assert normalise(text) == folded


def test_an_accented_answer_grades_the_same_at_the_gateway_and_in_the_load_generator(tmp_path: Path) -> None:
    """The stub answers "the cat sat ...": the gateway's outcome log and the load generator's records
    must agree on every expected answer, accented or not (the load generator did not fold accents)."""
    expected = ("thé", "CÄT", "the", "dog", "Sät on")
    with serving(StubApp(), free_port()) as worker, \
            serving(create_app(stub_settings(tmp_path, worker, admin_token=TOKEN)), free_port()) as gateway:
        spec = LoadSpec(url=gateway, requests=len(expected), request_id_prefix="grading")
        result = asyncio.run(run_load(spec, tuple(WorkItem("hi", expected=(e,)) for e in expected)))
        client_side = {f"grading-{r.index}": r.correct for r in result.records}
        rows = httpx.get(f"{gateway}/admin/outcomes", headers=AUTH).json()["data"]
    gateway_side = {r["request_id"]: r["result"] == "success" for r in rows}
    assert client_side == gateway_side == {f"grading-{i}": e.lower() not in ("dog",) for i, e in enumerate(expected)}
