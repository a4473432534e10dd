"""How a chain step is scored: every candidate score on the two-hop kit, the contrast chosen on one half of its
people and reported on the other, then on kits of other seeds without retuning.

Why a tree: the score decides which step is kept, and the next step continues *that* text, so scores cannot
be compared on one fixed set of generations. The script expands, for every question, the tree of step
continuations a chain can reach (each hop adapter's step at every node, greedy, with the base model's
reference pass over it, exactly the requests the executor sends), then replays the executor's choice rule
(``server.chain.STEP_SCORES``, ``best``) over the tree for each score. One exploration scores them all.

Honest split: the kit's subjects (the person a question asks about; each has three phrasings per kind)
are shuffled with a fixed seed and halved. ``contrast`` is chosen on half A alone (the most questions right
over hop1, hop2 and twohop-steps; among equals the middle of the plateau), then reported on half B, and
on every other kit given with ``--kit`` as is.

Run: ``python -m bench.bench_chain_scores [--quick] [--kit DIR ...]``; prints its headline last.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import random
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.bench_chain import kit_gateway
from bench.benchkit import bench_parser, output_dir, plot_file
from loragate.server.chain import STEP_SCORES, Generated, best, prompt_logprobs
from loragate.workers.dispatch import Attempt

KIT = report.ROOT / "examples" / "twohop" / "artifacts"
KINDS = ("twohop-steps", "hop1", "hop2", "twohop-direct")
SCORED = ("twohop-steps", "hop1", "hop2")  # what the contrast is chosen on (direct answers have no step to switch)
DELIMITERS = (".", "\n")
MAX_TOKENS = 14  # the demo's budget: a step-by-step answer is 12 words and </s>
MAX_STEPS = 4
CONTRASTS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
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


def answer(nodes: Sequence[Node], score: str, contrast: float) -> str:
    """The executor's choice rule replayed over the tree: the best-scored step, then its continuation."""
    fn = STEP_SCORES[score]
    scored = [(n, fn(n.generated.logprobs, n.reference, contrast)) for n in nodes]
    winner = best([replace(n.generated, score=s) for n, s in scored])
    node = next(n for n, _ in scored if n.generated.adapter == winner.adapter)
    return node.generated.text + (answer(node.children, score, contrast) if node.children else "")


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
    adapters = list(HOPS)
    out: list[Question] = []
    started = time.time()
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
        limit = asyncio.Semaphore(4)

        async def one(kind: str, item: Mapping[str, Any]) -> Question:
            async with limit:
                tree = await _expand(client, item["prompt"], adapters, 0, 0)
            return Question(kind, item["prompt"], item["expected"], tree)

        for kind in KINDS:
            lines = (kit / "eval" / f"{kind}.jsonl").read_text().splitlines()
            items = [json.loads(line) for line in lines if line.strip()][:per_kind]
            out += await asyncio.gather(*(one(kind, i) for i in items))
            print(f"    explored {kind}: {len(items)} questions ({time.time() - started:.0f} s)", flush=True)
    return out


def success(questions: Sequence[Question], score: str, contrast: float, kind: str,
            subjects: set[str] | None = None) -> tuple[int, int]:
    chosen = [q for q in questions if q.kind == kind and (subjects is None or subject(q.prompt) in subjects)]
    return sum(q.expected in answer(q.tree, score, contrast) for q in chosen), len(chosen)


