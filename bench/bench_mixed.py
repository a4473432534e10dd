"""Benchmark: pinned requests while routed ones saturate the same gateway process.

Embedding and search run off the event loop (the embedders' worker threads; large indexes in a thread),
so a burst of routed requests should not delay pinned ones that need neither. This measures it: one
gateway (default settings: the static -> MiniLM cascade) over the instant stub; a pinned client at
concurrency 1, alone and while a second process keeps `select` requests (distinct prompts, so the
embedding cache never answers) at concurrency 32, alternating in rounds. The same again with the gate's
rules relaxed or off, with ``embed_nice``, and with ``embedder=minilm`` (every routed prompt costs MiniLM's
~4 ms) for contrast; and a floor: the pinned client straight to the stub while the default gateway is
saturated, which is what sharing the machine costs a request the gateway never sees. Target (issue 20):
pin p99 under saturation within 1.5x of pin p99 alone.

Run: ``python -m bench.bench_mixed [--quick] [--out DIR]``; the last line printed is the headline.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.bench_litellm import route_tiers
from bench.benchkit import (
    Target,
    bench_parser,
    build_adapters,
    ms,
    output_dir,
    plot_file,
    register,
    start_gateway,
    start_stub,
    topical_prompts,
    warm_up,
)
from loragate.loadtest.loadgen import run_load
from loragate.loadtest.plots import latency_cdf
from loragate.loadtest.stats import percentile as p
from loragate.loadtest.stats import summarize

PIN = 'pin;adapter="cooking"'
SHARED4 = "cascade, 4 slots while pinned traffic arrives (route_shared_concurrency=4)"
NICE = "cascade, embed_nice=10"
FLOOR = "floor: pinned straight to the stub, default gateway saturated"
RAMP_S = 1.0  # the routed load runs this long before the pinned client starts, and after it stops


@dataclass(frozen=True, slots=True)
class Sizes:
    rounds: int = 6
    pin_s: float = 6.0
    concurrency: int = 32

    @classmethod
    def quick(cls) -> Sizes:
        return cls(rounds=2, pin_s=1.5, concurrency=8)


def _saturate(url: str, seconds: float, concurrency: int, seed: int,
              done: multiprocessing.Queue[tuple[float, int]]) -> None:
    """In a child process: routed requests as fast as the gateway answers them; puts (requests/s, errors)."""
    target = Target("select", url, "select")
    result = asyncio.run(run_load(target.spec(duration_s=seconds, concurrency=concurrency),
                                  topical_prompts(200_000, seed)))
    summary = summarize(result.records, result.elapsed_s)
    done.put((summary.throughput_rps, summary.requests - summary.ok))


def measure(url: str, sizes: Sizes, seed: int, pinned: Target | None = None) -> dict[str, object]:
    """Pinned latencies alone and under saturation of the gateway at ``url`` (alternating rounds), and the routed
    load's throughput. ``pinned`` (default: ``PIN`` through the same gateway) is where the pinned client goes."""
    pinned = pinned or Target("pin", url, PIN)
    alone: list[float] = []
    loaded: list[float] = []
    rates, errors = [], 0
    context = multiprocessing.get_context("spawn")
    for r in range(sizes.rounds):
        for phase in (("alone", "loaded") if r % 2 == 0 else ("loaded", "alone")):
            workload = topical_prompts(4000, seed * 100 + r * 2 + (phase == "loaded"))
            if phase == "alone":
                result = asyncio.run(run_load(pinned.spec(duration_s=sizes.pin_s, concurrency=1), workload))
                alone += [x.latency for x in result.records if x.ok]
                errors += sum(not x.ok for x in result.records)
                continue
            done: multiprocessing.Queue[tuple[float, int]] = context.Queue()
            child = context.Process(target=_saturate, args=(url, sizes.pin_s + 2 * RAMP_S, sizes.concurrency,
                                                            seed * 1000 + r, done))
            child.start()
            asyncio.run(asyncio.sleep(RAMP_S + 1.0))  # the child imports and ramps up first
            result = asyncio.run(run_load(pinned.spec(duration_s=sizes.pin_s, concurrency=1), workload))
            loaded += [x.latency for x in result.records if x.ok]
            errors += sum(not x.ok for x in result.records)
            rate, failed = done.get(timeout=120)
            child.join(timeout=60)
            rates.append(rate)
            errors += failed
    return {"alone": alone, "loaded": loaded, "select_rps": sum(rates) / len(rates), "errors": errors}


