"""A seeded fictional world for the two-hop reuse-limit kit: people, spouses, birth cities, questions.

Why it is shaped this way (see issue #6 and DESIGN.md "Compositional queries"):

* A two-hop question ("where was the spouse of X born?") needs hop 1 (spouse of X = Y) and hop 2
  (Y was born in C). The kit puts hop 1 of the *evaluation* world into one LoRA and hop 2 into
  another, so that answering needs knowledge from two disjointly trained adapters.
* The tiny base model must be able to *chain* two facts it knows, or no policy could ever succeed
  and the table would say nothing. It learns that on worlds of its own, with the two-hop chains
  of a large share of its couples held out of pretraining: chaining is then measured on chains it
  never saw, so it is a skill, not memory.
* Every fact is taught in two surfaces: as a question ("who is X married to ?") and as the
  statement the step-by-step answer is made of ("the spouse of X is Y ."). The step-by-step chain
  is then two statements, and its second one starts by copying the name the first one produced.
  Copy drills (chain prefixes with random names, loss on the copied words only) teach that copy
  for every name, the evaluation world's included, without teaching any fact about them.
* Names are single words of a word-level vocabulary, invented from syllables, so a base model
  never saw facts about them. Each name belongs to exactly one world, so facts never collide.

Everything here is pure Python and deterministic for a seed; training lives in build.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

HOP1_QUESTIONS = ("who is {x} married to ?", "who is the spouse of {x} ?", "name the spouse of {x} .")
HOP2_QUESTIONS = ("where was {x} born ?", "in which city was {x} born ?", "what is the birthplace of {x} ?")
TWOHOP_QUESTIONS = (
    "where was the spouse of {x} born ?",
    "in which city was the spouse of {x} born ?",
    "what is the birthplace of the spouse of {x} ?",
)
HOP1_STATEMENT = "the spouse of {x} is"
HOP2_STATEMENT = "{x} was born in"
DIRECT_SUFFIX = "answer with the city only ."
STEPS_SUFFIX = "think step by step ."

Format = Literal["direct", "steps"]
Kind = Literal["hop1", "hop2", "twohop"]

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "eo", "ia")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "x")


@dataclass(frozen=True)
class Person:
    """One person: a single-word name, the spouse's name and the birth city."""

    name: str
    spouse: str
    city: str


@dataclass(frozen=True)
class World:
    """A closed set of married couples. ``chained`` names the people whose two-hop chains were taught."""

    label: str
    people: tuple[Person, ...]
    chained: frozenset[str] = frozenset()

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


@dataclass(frozen=True)
class Example:
    """A prompt and the words a model should produce after it.

    ``final`` is False for drills that stop mid-answer (no end-of-sequence is taught there).
    ``expected`` is what grading looks for in a completion (the city for two-hop questions).
    """

    prompt: str
    answer: str
    kind: str
    expected: str
    final: bool = True


@dataclass(frozen=True)
class KitSize:
    """How big a build is. ``FULL`` is the shipped kit; ``SMALL`` is the reduced build CI reproduces."""

    base_worlds: int
    people_per_world: int
    eval_people: int
    cities: int
    held_out_share: float = 0.5


FULL = KitSize(base_worlds=4, people_per_world=24, eval_people=32, cities=16)
SMALL = KitSize(base_worlds=2, people_per_world=24, eval_people=16, cities=12)


