"""Routing benchmarks: embedders and the static -> MiniLM cascade (accuracy on the labelled splits and cost),
compositional detection on each split, search latency by index size, and the merge-cache hit rate that
weight rounding buys.

Every threshold is chosen on the training split (``tests/data/routing``) and reported on the others
(:data:`bench.labelled.SPLITS`): the held-out split (``tests/data/routing_heldout``, other domains and names,
written apart, but looked at while some choices were made) and the fresh split (``tests/data/routing_fresh``,
written blind and first measured here). The cascade's margin, floor and floor gap are chosen here, the learned
detector's weights in ``bench/train_detector.py``.

Run: ``python -m bench.bench_routing [--quick]``. Writes its section of
docs/BENCHMARKS.md (or ``--out DIR``) and prints its headline figure last.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve
from tqdm import tqdm

from bench import report
from bench.benchkit import bench_parser, output_dir, plot_file
from bench.labelled import (
    Labelled,
    LabelledSet,
    best_f1,
    load_set,
    load_splits,
    make_tier,
    precision_recall,
    search_all,
)
from loragate.adapters.types import AdapterRecord
from loragate.loadtest.plots import pyplot
from loragate.loadtest.stats import percentile as pct
from loragate.router.compositional import DETECTORS, Detector, LearnedDetector, make_detector
from loragate.router.embedder import Embedder, EmbedderBackend, backend_names, make_backend
from loragate.router.grammar import parse_policy
from loragate.router.index import CENTROID, AdapterVectors, build_snapshot
from loragate.router.search import CascadeSearcher, Escalation, IndexSearcher, Searcher, Tier
from loragate.router.service import Router
from loragate.router.types import PolicySpec, RouterConfig
from loragate.server.settings import Settings

__all__ = ["load_set", "make_router"]

MIN_SCORE = RouterConfig().min_score
DEFAULTS = Settings.model_fields
CASCADE_FAST, CASCADE_PRECISE = DEFAULTS["cascade_fast"].default, DEFAULTS["cascade_precise"].default
MARGINS = tuple(round(0.01 * i, 2) for i in range(0, 13))
FLOORS = (-1.0, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
FLOOR_GAPS = (0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.16, 2.0)  # 2: the floor always applies


async def make_router(backend: EmbedderBackend, records: dict[str, AdapterRecord], detector: str,
                      *, cache: int = 0) -> tuple[Router, Embedder]:
    """One backend's router over ``records`` (the tests read routing quality through it)."""
    tier = await make_tier(backend, records, cache=cache)
    router = Router(PolicySpec("base"), RouterConfig(), searcher=IndexSearcher(tier),
                    detector=make_detector(detector, backend.name))
    return router, tier.embedder


# -- 1. embedders and the cascade: accuracy on both splits ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Ranked:
    """A split's prompts as one tier ranks them (candidates per prompt, in the split's order)."""

    split: LabelledSet
    candidates: list[tuple[tuple[str, float], ...]]

    def accuracy(self, pick: Sequence[tuple[tuple[str, float], ...]] | None = None) -> tuple[float, int, float]:
        """(nearest = label on `single`, `none` prompts select sends to base, share of `single` select gets right)."""
        ranked = self.candidates if pick is None else pick
        single = right = picked = none_to_base = 0
        for p, found in zip(self.split.prompts, ranked, strict=True):
            top = found[0] if found else ("", -1.0)
            if p.kind == "single":
                single += 1
                right += top[0] == p.adapters[0]
                picked += top[0] == p.adapters[0] and top[1] >= MIN_SCORE
            elif p.kind == "none":
                none_to_base += top[1] < MIN_SCORE
        return right / single, none_to_base, picked / single


async def rank(tier: Tier, split: LabelledSet) -> Ranked:
    found = [(await tier.search([p.prompt], RouterConfig().candidates, split.records))[0][0] for p in split.prompts]
    return Ranked(split, found)