def halves(questions: Sequence[Question], seed: int = 0) -> tuple[set[str], set[str]]:
    names = sorted({subject(q.prompt) for q in questions})
    random.Random(seed).shuffle(names)
    return set(names[: len(names) // 2]), set(names[len(names) // 2:])


def choose_contrast(parts: Sequence[tuple[Sequence[Question], set[str] | None]]) -> tuple[float, dict[float, int]]:
    """The contrast with the most right over the training parts (each: questions, and the subjects that count,
    None for all); among equals the middle of the plateau."""
    totals = {c: sum(success(qs, "contrastive", c, k, names)[0] for qs, names in parts for k in SCORED)
              for c in CONTRASTS}
    top = max(totals.values())
    tied = [c for c in CONTRASTS if totals[c] == top]
    return statistics.median_low(tied), totals


def _cell(ok_n: tuple[int, int]) -> str:
    ok, n = ok_n
    return f"{ok}/{n} ({ok / n:.0%})" if n else "-"


def rules(contrast: float) -> list[tuple[str, str, float]]:
    return [("mean", "mean", 0.0), ("min", "min", 0.0), (f"contrastive c={contrast:g}", "contrastive", contrast)]


def tables(questions: Sequence[Question], train: set[str], test: set[str], contrast: float,
           totals: Mapping[float, int]) -> str:
    head = "| score | half | " + " | ".join(KINDS) + " |\n|---|---|" + "---:|" * len(KINDS) + "\n"
    rows = []
    for label, score, c in rules(contrast):
        for half, names in (("A (chose c)", train), ("B (held out)", test)):
            rows.append(f"| {label} | {half} | " + " | ".join(_cell(success(questions, score, c, k, names))
                                                          for k in KINDS) + " |")
    grid = ("| contrast | right on the training parts (hop1 + hop2 + twohop-steps) | B twohop-steps | B hop2 |\n"
            "|---:|---:|---:|---:|\n")
    grid += "\n".join(f"| {c:g} | {totals[c]} | {_cell(success(questions, 'contrastive', c, 'twohop-steps', test))} "
                      f"| {_cell(success(questions, 'contrastive', c, 'hop2', test))} |" for c in CONTRASTS)
    return (head + "\n".join(rows) + "\n\nEvery contrast on the grid (chosen: the middle of the training parts' "
            "best):\n\n" + grid)


def seed_table(kits: Mapping[str, list[Question]], contrast: float) -> str:
    head = "| kit | score | " + " | ".join(KINDS) + " |\n|---|---|" + "---:|" * len(KINDS) + "\n"
    rows = [f"| {name} | {label} | " + " | ".join(_cell(success(qs, score, c, k)) for k in KINDS) + " |"
            for name, qs in kits.items() for label, score, c in rules(contrast)]
    return head + "\n".join(rows)


def plot(questions: Sequence[Question], train: set[str], test: set[str], contrast: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [max(c, 3e-4) for c in CONTRASTS]
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, style in (("twohop-steps", "-"), ("hop2", "--"), ("hop1", ":")):
        for half, names, marker in (("A", train, "o"), ("B", test, "s")):
            rates = [success(questions, "contrastive", c, kind, names) for c in CONTRASTS]
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
    shipped = explore_kit(KIT, data / "shipped", per_kind)
    train, test = halves(shipped)
    trained = {kit.name: explore_kit(kit, data / kit.name, per_kind) for kit in train_kits}
    contrast, totals = choose_contrast([(shipped, train), *((qs, None) for qs in trained.values())])
    others = {f"{kit.name} (held out)": explore_kit(kit, data / kit.name, per_kind) for kit in kits}
    plot(shipped, train, test, contrast, plot_file("chain_scores", out))
    held = success(shipped, "contrastive", contrast, "twohop-steps", test)
    chosen_on = "half A" + "".join(f" and all of {name}" for name in trained)
    body = (f"Tree replay of the chain's step choice (k=2 hop adapters, max_tokens {MAX_TOKENS}, greedy) on the "
            f"shipped kit, {len(shipped)} questions; subjects halved with seed 0 ({len(train)} / {len(test)}). "
            f"Chosen on {chosen_on}: contrast = {contrast:g}.\n\n" + tables(shipped, train, test, contrast, totals)
            + ("\n\nKits that chose the contrast with half A:\n\n" + seed_table(trained, contrast) if trained else "")
            + ("\n\nHeld-out kits, the same contrast:\n\n" + seed_table(others, contrast) if others else "")
            + "\n\n![success by contrast](chain_scores.png)\n")
    report.write_section("chain_scores", "Chain step scores (contrast chosen on one part, reported on the others)",
                         body, out_dir=out)
    return (f"chain score=contrastive c={contrast:g} (chosen on {chosen_on}): twohop-steps {_cell(held)} on the "
            f"held-out half B; mean {_cell(success(shipped, 'mean', 0.0, 'twohop-steps', test))}")


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