def invent_names(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct pronounceable two- or three-syllable names, none an English word of the vocabulary."""
    names: set[str] = set()
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if len(word) >= 4 and word not in FUNCTION_WORDS:
            names.add(word)
    ordered = sorted(names)  # a set iterates in hash order, which changes between processes
    rng.shuffle(ordered)
    return ordered


def make_world(label: str, names: Sequence[str], cities: Sequence[str], rng: random.Random,
               held_out_share: float = 0.0) -> World:
    """Pair ``names`` into couples, give everyone a birth city, choose whose chains are taught.

    Held-out chains are chosen by couple, so a held-out person's spouse is held out too and no
    chain of that couple appears in pretraining in either direction.
    """
    if len(names) % 2:
        raise ValueError("a world needs an even number of people")
    order = list(names)
    rng.shuffle(order)
    couples = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
    people = []
    for a, b in couples:
        people.append(Person(a, b, rng.choice(cities)))
        people.append(Person(b, a, rng.choice(cities)))
    taught_couples = couples[: round(len(couples) * (1 - held_out_share))]
    chained = frozenset(n for couple in taught_couples for n in couple)
    return World(label, tuple(people), chained)


@dataclass(frozen=True)
class Kit:
    """The base worlds (the base model's own), the evaluation world (new to it), names and cities."""

    base: tuple[World, ...]
    evaluation: World
    cities: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for w in (*self.base, self.evaluation) for p in w.people)

    def vocabulary(self) -> list[str]:
        """Every word any prompt or answer can contain, in a fixed order."""
        return [*FUNCTION_WORDS, *self.cities, *self.names]


FUNCTION_WORDS = tuple(dict.fromkeys(
    " ".join((*HOP1_QUESTIONS, *HOP2_QUESTIONS, *TWOHOP_QUESTIONS, HOP1_STATEMENT, HOP2_STATEMENT,
              DIRECT_SUFFIX, STEPS_SUFFIX)).replace("{x}", " ").split()
))
"""The words of the templates, in first-seen order (punctuation included)."""


def make_kit(size: KitSize, seed: int) -> Kit:
    """The whole kit for ``seed``: same seed, same worlds, same names, same cities."""
    rng = random.Random(seed)
    total = size.base_worlds * size.people_per_world + size.eval_people
    pool = invent_names(total + size.cities, rng)
    cities = tuple(f"{c}ville" for c in pool[:size.cities])
    names = pool[size.cities:]
    base = []
    for w in range(size.base_worlds):
        chunk = names[w * size.people_per_world:(w + 1) * size.people_per_world]
        base.append(make_world(f"base{w}", chunk, cities, rng, size.held_out_share))
    evaluation = make_world("eval", names[-size.eval_people:], cities, rng)
    return Kit(tuple(base), evaluation, cities)


def hop_examples(world: World, kind: Literal["hop1", "hop2"]) -> list[Example]:
    """Every single-hop fact of ``world`` for one relation, in every question template and as a statement."""
    out = []
    for p in world.people:
        value = p.spouse if kind == "hop1" else p.city
        questions = HOP1_QUESTIONS if kind == "hop1" else HOP2_QUESTIONS
        statement = HOP1_STATEMENT if kind == "hop1" else HOP2_STATEMENT
        out += [Example(q.format(x=p.name), f"{value} .", kind, value) for q in questions]
        out.append(Example(statement.format(x=p.name), f"{value} .", f"{kind}-statement", value))
    return out


def chain_answer(world: World, person: Person) -> str:
    spouse = world.person(person.spouse)
    first = f"{HOP1_STATEMENT.format(x=person.name)} {spouse.name} ."
    return f"{first} {HOP2_STATEMENT.format(x=spouse.name)} {spouse.city} ."


def twohop_examples(world: World, fmt: Format, people: Sequence[Person] | None = None) -> list[Example]:
    """Two-hop questions about ``people`` (default: all), each template, in one answer format."""
    out = []
    for p in people if people is not None else world.people:
        city = world.person(p.spouse).city
        answer = f"{city} ." if fmt == "direct" else chain_answer(world, p)
        suffix = DIRECT_SUFFIX if fmt == "direct" else STEPS_SUFFIX
        out += [Example(f"{q.format(x=p.name)} {suffix}", answer, f"twohop-{fmt}", city) for q in TWOHOP_QUESTIONS]
    return out


def copy_drills(names: Sequence[str], cities: Mapping[str, str], rng: random.Random, count: int) -> list[Example]:
    """Chain prefixes over random names: the copy and recall steps of a chain, apart from any real chain.

    Two kinds: the chain's opening ("the spouse of Z is", copying Z from the question) and the
    second step ("Z2 was born in C", copying the name the first step produced, then recalling
    *its* city). Z2 is not Z1's spouse; only the answer words are trained, so no false fact is
    taught, but the city is decoupled from the question's subject: without this the base learns
    that a chain's city follows the subject (true for every taught chain) and answers unseen
    chains with the subject's own birthplace. Names without a known city (the evaluation
    world's) get the copy only.
    """
    out = []
    for _ in range(count):
        z1, z2 = rng.sample(list(names), 2)
        question = f"{rng.choice(TWOHOP_QUESTIONS).format(x=z1)} {STEPS_SUFFIX}"
        if rng.random() < 0.3:
            out.append(Example(question, HOP1_STATEMENT.format(x=z1), "drill-open", z1, final=False))
        else:
            prefix = f"{question} {HOP1_STATEMENT.format(x=z1)} {z2} ."
            step = HOP2_STATEMENT.format(x=z2)
            if z2 in cities:
                out.append(Example(prefix, f"{step} {cities[z2]} .", "drill-recall", cities[z2]))
            else:
                out.append(Example(prefix, step, "drill-copy", z2, final=False))
    return out


def split_chains(world: World) -> tuple[list[Person], list[Person]]:
    """(people whose chains were taught, people whose chains were held out) of a base world."""
    taught = [p for p in world.people if p.name in world.chained]
    held = [p for p in world.people if p.name not in world.chained]
    return taught, held


def pretraining_pools(kit: Kit) -> dict[str, list[Example]]:
    """The base model's training data by kind (the mixture weights live in build.py)."""
    facts: list[Example] = []
    chains: list[Example] = []
    for world in kit.base:
        facts += hop_examples(world, "hop1") + hop_examples(world, "hop2")
        taught, _ = split_chains(world)
        chains += twohop_examples(world, "steps", taught) + twohop_examples(world, "direct", taught)
    return {"facts": facts, "chains": chains}


def held_out_chains(kit: Kit, fmt: Format) -> list[Example]:
    """The base worlds' two-hop questions never shown in pretraining: the chaining control."""
    return [e for w in kit.base for e in twohop_examples(w, fmt, split_chains(w)[1])]


def cycle_forever(items: Sequence[Example], rng: random.Random) -> Iterator[Example]:
    """Shuffled passes over ``items``, endlessly (each item once per pass)."""
    order = list(items)
    while True:
        rng.shuffle(order)
        yield from order