def cascade_pick(fast: Ranked, precise: Ranked, rule: Escalation) -> tuple[list[tuple[tuple[str, float], ...]], float]:
    """What the cascade would answer for each prompt under ``rule``, and the share it escalated."""
    picks, escalated = [], 0
    for f, p in zip(fast.candidates, precise.candidates, strict=True):
        up = rule.ambiguous(f)
        escalated += up
        picks.append(p if up else f)
    return picks, escalated / len(picks)


def choose_escalation(fast: Ranked, precise: Ranked) -> tuple[Escalation, list[str]]:
    """On the training split: the rule that escalates least while at least as accurate as the precise tier alone
    and sending at least as many `none` prompts to base as it does, less one. Also the sweep's table rows.

    Not "within a point of it": the static tier alone is within a point on the training split, so that target
    let the sweep drop the margin (re-ranking nothing) and keep only the floor's relevance check."""
    target_acc, target_none, _ = precise.accuracy()
    feasible: list[tuple[float, float, float, float, Escalation]] = []
    rows = []
    for margin, floor, gap in itertools.product(MARGINS, FLOORS, FLOOR_GAPS):
        rule = Escalation(margin, floor, gap)
        picks, share = cascade_pick(fast, precise, rule)
        acc, none, _ = fast.accuracy(picks)
        if acc >= target_acc - 1e-9 and none >= target_none - 1:
            feasible.append((share, margin, floor, -gap, rule))  # ties: the smaller margin and floor, the larger gap
        if (floor, gap) in ((-1.0, 2.0), (0.4, 2.0), (0.5, 2.0), (0.4, 0.11), (0.5, 0.11)) and margin in (
                0.0, 0.02, 0.03, 0.05, 0.08):
            shown_floor, shown_gap = (floor, gap if gap < 2 else "off") if floor > -1 else ("off", "off")
            rows.append(f"| {margin:.2f} | {shown_floor} | {shown_gap} | {share:.0%} | {acc:.1%} | {none} |")
    if not feasible:
        return Escalation(max(MARGINS), max(FLOORS)), rows
    return min(feasible, key=lambda f: f[:4])[4], rows


def split_key(split: str) -> str:
    """A split's infix in the figures' names: none for the training split, ``heldout_`` for the held-out one."""
    return "" if split == "train" else split.replace("-", "") + "_"


def cells(values: Sequence[float | int], fmt: str) -> str:
    """One value per split in a table cell, "train / held-out / fresh"."""
    return " / ".join(format(v, fmt) for v in values)


def cascade_row(label: str, fast: Sequence[Ranked], precise: Sequence[Ranked], rule: Escalation,
                costs: tuple[float, float]) -> tuple[str, dict[str, float]]:
    """One cascade's table row under ``rule`` (chosen on the training split), one value per split, and its
    figures."""
    figures: dict[str, float] = {}
    picked = [cascade_pick(f, p, rule) for f, p in zip(fast, precise, strict=True)]
    accs, nones, sels = zip(*(f.accuracy(picks) for f, (picks, _) in zip(fast, picked, strict=True)), strict=True)
    shares = [share for _, share in picked]
    for f, acc, share in zip(fast, accs, shares, strict=True):
        figures[f"{split_key(f.split.name)}accuracy"], figures[f"{split_key(f.split.name)}escalated"] = acc, share
    expected_ms = costs[0] + shares[0] * costs[1]
    row = (f"| **cascade** {label} (margin {rule.margin:.2f}, floor {rule.floor:.2f}, gap {rule.floor_gap:.2f}) | - | "
           f"{cells(accs, '.1%')} | {cells(sels, '.1%')} | {cells(nones, 'd')} | {cells(shares, '.0%')} | "
           f"{expected_ms:.2f} ms (mean) | - |")
    return row, figures


