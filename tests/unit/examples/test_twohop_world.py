"""The two-hop kit's world generator: deterministic, collision-free, and honest about what it teaches."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from examples.twohop import world as w
from examples.twohop.build import Encoder, evaluation_sets, vocabulary

ROOT = Path(__file__).resolve().parents[3]


def test_same_seed_same_kit_in_any_process() -> None:
    """Python's set order changes with PYTHONHASHSEED; the kit must not."""
    code = ("import sys; sys.path.insert(0, '.'); from examples.twohop import world as w; "
            "k = w.make_kit(w.SMALL, 3); print(k.names, k.cities, k.evaluation.people, sorted(k.base[0].chained))")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    assert w.make_kit(w.SMALL, 3) == w.make_kit(w.SMALL, 3)
    assert w.make_kit(w.SMALL, 3).names != w.make_kit(w.SMALL, 4).names


def test_every_name_belongs_to_one_world_and_spouses_pair_up() -> None:
    kit = w.make_kit(w.FULL, 0)
    assert len(kit.names) == len(set(kit.names)) == w.FULL.base_worlds * w.FULL.people_per_world + w.FULL.eval_people
    assert not set(kit.names) & set(kit.cities)
    for world in (*kit.base, kit.evaluation):
        for p in world.people:
            assert world.person(p.spouse).spouse == p.name != p.spouse
            assert p.city in kit.cities


def test_held_out_chains_are_whole_couples_never_in_pretraining() -> None:
    kit = w.make_kit(w.FULL, 0)
    pools = w.pretraining_pools(kit)
    taught_prompts = {e.prompt for e in pools["chains"]}
    held = w.held_out_chains(kit, "steps") + w.held_out_chains(kit, "direct")
    assert held and not taught_prompts & {e.prompt for e in held}
    for world in kit.base:
        for p in world.people:
            assert (p.name in world.chained) == (p.spouse in world.chained)
        share = 1 - len(world.chained) / len(world.people)
        assert abs(share - w.FULL.held_out_share) < 0.1
    # but every single fact of every base person is taught, in both surfaces
    facts = {(e.prompt, e.answer) for e in pools["facts"]}
    person = kit.base[0].people[0]
    assert (w.HOP2_STATEMENT.format(x=person.name), f"{person.city} .") in facts


def test_drills_teach_no_fact_about_the_evaluation_world() -> None:
    kit = w.make_kit(w.SMALL, 0)
    cities = {p.name: p.city for world in kit.base for p in world.people}
    drills = w.copy_drills(kit.names, cities, random.Random(0), 2000)
    eval_names = {p.name for p in kit.evaluation.people}
    kinds = {d.kind for d in drills}
    assert kinds == {"drill-open", "drill-copy", "drill-recall"}
    for d in drills:
        answer = d.answer.split()
        assert d.expected in d.prompt.split()[-2:] or d.kind != "drill-copy"
        if d.kind == "drill-recall":  # recalls only known (base-world) cities
            assert answer[0] in cities and answer[-2] == cities[answer[0]]
        else:  # a copy: every answer word is in the prompt or the template, and nothing is concluded
            assert not d.final and set(answer) <= set(d.prompt.split()) | set(w.FUNCTION_WORDS)
        assert not (set(answer) & set(kit.cities)) or answer[0] not in eval_names


def test_eval_sets_cover_every_person_in_every_template_and_tokenize() -> None:
    kit = w.make_kit(w.SMALL, 0)
    sets = evaluation_sets(kit)
    people = len(kit.evaluation.people)
    assert {k: len(v) for k, v in sets.items()} == {"hop1": 3 * people, "hop2": 3 * people,
                                                   "twohop-direct": 3 * people, "twohop-steps": 3 * people}
    encoder = Encoder(vocabulary(kit))
    for examples in sets.values():
        for e in examples:
            prompt, answer = encoder.example(e)  # KeyError if any word were missing from the vocabulary
            assert prompt[0] == encoder.bos and answer[-1] == encoder.eos
    spouse_city = {p.name: kit.evaluation.person(p.spouse).city for p in kit.evaluation.people}
    for e in sets["twohop-steps"]:
        subject = e.prompt.split(" of ")[-1].split()[0]
        assert e.expected == spouse_city[subject] and e.answer.endswith(f"{e.expected} .")