def run(sizes: Sizes, work: Path, tiny_dir: Path, out: Path | None) -> tuple[str, str]:
    _model, adapters = build_adapters(tiny_dir, ["cooking", "astronomy", "family"])
    results: dict[str, dict[str, object]] = {}
    escalated = 0.0
    with start_stub(work / "logs") as stub:
        for label, settings in (("default (cascade)", {}),
                                (SHARED4, {"route_shared_concurrency": 4}),
                                ("cascade, no routing gate", {"route_max_concurrency": 0}),
                                (NICE, {"embed_nice": 10}),
                                ("embedder=minilm", {"embedder": "minilm"})):
            data = work / f"gateway-{len(results)}"
            with start_gateway(work / "logs", data, [stub.url], tiny_dir, **settings) as gateway:
                register(gateway.url, adapters)
                warm_up([Target("pin", gateway.url, PIN), Target("select", gateway.url, "select")])
                results[label] = measure(gateway.url, sizes, seed=len(results) + 1)
                if not settings:  # the same load, the pinned client straight to the stub: what the machine adds
                    results[FLOOR] = measure(gateway.url, sizes, seed=len(results) + 1,
                                             pinned=Target("direct", stub.url))
                    tiers = route_tiers(gateway.url)
                    escalated = max((v for k, v in tiers.items() if "minilm" in k), default=0.0) / max(
                        sum(tiers.values()), 1.0)
    rows = ["| gateway | pin p50 alone | pin p99 alone | pin p50 under load | pin p99 under load | p99 ratio | "
            "routed req/s meanwhile | target p99 ratio <= 1.5 |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    ratios = {}
    series = {}
    for label, r in results.items():
        alone, loaded = r["alone"], r["loaded"]
        assert isinstance(alone, list) and isinstance(loaded, list)
        if r["errors"]:
            raise RuntimeError(f"{label}: {r['errors']} requests failed")
        ratio = p(loaded, 99) / p(alone, 99)
        ratios[label] = ratio
        series[f"pin alone ({label})"] = alone
        series[f"pin, select saturating ({label})"] = loaded
        rows.append(f"| {label} | {ms(p(alone, 50))} | {ms(p(alone, 99))} | {ms(p(loaded, 50))} | "
                    f"{ms(p(loaded, 99))} | {ratio:.2f}x | {r['select_rps']:.0f} | "
                    f"{'-' if label == FLOOR else 'yes' if ratio <= 1.5 else 'no'} |")
    plot = latency_cdf(series, plot_file("mixed_cdf", out), title="Pinned latency, alone and while select saturates",
                       log_x=True)
    intro = (f"One gateway process over the instant stub. A pinned client (`{PIN}`, concurrency 1) for "
             f"{sizes.pin_s:g} s alone, then {sizes.pin_s:g} s while a second process keeps `select` at concurrency "
             f"{sizes.concurrency} with distinct prompts (the embedding cache never answers); {sizes.rounds} rounds, "
             "alternating which phase goes first. `max_tokens` 16, non-streamed `/v1/completions`. The default "
             f"gateway's cascade escalated {escalated:.0%} of its routed prompts to MiniLM; its routing gate "
             "lets `route_max_concurrency` (4) routed requests decide at once, one (`route_shared_concurrency`) "
             "while pinned requests arrive, when it also holds routed ones back while the event loop lags more "
             "than `route_yield_lag_ms` (2 ms); `route_max_concurrency=0` turns it off. `embed_nice=10` lowers the "
             "embedder's worker thread's scheduling priority below the event loop's. The floor row keeps the default "
             "gateway saturated the same "
             "way but sends the pinned client straight to the stub: what sharing this machine's two cores with the "
             "load generators, the stub and the gateway costs a request that never enters the gateway.")
    body = "\n".join([intro, "", *rows, "", f"![pinned latency CDF]({plot.name})", ""])
    default = "default (cascade)"
    headline = (f"pin p99 while select saturates: {ratios[default]:.2f}x of pin p99 alone with the default cascade "
                f"(target <= 1.5x), {ratios[SHARED4]:.2f}x with 4 slots while pinned traffic arrives, "
                f"{ratios[NICE]:.2f}x with embed_nice=10, "
                f"{ratios['cascade, no routing gate']:.2f}x without the routing gate, "
                f"{ratios['embedder=minilm']:.2f}x with embedder=minilm; the machine alone (pinned straight to the "
                f"stub under the same load) {ratios[FLOOR]:.2f}x")
    report.write_section("mixed", "Pinned requests while routing saturates",
                         "\n".join([body, f"**Headline:** {headline}."]), out_dir=out)
    return body, headline


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__).parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    with tempfile.TemporaryDirectory(prefix="loragate-bench-mixed-") as tmp:
        _body, headline = run(sizes, Path(tmp), args.tiny_dir, output_dir(args.out))
    print(headline)


if __name__ == "__main__":
    main()