async def embedders_section(splits: dict[str, LabelledSet], names: Sequence[str], quick: bool
                            ) -> tuple[str, dict[str, float], Escalation]:
    out: dict[str, float] = {}
    ranked: dict[tuple[str, str, str], Ranked] = {}
    costs: dict[str, tuple[float, float, int]] = {}
    for name in tqdm(names, desc="embedders", unit="backend"):
        backend = make_backend(name)
        for (split_name, split), aggregate in itertools.product(splits.items(), (CENTROID, "max")):
            tier = await make_tier(backend, split.records, cache=0, aggregate=aggregate)
            ranked[name, split_name, aggregate] = await rank(tier, split)
            await tier.embedder.close()
        texts = [p.prompt for p in splits["train"].prompts][: 60 if quick else None]
        one = []
        for t in texts:
            started = time.perf_counter()
            backend.encode([t])
            one.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(0, len(texts), 32):
            backend.encode(texts[i:i + 32])
        costs[name] = (statistics.median(one) * 1e3, (time.perf_counter() - started) / len(texts) * 1e3, backend.dim)
    rows = []
    for name, aggregate in itertools.product(names, (CENTROID, "max")):
        accs, nones, sels = zip(*(ranked[name, split, aggregate].accuracy() for split in splits), strict=True)
        one_ms, batch_ms, dim = costs[name]
        key = name if aggregate == CENTROID else f"{name}_max"
        out.update({f"{key}_{split_key(split)}accuracy": acc for split, acc in zip(splits, accs, strict=True)})
        out[f"{name}_single_ms"] = one_ms
        rows.append(f"| `{name}` ({aggregate}) | {dim} | {cells(accs, '.1%')} | {cells(sels, '.1%')} | "
                    f"{cells(nones, 'd')} | - | {one_ms:.2f} ms | {batch_ms:.3f} ms |")
    tier_costs = costs[CASCADE_FAST][0], costs[CASCADE_PRECISE][0]
    sweeps, rules = {}, {}
    for aggregate in (CENTROID, "max"):
        fast = [ranked[CASCADE_FAST, split, aggregate] for split in splits]
        precise = [ranked[CASCADE_PRECISE, split, aggregate] for split in splits]
        rules[aggregate], sweeps[aggregate] = choose_escalation(fast[0], precise[0])
        row, figures = cascade_row(f"`{CASCADE_FAST}` -> `{CASCADE_PRECISE}` ({aggregate})", fast, precise,
                                   rules[aggregate], tier_costs)
        rows.append(row)
        prefix = "cascade" if aggregate == CENTROID else "cascade_max"
        out.update({f"{prefix}_{k}": v for k, v in figures.items()})
    n_single = cells([len(split.of_kind("single")) for split in splits.values()], "d")
    n_none = cells([len(split.of_kind("none")) for split in splits.values()], "d")
    names_ = " / ".join(splits)
    body = (f"Routing accuracy on the labelled `single` prompts ({names_}: {n_single}): how often the nearest "
            f"adapter is the labelled one, and how often `select` (min_score {MIN_SCORE}) picks it; `none` prompts "
            f"(no adapter applies; {n_none}) that `select` sends to the base; the share of all prompts the cascade "
            "escalated to its precise embedder; embedding time per prompt (one at a time, median, and in batches "
            "of 32; the cascade's is the fast embedder's plus the escalated share of the precise one's). "
            f"{names_} in each cell: the fresh split was written blind and never looked at before this table "
            "(see tests/data/routing_fresh/README.md). Each embedder with "
            "the index's two aggregates: `centroid` (the default: cosine to the normalised mean of an adapter's "
            "descriptor vectors) and `max` (over its vectors; the default before). The aggregate was chosen "
            "after both splits had been measured with both (a first experiment), so for that one choice the "
            "held-out split is not untouched; every threshold (margin, floor, the learned detector) is chosen on "
            "the training split alone.\n\n"
            f"| embedder (aggregate) | dim | nearest = label ({names_}) | "
            "`select` picks the label | `none` sent to base | escalated | one prompt | per prompt, batch 32 |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Each cascade's margin, floor and floor gap are chosen on the training split alone: the rule that "
            "escalates the fewest prompts while at least as accurate (nearest = label) as the precise embedder alone "
            "and sending as many `none` prompts to the base (less one). The floor applies only to prompts whose best "
            "fast score stands less than the gap above the other candidates' mean. The floor gap and this criterion "
            "(it was: within 1 point of the precise embedder) came in on 2026-12-07, after the held-out split had been "
            "measured for a few candidate rules (all with thresholds from the training split), so for the choice of "
            "rule, as for the aggregate, the held-out split is not untouched. The sweep on the training split "
            "(centroid):\n\n"
            "| margin | floor | floor gap | escalated | nearest = label | `none` sent to base |\n"
            "|---|---|---|---|---|---|\n"
            + "\n".join(sweeps[CENTROID]) + "\n")
    return body, out, rules[CENTROID]


