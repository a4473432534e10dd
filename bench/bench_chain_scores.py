"""How a chain step is scored: every candidate score on the two-hop kit, the contrast chosen on one half of its
people and reported on the other, then on kits of other seeds without retuning.

Why a tree: the score decides which step is kept, and the next step continues *that* text, so scores cannot
be compared on one fixed set of generations. The script expands, for every question, the tree of step
continuations a chain can reach (each hop adapter's step at every node, greedy, with the base model's
reference pass over it, exactly the requests the executor sends), then replays the executor's choice rule
(``server.chain.STEP_SCORES``, ``best``) over the tree for each score. One exploration scores them all.

Honest split: the kit's subjects (the person a question asks about; each has three phrasings per kind)
are shuffled with a fixed seed and halved. ``contrast`` is chosen on half A alone; then ``topic`` (the
weight of a step's similarity to its candidate's own descriptors, embedded in-process with the gateway's
default embedder, as its index does) on half A plus the kits given with ``--train-kit``. Each is the
grid value with the most questions right over hop1, hop2 and twohop-steps, among equals the middle of
the plateau. Everything is reported on half B and on the ``--kit`` kits, which chose nothing.

Run: ``python -m bench.bench_chain_scores [--quick] [--train-kit DIR ...] [--kit DIR ...]``; prints its
headline last.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.bench_chain import Question as KitQuestion
from bench.bench_chain import kit_gateway
from bench.bench_chain import questions as kit_questions
from bench.benchkit import bench_parser, output_dir, plot_file
from loragate.loadtest.plots import pyplot
from loragate.router.embedder import make_backend
from loragate.server.chain import STEP_SCORES, Generated, best, prompt_logprobs
from loragate.workers.dispatch import Attempt

KIT = report.ROOT / "examples" / "twohop" / "artifacts"
KINDS = ("twohop-steps", "hop1", "hop2", "twohop-direct")
SCORED = ("twohop-steps", "hop1", "hop2")  # what the contrast is chosen on (direct answers have no step to switch)
DELIMITERS = (".", "\n")
MAX_TOKENS = 14  # the demo's budget: a step-by-step answer is 12 words and </s>
MAX_STEPS = 4
CONTRASTS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
TOPICS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
BASE_NAME = "twohop-base"
HOPS = ("spouses", "birthplaces")  # what chain;k=2 chooses from: the adapters with descriptors (not the oracle)


@dataclass(frozen=True)
class Node:
    """One candidate's step at one point of the answer, its base-model reference, and where it leads."""

    generated: Generated
    reference: tuple[float, ...]
    children: tuple[Node, ...] | None


def _pin(adapter: str) -> dict[str, str]:
    return {"X-Adapter-Policy": f'pin;adapter="{adapter}"'}


async def _step(client: httpx.AsyncClient, prompt: str, adapter: str, budget: int) -> Generated:
    body = {"model": BASE_NAME, "prompt": prompt, "max_tokens": budget, "stop": list(DELIMITERS),
            "include_stop_str_in_output": True, "logprobs": 1, "temperature": 0}
    data = (await client.post("/v1/completions", json=body, headers=_pin(adapter))).raise_for_status().json()
    choice = data["choices"][0]
    values = tuple(float(v) for v in choice["logprobs"]["token_logprobs"] if v is not None)
    at_delimiter = choice["finish_reason"] == "stop" and choice.get("stop_reason") in DELIMITERS
    return Generated(adapter, choice["text"], values, data["usage"]["completion_tokens"], choice["finish_reason"],
                     at_delimiter, data["usage"]["prompt_tokens"], Attempt(None, 0.0))


async def _reference(client: httpx.AsyncClient, prompt: str, generated: Generated) -> tuple[float, ...]:
    if not generated.tokens:
        return ()
    body = {"model": BASE_NAME, "prompt": prompt + generated.text, "max_tokens": 1, "prompt_logprobs": 0}
    data = (await client.post("/v1/completions", json=body, headers={"X-Adapter-Policy": "base"})
            ).raise_for_status().json()
    return tuple(prompt_logprobs(data, data["usage"]["prompt_tokens"] - generated.prompt_tokens))


