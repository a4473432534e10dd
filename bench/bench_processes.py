"""Gateway throughput with 1 and 2 server processes on this machine (``processes`` setting).

Both gateways front the same instant stub and are measured alternately in rounds at concurrency 32
with pinned requests, so the gateway itself is the bottleneck. On a 2-core machine the load
generator and the stub share the cores with the gateway, which caps what a second process can add.

Run: ``python -m bench.bench_processes [--quick]``; prints its headline figure last.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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
POLL_S = 0.5


def run(quick: bool, tiny_dir: Path, out: Path | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    _model, adapters = build_adapters(tiny_dir, ["cooking"])
    duration, rounds = (2.0, 2) if quick else (20.0, 4)
    with start_stub(work / "logs") as stub, \
            start_gateway(work / "logs", work / "one", [stub.url], tiny_dir, embedder="none") as one, \
            start_gateway(work / "logs", work / "two", [stub.url], tiny_dir, embedder="none", processes=2,
                          registry_poll_s=POLL_S) as two:
        register(one.url, adapters)
        register(two.url, adapters)
        targets = [Target("1 process", one.url, PIN, servers=(one,)),
                   Target("2 processes", two.url, PIN, servers=(two,))]
        time.sleep(3 * POLL_S)  # the registration reaches the other process within one registry poll
        warm_up(targets)
        measured = measure_interleaved(targets, rounds, topical_prompts(40_000, 5), duration_s=duration * rounds,
                                       concurrency=32)
    rows = []
    for m in measured.values():
        assert_clean(m)
        rows.append(f"| {m.label} | {m.summary.throughput_rps:.0f} | {ms(m.summary.latency.p50)} | "
                    f"{ms(m.summary.latency.p99)} | {m.cpu_ms_per_request or 0:.2f} |")
    gain = measured["2 processes"].summary.throughput_rps / measured["1 process"].summary.throughput_rps
    body = (f"Pinned non-streamed requests at concurrency 32 for {duration:g} s per gateway per round, {rounds} "
            "alternating rounds, against the instant stub (`embedder=none`). CPU is the gateway's user+system "
            "time per request (all its processes).\n\n"
            "| gateway | req/s | p50 ms | p99 ms | CPU ms/req |\n|---|---:|---:|---:|---:|\n" + "\n".join(rows)
            + f"\n\nA second process gives {gain:.2f}x the throughput of one on this 2-core machine, where the "
            "load generator and the stub take their share of the same cores.\n")
    report.write_section("processes", "Gateway processes", body, out_dir=out)
    return f"2 gateway processes give {gain:.2f}x the throughput of 1"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    print(run(args.quick, args.tiny_dir, output_dir(args.out)))


if __name__ == "__main__":
    main()