# -- 2. routing cost through the Router ----------------------------------------------------------------
async def concurrently(router: Router, spec: PolicySpec, records: dict[str, AdapterRecord], texts: list[str],
                       concurrency: int) -> None:
    """Route every text with at most ``concurrency`` decisions in flight (a closed loop)."""
    queue = list(reversed(texts))

    async def worker() -> None:
        while queue:
            await router.decide(queue.pop(), spec, records)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def searcher_for(kind: str, split: LabelledSet, rule: Escalation) -> Searcher:
    if kind != "cascade":
        return IndexSearcher(await make_tier(make_backend(kind), split.records, cache=0))
    fast = await make_tier(make_backend(CASCADE_FAST), split.records, cache=0)
    precise = await make_tier(make_backend(CASCADE_PRECISE), split.records, cache=0)
    return CascadeSearcher(fast, precise, rule)


async def overhead_section(split: LabelledSet, rule: Escalation, rounds: int) -> tuple[str, dict[str, float]]:
    """`select` through the real Router, prompt by prompt (c=1) and 32 at a time, unique prompts (no cache)."""
    prompts = [p for p in split.prompts]
    spec = parse_policy("select", source="bench")
    out: dict[str, float] = {}
    rows = []
    for kind, detector_name in (("minilm", "gap"), ("minilm", "learned"), ("static", "learned"),
                                ("cascade", "learned")):
        searcher = await searcher_for(kind, split, rule)
        detector: Detector = make_detector(detector_name, searcher.tiers[0].name)
        router = Router(PolicySpec("base"), RouterConfig(), searcher=searcher, detector=detector)
        texts = [f"{p.prompt} #{i}" for i in range(rounds) for p in prompts]  # unique: no cache effects
        times = []
        for t in tqdm(texts, desc=f"select c=1 ({kind}, {detector_name})", leave=False):
            started = time.perf_counter()
            await router.decide(t, spec, split.records)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        await concurrently(router, spec, split.records, [t + " +" for t in texts], 32)
        tput = len(texts) / (time.perf_counter() - started)
        escalated = searcher.decided.get(CASCADE_PRECISE, 0) / max(sum(searcher.decided.values()), 1)
        await searcher.close()
        key = f"{kind}_{detector_name}"
        out[f"{key}_p50"], out[f"{key}_p99"], out[f"{key}_tput"] = (statistics.median(times) * 1e3,
                                                                     pct(times, 99) * 1e3, tput)
        rows.append(f"| `{kind}` | `{detector_name}` | {out[f'{key}_p50']:.2f} | {out[f'{key}_p99']:.2f} | "
                    f"{tput:.0f} | {escalated:.0%} |" if kind == "cascade" else
                    f"| `{kind}` | `{detector_name}` | {out[f'{key}_p50']:.2f} | {out[f'{key}_p99']:.2f} | "
                    f"{tput:.0f} | - |")
    long_rows, long_out = await long_prompt_rows(split, rule)
    rows += long_rows
    out.update(long_out)
    body = ("A `select` decision (embed the prompt and the detector's texts, search, detect, decide) through the "
            f"real `Router` on the {len(prompts)} training-split prompts x {rounds}, made unique so the embedding "
            "cache never answers: one at a time, then 32 in flight. The gateway around it is measured in "
            "\"Overhead vs direct\" and \"loragate vs LiteLLM\".\n\n"
            "| embedder | detector | p50 ms | p99 ms | decisions/s (c=32) | escalated |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n"
            "`learned` embeds the prompt's clauses and content words too (about ten short texts for most prompts), "
            "where `gap` reads the prompt's own scores. The last two rows put 600 words of chat history (other "
            "prompts of the set) before each `single` prompt: routing reads the last `route_max_words` (128) "
            "words, or, untruncated, all of it; nearest = label on those prompts is in the last column.\n")
    return body, out