async def _expand(client: httpx.AsyncClient, prompt: str, adapters: Sequence[str], used: int, depth: int
                  ) -> tuple[Node, ...]:
    steps = await asyncio.gather(*(_step(client, prompt, a, MAX_TOKENS - used) for a in adapters))
    references = await asyncio.gather(*(_reference(client, prompt, g) for g in steps))
    nodes = []
    for g, ref in zip(steps, references, strict=True):
        goes_on = g.at_delimiter and g.text and g.finish_reason != "length" and depth + 1 < MAX_STEPS \
            and used + g.tokens < MAX_TOKENS
        children = await _expand(client, prompt + g.text, adapters, used + g.tokens, depth + 1) if goes_on else None
        nodes.append(Node(g, ref, children))
    return tuple(nodes)


def subject(prompt: str) -> str:
    """The person a kit question asks about (the word after "of", or before "born"/"married")."""
    match = re.search(r"(?:of|was|is) (\w+) (?:born|married|\?|\.)", prompt)
    if match is None:
        raise ValueError(f"no subject in {prompt!r}")
    return match.group(1)


@dataclass(frozen=True)
class Question:
    kind: str
    prompt: str
    expected: str
    tree: tuple[Node, ...]


async def explore(gateway: str, kit: Path, per_kind: int | None) -> list[Question]:
    """Every question's tree (``per_kind`` of each kind sampled as bench_chain samples them, or all)."""
    out: list[Question] = []
    started = time.time()
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
        limit = asyncio.Semaphore(4)

        async def one(asked: KitQuestion) -> Question:
            async with limit:
                tree = await _expand(client, asked.prompt, list(HOPS), 0, 0)
            return Question(asked.kind, asked.prompt, asked.expected, tree)

        sample = kit_questions(kit, per_kind)
        for kind in KINDS:
            items = [q for q in sample if q.kind == kind]
            out += await asyncio.gather(*(one(q) for q in items))
            print(f"    explored {kind}: {len(items)} questions ({time.time() - started:.0f} s)", flush=True)
    return out


