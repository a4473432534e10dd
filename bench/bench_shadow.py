"""Shadow-policy cost on the client's path: the same pinned requests with and without a shadow run.

A shadow (``X-Adapter-Policy-Shadow``) re-runs each request under a second policy after the client's
response is complete; it must not make the client measurably slower. Both series go to one gateway
in front of the instant stub, alternating in rounds, graded with ``X-Expected-Answer`` so the
shadows do their full work (route, proxy, grade, record).

Run: ``python -m bench.bench_shadow [--quick]``; prints its headline figure last.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import httpx

from bench import report
from bench.benchkit import (
    Target,
    assert_clean,
    bench_parser,
    build_adapters,
    measure_interleaved,
    ms,
    output_dir,
    register,
    start_gateway,
    start_stub,
    topical_prompts,
    warm_up,
)

PIN = 'pin;adapter="cooking"'
WARMUP = 40


def shadow_pending(gateway: str) -> float:
    """``loragate_shadow_pending``: shadows scheduled and not finished."""
    match = re.search(r"^loragate_shadow_pending (\S+)$", httpx.get(f"{gateway}/metrics", timeout=10).text, re.M)
    return float(match.group(1)) if match else 0.0


def shadow_runs(gateway: str) -> dict[str, float]:
    """``loragate_shadow_runs_total`` by result, read from the gateway's /metrics."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    pattern = r'loragate_shadow_runs_total\{result="(\w+)"\} (\S+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def settled_shadow_runs(gateway: str, expected: int, timeout_s: float = 60.0, *,
                        settle_all: bool = False) -> dict[str, float]:
    """Shadow run counts once ``expected`` shadows (or, with ``settle_all``, every scheduled one) ended.

    Settling after each measured slice keeps one series' shadows from running during the next series.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        runs = shadow_runs(gateway)
        pending = shadow_pending(gateway) if settle_all else expected - sum(runs.values())
        if pending <= 0 or time.monotonic() >= deadline:
            return runs
        time.sleep(0.1)


def run(quick: bool, tiny_dir: Path, out: Path | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    _model, adapters = build_adapters(tiny_dir, ["cooking", "astronomy"])
    requests, rounds = (60, 2) if quick else (1200, 6)
    graded = (("X-Expected-Answer", "the"),)
    with start_stub(work / "logs") as stub, \
            start_gateway(work / "logs", work / "data", [stub.url], tiny_dir, embedder="none") as gateway:
        register(gateway.url, adapters)
        targets = [Target("pin", gateway.url, PIN, headers=graded, servers=(gateway,)),
                   Target("pin + shadow base", gateway.url, PIN, servers=(gateway,),
                          headers=(*graded, ("X-Adapter-Policy-Shadow", "base")))]
        warm_up(targets, requests=WARMUP)
        base = settled_shadow_runs(gateway.url, WARMUP)  # the warm-up's own shadows, left out below
        rows = []
        ratios = {}
        shadowed_requests = 0
        for concurrency in (1, 8):
            measured = measure_interleaved(targets, rounds, topical_prompts(requests, concurrency),
                                           requests=requests, concurrency=concurrency,
                                           between=lambda: settled_shadow_runs(gateway.url, 0, settle_all=True))
            for m in measured.values():
                assert_clean(m)
            plain, shadowed = measured["pin"].summary.latency, measured["pin + shadow base"].summary.latency
            ratios[concurrency] = shadowed.p50 / plain.p50
            shadowed_requests += measured["pin + shadow base"].summary.requests
            rows.append(f"| {concurrency} | {ms(plain.p50)} | {ms(shadowed.p50)} | {ratios[concurrency]:.2f} | "
                        f"{ms(plain.p99)} | {ms(shadowed.p99)} | {shadowed.p99 / plain.p99:.2f} |")
        total = settled_shadow_runs(gateway.url, WARMUP + shadowed_requests)
        runs = {k: v - base.get(k, 0.0) for k, v in total.items() if v - base.get(k, 0.0)}
    body = (f"{requests} pinned requests per series and concurrency, alternating in {rounds} rounds, against one "
            "gateway (`embedder=none`) in front of the instant stub, so the gateway's own work is all there is to "
            "see; every request carries `X-Expected-Answer`, the second series also `X-Adapter-Policy-Shadow: "
            "base` (each shadow is routed, proxied, graded and logged after the client's response, in a moment "
            "when no client request is in flight; one that finds no such moment within 30 s expires, counted). "
            "Target: no measurable growth of the client's latency.\n\n"
            "| concurrency | p50 ms | p50 ms with shadow | ratio | p99 ms | p99 ms with shadow | ratio |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
            f"Of the {shadowed_requests} shadows scheduled: "
            + ", ".join(f"{int(v)} {k}" for k, v in sorted(runs.items())) + ". The closed loop leaves the gateway "
            "idle only between a response and the next request, so shadows ran mostly between slices (the benchmark "
            "waits for each slice's shadows to finish before the next slice, so no series pays for another's "
            "shadows); real traffic has gaps. What remains at concurrency 1 is the per-request cost of accepting a "
            "shadow (parsing and checking its policy, scheduling it).\n")
    report.write_section("shadow", "Shadow policies: client latency", body, out_dir=out)
    return f"shadow runs change the client's p50 by {ratios[1]:.2f}x (c=1) and {ratios[8]:.2f}x (c=8)"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    print(run(args.quick, args.tiny_dir, output_dir(args.out)))


if __name__ == "__main__":
    main()