async def long_prompt_rows(split: LabelledSet, rule: Escalation) -> tuple[list[str], dict[str, float]]:
    """The default cascade on `single` prompts behind 600 words of history, truncated (default) or not."""
    rng = random.Random(7)
    single = split.of_kind("single")
    others = [p.prompt for p in split.prompts if p.kind != "single"]

    def history() -> str:
        words: list[str] = []
        while len(words) < 600:
            words += rng.choice(others).split()
        return " ".join(words[:600])

    prompts = [(f"{history()}\n{p.prompt}", p.adapters[0]) for p in single]
    spec = parse_policy("select;min_score=-1", source="bench")
    rows, out = [], {}
    for label, max_words in (("128 words (default)", RouterConfig().max_words), ("untruncated", 100_000)):
        searcher = await searcher_for("cascade", split, rule)
        router = Router(PolicySpec("base"), RouterConfig(max_words=max_words), searcher=searcher,
                        detector=make_detector("learned", searcher.tiers[0].name))
        times, right = [], 0
        for text, adapter in tqdm(prompts, desc=f"long prompts ({label})", leave=False):
            started = time.perf_counter()
            decision = await router.decide(text, spec, split.records)
            times.append(time.perf_counter() - started)
            right += bool(decision.adapters) and decision.adapters[0].name == adapter
        await searcher.close()
        key = "long_truncated" if max_words < 100_000 else "long_full"
        out[f"{key}_p50"], out[f"{key}_accuracy"] = statistics.median(times) * 1e3, right / len(prompts)
        rows.append(f"| `cascade`, 600-word history, {label} | `learned` | {out[f'{key}_p50']:.2f} | "
                    f"{pct(times, 99) * 1e3:.2f} | - | nearest = label {right / len(prompts):.1%} |")
    return rows, out


