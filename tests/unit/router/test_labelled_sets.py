"""Integrity of the two hand-labelled routing sets (tests/data/routing and its held-out twin).

Thresholds are chosen on the main set and reported on the held-out one, so the held-out set is only
an honest test if it shares nothing with the main set: no adapter, no invented name, no prompt. These
checks also catch labelling slips (a misspelt adapter, a conjunction marked non-compositional) that
would otherwise just shift the benchmark's figures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"
SETS = ("routing", "routing_heldout")
KINDS = {"single": 1, "near-miss": 1, "two-hop": 2, "conjunction": 2, "none": 0}
# The relation adapters, whose prompts name the invented people, cities and companies of each set's world.
RELATIONS = {"routing": {"spouses", "birthplaces", "employers"},
             "routing_heldout": {"mentors", "residences", "siblings"}}


def adapters(name: str) -> list[dict[str, Any]]:
    return list(json.loads((DATA / name / "adapters.json").read_text(encoding="utf-8")))


def prompts(name: str) -> list[dict[str, Any]]:
    lines = (DATA / name / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def all_text(name: str) -> str:
    return " ".join([p["prompt"] for p in prompts(name)] + [t for a in adapters(name) for t in a["examples"]])


def invented_names(name: str) -> set[str]:
    """Capitalised words of the relation prompts and examples that are not ordinary English words.

    An ordinary word ("Who", "Were") also appears in lower case somewhere in the two sets; an invented name never
    does.
    """
    texts = [p["prompt"] for p in prompts(name) if p["adapters"] and set(p["adapters"]) <= RELATIONS[name]]
    texts += [t for a in adapters(name) if a["name"] in RELATIONS[name] for t in (a["description"], *a["examples"])]
    lower = set(re.findall(r"\b[a-z]+\b", " ".join(all_text(n) for n in SETS)))
    words = {w for t in texts for w in re.findall(r"\b[A-Z][a-z]{2,}\b", t)}
    return {w for w in words if w.lower() not in lower}


@pytest.mark.parametrize("name", SETS)
def test_adapters_are_well_formed(name: str) -> None:
    found = adapters(name)
    names = [a["name"] for a in found]
    assert len(found) == 8 and len(set(names)) == 8, names
    assert RELATIONS[name] <= set(names)
    for a in found:
        assert set(a) == {"name", "description", "examples"}, a["name"]
        assert a["description"].strip() and len(a["examples"]) == 6, a["name"]
        assert len(set(a["examples"])) == 6, a["name"]


@pytest.mark.parametrize("name", SETS)
def test_prompts_are_labelled_consistently(name: str) -> None:
    known = {a["name"] for a in adapters(name)}
    for p in prompts(name):
        assert set(p) == {"prompt", "adapters", "compositional", "kind"}, p
        assert p["kind"] in KINDS, p
        assert all(a in known for a in p["adapters"]), p
        assert p["compositional"] is (p["kind"] in ("two-hop", "conjunction")), p
        assert len(p["adapters"]) == KINDS[p["kind"]] == len(set(p["adapters"])), p
        assert p["prompt"] == p["prompt"].strip() and p["prompt"], p


@pytest.mark.parametrize("name", SETS)
def test_every_kind_is_present_and_single_is_balanced(name: str) -> None:
    found = prompts(name)
    assert {p["kind"] for p in found} == set(KINDS)
    per_adapter: dict[str, int] = {}
    for p in found:
        if p["kind"] == "single":
            per_adapter[p["adapters"][0]] = per_adapter.get(p["adapters"][0], 0) + 1
    assert set(per_adapter) == {a["name"] for a in adapters(name)}
    assert len(set(per_adapter.values())) == 1, per_adapter


def test_no_prompt_is_repeated_or_copies_an_example() -> None:
    seen: dict[str, str] = {}
    examples = {e.casefold() for name in SETS for a in adapters(name) for e in a["examples"]}
    for name in SETS:
        for p in prompts(name):
            key = p["prompt"].casefold()
            assert key not in seen, (p["prompt"], seen.get(key), name)
            assert key not in examples, p["prompt"]
            seen[key] = name


def test_heldout_shares_no_adapter_or_invented_name_with_the_main_set() -> None:
    main, heldout = ({a["name"] for a in adapters(n)} for n in SETS)
    assert not main & heldout
    main_names, heldout_names = invented_names("routing"), invented_names("routing_heldout")
    assert {"Veldmoor", "Harrowmere"} <= main_names and {"Pellandry", "Quenmouth"} <= heldout_names
    assert not main_names & heldout_names
    for names, other in ((heldout_names, "routing"), (main_names, "routing_heldout")):
        assert not {w for w in names if re.search(rf"\b{w}\b", all_text(other))}, other