def halves(questions: Sequence[Question], seed: int = 0) -> tuple[set[str], set[str]]:
    names = sorted({subject(q.prompt) for q in questions})
    random.Random(seed).shuffle(names)
    return set(names[: len(names) // 2]), set(names[len(names) // 2:])


@dataclass(frozen=True)
class Rule:
    """A way to choose a step: ``server.chain.STEP_SCORES[score]`` plus ``topic`` x the descriptor fit."""

    score: str
    contrast: float = 0.0
    topic: float = 0.0

    @property
    def label(self) -> str:
        if self.score != "contrastive":
            return self.score
        return f"contrastive c={self.contrast:g}" + (f" + topic {self.topic:g}" if self.topic else "")


@dataclass
class Kit:
    """A kit's explored questions, and its steps' similarity to each hop adapter's descriptors."""

    name: str
    questions: list[Question]
    fits: dict[tuple[str, str], float]

    def answer(self, nodes: Sequence[Node], rule: Rule) -> str:
        """The executor's choice rule replayed over the tree: the best-scored step, then its continuation."""
        fn = STEP_SCORES[rule.score]
        scored = [(n, fn(n.generated.logprobs, n.reference, rule.contrast)
                   + rule.topic * self.fits.get((n.generated.text, n.generated.adapter or ""), 0.0)) for n in nodes]
        winner = best([replace(n.generated, score=s) for n, s in scored])
        node = next(n for n, _ in scored if n.generated.adapter == winner.adapter)
        return node.generated.text + (self.answer(node.children, rule) if node.children else "")

    def success(self, rule: Rule, kind: str, subjects: set[str] | None = None) -> tuple[int, int]:
        chosen = [q for q in self.questions if q.kind == kind and (subjects is None or subject(q.prompt) in subjects)]
        return sum(q.expected in self.answer(q.tree, rule) for q in chosen), len(chosen)


def _steps(nodes: Sequence[Node]) -> list[Generated]:
    out = []
    for n in nodes:
        out.append(n.generated)
        out += _steps(n.children or ())
    return out


def with_fits(name: str, kit: Path, questions: list[Question], encoder: Any) -> Kit:
    """Every step's similarity to its candidate's descriptors: max cosine over the description and examples,
    as the gateway's index scores an adapter (index_aggregate max)."""
    descriptors = json.loads((kit / "descriptors.json").read_text())
    vectors = {a: encoder.encode([descriptors[a]["description"], *descriptors[a]["examples"]]) for a in HOPS}
    pairs = sorted({(g.text, g.adapter or "") for q in questions for g in _steps(q.tree) if g.text})
    texts = sorted({t for t, _ in pairs})
    embedded = dict(zip(texts, encoder.encode(texts), strict=True)) if texts else {}
    return Kit(name, questions, {(t, a): float((vectors[a] @ embedded[t]).max()) for t, a in pairs})


Part = tuple[Kit, "set[str] | None"]  # a kit and the subjects that count (None: all)


def choose(parts: Sequence[Part], rules: Sequence[Rule]) -> tuple[Rule, dict[Rule, int]]:
    """The rule with the most right over the parts (hop1 + hop2 + twohop-steps); among equals the middle."""
    totals = {r: sum(kit.success(r, k, names)[0] for kit, names in parts for k in SCORED) for r in rules}
    top = max(totals.values())
    tied = [r for r in rules if totals[r] == top]
    return tied[(len(tied) - 1) // 2], totals


def _cell(ok_n: tuple[int, int]) -> str:
    ok, n = ok_n
    return f"{ok}/{n} ({ok / n:.0%})" if n else "-"


def results(rows: Sequence[tuple[str, Kit, set[str] | None]], rules: Sequence[Rule]) -> str:
    head = "| kit | score | " + " | ".join(KINDS) + " |\n|---|---|" + "---:|" * len(KINDS) + "\n"
    return head + "\n".join(f"| {label} | {rule.label} | " + " | ".join(_cell(kit.success(rule, k, names))
                                                                      for k in KINDS) + " |"
                            for label, kit, names in rows for rule in rules)


def grid(totals: Mapping[Rule, int], shipped: Kit, test: set[str], value: str, trained_on: str) -> str:
    lines = [f"| {value} | right on {trained_on} | B twohop-steps | B hop2 |", "|---:|---:|---:|---:|"]
    lines += [f"| {getattr(r, value):g} | {total} | {_cell(shipped.success(r, 'twohop-steps', test))} "
              f"| {_cell(shipped.success(r, 'hop2', test))} |" for r, total in totals.items()]
    return "\n".join(lines)


def plot(shipped: Kit, train: set[str], test: set[str], contrast: float, path: Path) -> None:
    plt = pyplot()

    xs = [max(c, 3e-4) for c in CONTRASTS]
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, style in (("twohop-steps", "-"), ("hop2", "--"), ("hop1", ":")):
        for half, names, marker in (("A", train, "o"), ("B", test, "s")):
            rates = [shipped.success(Rule("contrastive", c), kind, names) for c in CONTRASTS]
            ax.plot(xs, [ok / n for ok, n in rates], style, marker=marker, label=f"{kind}, half {half}")
    ax.axvline(contrast, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("contrast c (0 plotted at 3e-4)")
    ax.set_ylabel("success")
    ax.set_title("chain score=contrastive on the two-hop kit: chosen on half A, held-out half B")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explore_kit(kit: Path, data: Path, per_kind: int | None) -> list[Question]:
    """The kit's trees, explored through a real worker, or read back from ``data`` when the kit is unchanged."""
    cache = data / f"trees-{per_kind or 'all'}.pickle"
    stamp = (kit / "manifest.json").read_bytes()
    if cache.exists():
        stored_stamp, stored = pickle.loads(cache.read_bytes())
        if stored_stamp == stamp:
            print(f"    {kit.name}: trees read back from {cache}", flush=True)
            return list(stored)
    with kit_gateway(kit, data) as gateway:
        questions = asyncio.run(explore(gateway, kit, per_kind))
    cache.write_bytes(pickle.dumps((stamp, questions)))
    return questions


def run(train_kits: Sequence[Path], kits: Sequence[Path], per_kind: int | None, out: Path | None, data: Path) -> str:
    encoder = make_backend()
    load = {p.name: p for p in (KIT, *train_kits, *kits)}

    def kit_of(name: str, path: Path) -> Kit:
        return with_fits(name, path, explore_kit(path, data / ("shipped" if path == KIT else path.name), per_kind),
                         encoder)

    shipped = kit_of("shipped", KIT)
    trained = [kit_of(p.name, load[p.name]) for p in train_kits]
    held = [kit_of(p.name, load[p.name]) for p in kits]
    train, test = halves(shipped.questions)
    contrastive, contrast_totals = choose([(shipped, train)], [Rule("contrastive", c) for c in CONTRASTS])
    topical, topic_totals = choose([(shipped, train), *((k, None) for k in trained)],
                                   [Rule("contrastive", contrastive.contrast, t) for t in TOPICS])
    rules = [Rule("mean"), Rule("min"), contrastive, topical] if topical.topic else \
        [Rule("mean"), Rule("min"), contrastive]
    plot(shipped, train, test, contrastive.contrast, plot_file("chain_scores", out))
    trained_on = "half A" + "".join(f" + {k.name}" for k in trained)
    rows = [("shipped, half A (chose c)", shipped, train), ("shipped, half B (held out)", shipped, test),
            *((f"{k.name} (chose topic)", k, None) for k in trained),
            *((f"{k.name} (held out)", k, None) for k in held)]
    body = (f"Tree replay of the chain's step choice (k=2 hop adapters, max_tokens {MAX_TOKENS}, greedy): the shipped "
            f"kit ({len(shipped.questions)} questions, subjects halved with seed 0: {len(train)} / {len(test)}) and "
            f"small kits of other seeds. Chosen: contrast = {contrastive.contrast:g} on half A, then topic = "
            f"{topical.topic:g} on {trained_on}.\n\n" + results(rows, rules)
            + "\n\nEvery contrast (topic 0) on the grid, chosen on half A (the middle of its best):\n\n"
            + grid(contrast_totals, shipped, test, "contrast", "half A")
            + f"\n\nEvery topic at contrast {contrastive.contrast:g}, chosen on {trained_on}:\n\n"
            + grid(topic_totals, shipped, test, "topic", trained_on)
            + "\n\n![success by contrast](chain_scores.png)\n")
    report.write_section("chain_scores", "Chain step scores (chosen on one part, reported on the others)", body,
                         out_dir=out)
    steps = [f"{k.name} {_cell(k.success(topical, 'twohop-steps'))}" for k in held]
    return (f"chain {topical.label}: twohop-steps on the held-out half B "
            f"{_cell(shipped.success(topical, 'twohop-steps', test))}; held-out kits: {', '.join(steps) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, tiny_model=False)
    parser.add_argument("--kit", type=Path, action="append", default=[],
                        help="a held-out kit (e.g. built with build.py --seed N) scored with the chosen contrast")
    parser.add_argument("--train-kit", type=Path, action="append", default=[],
                        help="a kit whose questions join half A in choosing the contrast")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench/chain-scores"),
                        help="where the gateways keep their files (default: %(default)s)")
    args = parser.parse_args(argv)
    print(run(args.train_kit, args.kit, 6 if args.quick else None, output_dir(args.out), args.data_dir.absolute()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