# -- 3. compositional detection on both splits ---------------------------------------------------------
async def detection_section(splits: dict[str, LabelledSet], embedders: Sequence[str]) -> tuple[str, dict[str, float]]:
    rows = []
    out: dict[str, float] = {}
    spec = parse_policy("select", source="bench")
    for embedder_name, name in itertools.product(embedders, sorted(DETECTORS)):
        found = []
        for split_name, split in splits.items():
            router, embedder = await make_router(make_backend(embedder_name), split.records, name, cache=4096)
            tp = fp = fn = 0
            by_kind: dict[str, list[int]] = {}
            for p in split.prompts:
                flagged = bool((await router.decide(p.prompt, spec, split.records)).compositional)
                tp += flagged and p.compositional
                fp += flagged and not p.compositional
                fn += (not flagged) and p.compositional
                by_kind.setdefault(p.kind, [0, 0])
                by_kind[p.kind][0] += flagged
                by_kind[p.kind][1] += 1
            await embedder.close()
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            out[f"{embedder_name}_{name}_{split_name}_precision"] = precision
            out[f"{embedder_name}_{name}_{split_name}_recall"] = recall
            kinds = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(by_kind.items()))
            found.append((precision, recall, kinds))
        rows.append(f"| `{embedder_name}` | `{name}` | " + " | ".join(f"{p:.2f} / {r:.2f}" for p, r, _ in found)
                    + " | " + " | ".join(kinds for _, _, kinds in found[1:]) + " |")
    counts = ", ".join(f"{name} {sum(p.compositional for p in split.prompts)} compositional of {len(split.prompts)}"
                       for name, split in splits.items())
    reported = list(splits)[1:]
    body = (f"Compositional-query detection, precision / recall, on each split ({counts}), with the scores of "
            "each embedder (a cascade detects on its fast one). `gap`, "
            "`segments` and `hybrid` have thresholds chosen by hand looking at the training split; `learned` is "
            "trained on the training split (`bench/train_detector.py`), so its training-split figures are "
            "optimistic. The held-out split was measured while detector features were chosen (not for the "
            "thresholds); the fresh split was written blind and first measured in this table, so its column is "
            "the one to read. Every split includes `near-miss` prompts (two domains mentioned, one needed) among "
            "the negatives.\n\n"
            "| embedder | detector | " + " | ".join(f"{name} P / R" for name in splits) + " | "
            + " | ".join(f"{name} flagged by kind" for name in reported) + " |\n|"
            + "---|" * (2 + len(splits) + len(reported)) + "\n" + "\n".join(rows) + "\n")
    return body, out


