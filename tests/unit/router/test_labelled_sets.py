"""Integrity of the hand-labelled routing sets (tests/data/routing, routing_heldout and routing_fresh).

Thresholds are chosen on the main set and reported on the held-out one; the fresh set is kept for prompts that no
threshold or detector has ever been measured against. A set is only an honest test if it shares nothing with the
others: no adapter, no invented name, no prompt. These checks also catch labelling slips (a misspelt adapter, a
conjunction marked non-compositional) that would otherwise just shift the benchmark's figures.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"
SETS = ("routing", "routing_heldout", "routing_fresh")
KINDS = {"single": 1, "near-miss": 1, "two-hop": 2, "conjunction": 2, "none": 0}
# The relation adapters, whose prompts name the invented people, cities and companies of each set's world.
RELATIONS = {"routing": {"spouses", "birthplaces", "employers"},
             "routing_heldout": {"mentors", "residences", "siblings"},
             "routing_fresh": {"neighbours", "godparents", "schools"}}
# Two invented names per world (its name and a town) that the name check must find, so it cannot pass vacuously.
WORLDS = {"routing": {"Veldmoor", "Harrowmere"},
          "routing_heldout": {"Pellandry", "Quenmouth"},
          "routing_fresh": {"Osterlune", "Calderwick"}}
# Prompts per kind, as each set's README states them; a set grows only by an edit that says so here and there.
COUNTS = {"routing": {"single": 120, "two-hop": 101, "conjunction": 81, "near-miss": 53, "none": 20},
          "routing_heldout": {"single": 120, "two-hop": 40, "conjunction": 30, "near-miss": 20, "none": 20},
          "routing_fresh": {"single": 100, "two-hop": 35, "conjunction": 25, "near-miss": 20, "none": 20}}


def adapters(name: str) -> list[dict[str, Any]]:
    return list(json.loads((DATA / name / "adapters.json").read_text(encoding="utf-8")))


def prompts(name: str) -> list[dict[str, Any]]:
    lines = (DATA / name / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def texts(name: str) -> list[str]:
    return [p["prompt"] for p in prompts(name)] + [t for a in adapters(name) for t in a["examples"]]


def all_text(name: str) -> str:
    return " ".join(texts(name))


def invented_names(name: str) -> set[str]:
    """Capitalised words of the relation prompts and examples that are not ordinary English words.

    An ordinary word ("Who", "Were") also appears in lower case somewhere in the sets; an invented name never does.
    A text with no capital at all ("where did thaddea brisk go to school ?") writes its names in lower case too,
    so only texts with some capital letter say which words are ordinary.
    """
    own = [p["prompt"] for p in prompts(name) if p["adapters"] and set(p["adapters"]) <= RELATIONS[name]]
    own += [t for a in adapters(name) if a["name"] in RELATIONS[name] for t in (a["description"], *a["examples"])]
    cased = [t for n in SETS for t in texts(n) if t != t.lower()]
    lower = set(re.findall(r"\b[a-z]+\b", " ".join(cased)))
    words = {w for t in own for w in re.findall(r"\b[A-Z][a-z]{2,}\b", t)}
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
def test_every_kind_has_its_stated_count_and_single_is_balanced(name: str) -> None:
    found = prompts(name)
    counts: dict[str, int] = {}
    for p in found:
        counts[p["kind"]] = counts.get(p["kind"], 0) + 1
    assert counts == COUNTS[name]
    per_adapter: dict[str, int] = {}
    for p in found:
        if p["kind"] == "single":
            per_adapter[p["adapters"][0]] = per_adapter.get(p["adapters"][0], 0) + 1
    assert set(per_adapter) == {a["name"] for a in adapters(name)}
    # Balanced up to one: 100 single prompts over 8 adapters cannot be exactly even.
    assert max(per_adapter.values()) - min(per_adapter.values()) <= 1, per_adapter


def test_no_prompt_is_repeated_or_copies_an_example() -> None:
    seen: dict[str, str] = {}
    examples = {e.casefold() for name in SETS for a in adapters(name) for e in a["examples"]}
    for name in SETS:
        for p in prompts(name):
            key = p["prompt"].casefold()
            assert key not in seen, (p["prompt"], seen.get(key), name)
            assert key not in examples, p["prompt"]
            seen[key] = name


@pytest.mark.parametrize("name", SETS)
def test_world_names_are_found_as_invented(name: str) -> None:
    assert WORLDS[name] <= invented_names(name)


@pytest.mark.parametrize(("one", "other"), list(itertools.combinations(SETS, 2)))
def test_sets_share_no_adapter_or_invented_name(one: str, other: str) -> None:
    assert not {a["name"] for a in adapters(one)} & {a["name"] for a in adapters(other)}
    one_names, other_names = invented_names(one), invented_names(other)
    assert not one_names & other_names, sorted(one_names & other_names)
    for names, text in ((one_names, all_text(other)), (other_names, all_text(one))):
        shared = sorted(w for w in names if re.search(rf"\b{w}\b", text))
        assert not shared, (one, other, shared)