async def detection_curves_section(splits: dict[str, LabelledSet], embedders: Sequence[str], plot_to: Path) -> str:
    """The learned detector's probability swept over every threshold on each split: is the shipped threshold
    the limit, or the features? The best-threshold columns pick a threshold on the split's own labels (an
    oracle no deployment has), to bound what any threshold could do with these features."""
    plt = pyplot()

    rows: list[str] = []
    fig, axes = plt.subplots(1, len(embedders), figsize=(5.5 * len(embedders), 4.4), squeeze=False)
    for ax, embedder_name in zip(axes[0], embedders, strict=True):
        detector = LearnedDetector.for_embedder(embedder_name)
        for split_name, split in splits.items():
            tier = await make_tier(make_backend(embedder_name), split.records)
            searched = await search_all(tier, split)
            await tier.embedder.close()
            y = np.asarray([s.prompt.compositional for s in searched], dtype=np.int64)
            prob = np.asarray([detector.probability(s.probe, s.candidates, s.parts) for s in searched])
            precision, recall, _ = precision_recall_curve(y, prob)
            at_p, at_r = precision_recall(prob >= detector.model.threshold, y)
            _, best_p, best_r = best_f1(y, prob)
            reach = recall[precision >= 0.9]
            recall_at_90 = float(reach.max()) if reach.size else 0.0
            ap = float(average_precision_score(y, prob))
            rows.append(f"| `{embedder_name}` | {split_name} | {at_p:.2f} / {at_r:.2f} | {ap:.2f} | "
                        f"{best_p:.2f} / {best_r:.2f} | {recall_at_90:.2f} |")
            line, = ax.plot(recall, precision, label=f"{split_name} (AP {ap:.2f})")
            ax.plot([at_r], [at_p], "o", color=line.get_color())
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.axvline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"learned detector on `{embedder_name}` scores", fontsize=10)
        ax.set_xlabel("recall")
        ax.set_ylim(0.0, 1.02)
        ax.legend(fontsize=8, loc="lower left")
    axes[0][0].set_ylabel("precision")
    fig.suptitle("Compositional detection over every threshold (dot: the shipped threshold; dotted: the 0.9 target)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(plot_to, dpi=100)
    plt.close(fig)
    body = ("The learned detector's probability on each split, over every threshold. The first column is the "
            "shipped threshold (chosen on the training split's out-of-fold probabilities); the last two choose "
            "a threshold on the split's own labels, which no deployment can do: they bound what re-thresholding "
            "these features could reach. Recall at precision >= 0.9 below 0.9 on a split means no threshold meets "
            "the detection target there: the features, not the threshold, are the limit.\n\n"
            "| embedder | split | P / R at the shipped threshold | average precision | best-F1 threshold on this "
            "split: P / R | recall at precision >= 0.9 |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\n![detection precision-recall]({plot_to.name})\n")
    return body


# -- 4. search latency by index size ---------------------------------------------------------------
def search_section(sizes: Sequence[int], exact_max: int) -> tuple[str, dict[int, float]]:
    rng = np.random.default_rng(0)
    rows = []
    p99s: dict[int, float] = {}
    faiss.omp_set_num_threads(1)  # per-request search is single-threaded in the gateway
    for size in sizes:
        vectors = rng.standard_normal((size, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        started = time.perf_counter()
        faiss.omp_set_num_threads(2)
        snapshot = build_snapshot(_entries(vectors), exact_max)
        faiss.omp_set_num_threads(1)
        build_s = time.perf_counter() - started
        queries = vectors[rng.integers(0, size, 200)] + 0.05 * rng.standard_normal((200, 384)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        times = []
        for q in queries:
            started = time.perf_counter()
            snapshot.search(q, 5)
            times.append(time.perf_counter() - started)
        p99s[size] = pct(times, 99) * 1e3
        rows.append(f"| {size:,} | {snapshot.kind} | {statistics.median(times) * 1e3:.3f} | {p99s[size]:.3f} | "
                    f"{build_s:.1f} s |")
    body = (f"Search (nearest vectors -> per-adapter max -> top 5) over random normalised 384-d descriptor "
            f"vectors, one thread, 200 queries; exact (flat) up to {exact_max:,} vectors, HNSW (M=32, "
            "efSearch=64) above. Target: p99 <= 2 ms at 1M. With the default `centroid` aggregate an index holds "
            "one vector per adapter, so a registry of 1M descriptors at ten per adapter searches like the 100k "
            "row; the rows are the `max` aggregate's cost, the bound for either.\n\n"
            "| descriptors | index | p50 ms | p99 ms | build |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return body, p99s


def _entries(vectors: np.ndarray) -> list[AdapterVectors]:
    per = 10  # ten descriptors per adapter
    return [AdapterVectors(f"a{i}", "", vectors[i * per:(i + 1) * per]) for i in range((len(vectors) + per - 1) // per)]


# -- 5. merge-cache hit rate with weight rounding ---------------------------------------------------
async def merge_reuse_section(records: dict[str, AdapterRecord], prompts: list[Labelled], n: int
                              ) -> tuple[str, float]:
    backend = make_backend("minilm")
    rng = random.Random(0)
    ranked = [p.prompt for p in prompts if p.kind != "none"]
    zipf = [1 / (i + 1) for i in range(len(ranked))]
    fillers = ["", " please", " thanks", " quickly", " in short", " again", " for me", " exactly"]
    stream = [rng.choices(ranked, zipf)[0] + rng.choice(fillers) for _ in range(n)]
    rows = []
    rates = {}
    base_router, embedder = await make_router(backend, records, "gap", cache=4096)
    spec = parse_policy("average;k=2;weights=softmax;temperature=0.05", source="bench")
    for step in (0.0, 0.05, 0.1):
        router = Router(PolicySpec("base"), RouterConfig(weight_step=step), searcher=base_router.searcher,
                        detector=base_router.detector)
        keys: set[tuple[tuple[str, float], ...]] = set()
        merges = 0
        for prompt in stream:
            d = await router.decide(prompt, spec, records)
            if len(d.adapters) > 1:
                merges += 1
                keys.add(tuple(sorted((a.name, round(a.weight, 9)) for a in d.adapters)))
        hit = 1 - len(keys) / merges if merges else 0.0
        rates[step] = hit
        rows.append(f"| {step if step else 'off'} | {merges} | {len(keys)} | {hit:.1%} |")
    await embedder.close()
    body = (f"A stream of {n} prompts drawn Zipf-like from the labelled set with small suffix variations, "
            "routed with `average;k=2;weights=softmax;temperature=0.05`: how many distinct merged adapters the "
            "decisions need (each distinct one is a build and a worker slot). Hit rate = 1 - distinct/merging "
            "requests. Coarser steps also round small weights to zero, so fewer requests need a merge at all.\n\n"
            "| weight step | requests needing a merge | distinct merges | merge-cache hit rate |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return body, rates[0.05]


async def main_async(args: argparse.Namespace) -> str:
    splits = load_splits()
    quick = args.quick
    parts = []
    names = [n for n in backend_names() if not (quick and n == "minilm-torch")]
    b_body, b, rule = await embedders_section(splits, names, quick)
    parts.append("### Embedders and the cascade\n\n" + b_body)
    o_body, o = await overhead_section(splits["train"], rule, 1 if quick else 3)
    parts.append("### Routing cost\n\n" + o_body)
    d_body, d = await detection_section(splits, (CASCADE_FAST, "static", "minilm"))
    parts.append("### Compositional detection\n\n" + d_body)
    c_body = await detection_curves_section(splits, (CASCADE_FAST, "minilm"),
                                            plot_file("detection_pr", output_dir(args.out)))
    parts.append("#### Over every threshold\n\n" + c_body)
    sizes = (1_000, 20_000) if quick else (1_000, 100_000, 1_000_000)
    s_body, p99s = search_section(sizes, exact_max=10_000 if quick else 50_000)
    parts.append("### Search latency\n\n" + s_body)
    train = splits["train"]
    m_body, hit = await merge_reuse_section(train.records, train.prompts, 300 if quick else 2000)
    parts.append("### Merge reuse\n\n" + m_body)
    report.write_section("routing", "Semantic routing", "\n".join(parts), out_dir=output_dir(args.out))
    return (f"nearest = label train / held-out (centroid): minilm {b['minilm_accuracy']:.1%} / "
            f"{b['minilm_heldout_accuracy']:.1%}, "
            f"static {b['static_accuracy']:.1%} / {b['static_heldout_accuracy']:.1%}, cascade "
            f"{b['cascade_accuracy']:.1%} / {b['cascade_heldout_accuracy']:.1%} (max: "
            f"{b['cascade_max_accuracy']:.1%} / {b['cascade_max_heldout_accuracy']:.1%}; escalating "
            f"{b['cascade_escalated']:.0%} / {b['cascade_heldout_escalated']:.0%}; margin {rule.margin}, floor "
            f"{rule.floor}, gap {rule.floor_gap}); select decision p50 cascade {o['cascade_learned_p50']:.2f} ms vs "
            "minilm "
            f"{o['minilm_learned_p50']:.2f} ms; learned detection held-out P/R {CASCADE_FAST} "
            f"{d[f'{CASCADE_FAST}_learned_held-out_precision']:.2f}/"
            f"{d[f'{CASCADE_FAST}_learned_held-out_recall']:.2f}, minilm "
            f"{d['minilm_learned_held-out_precision']:.2f}/{d['minilm_learned_held-out_recall']:.2f}"
            + (f"; fresh: nearest = label cascade {b['cascade_fresh_accuracy']:.1%}, learned P/R {CASCADE_FAST} "
               f"{d[f'{CASCADE_FAST}_learned_fresh_precision']:.2f}/{d[f'{CASCADE_FAST}_learned_fresh_recall']:.2f}, "
               f"minilm {d['minilm_learned_fresh_precision']:.2f}/{d['minilm_learned_fresh_recall']:.2f}"
               if "fresh" in splits else "")
            + "; search p99 "
            f"{max(p99s.values()):.2f} ms at {max(p99s):,}; merge hit rate {hit:.0%} with step 0.05")


def main() -> None:
    args = bench_parser(__doc__, tiny_model=False).parse_args()
    print(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()

