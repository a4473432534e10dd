"""Benchmark: loragate vs the LiteLLM proxy, both in front of the same instant stub upstream.

One server process each (stub, ``loragate serve``, ``litellm --num_workers 1``), the same requests
and concurrency, alternating between targets: overhead p50/p99 over direct at concurrency 1, server
CPU time per request, and the most requests/s at concurrency 32. Targets (issue 8): loragate
``pin`` overhead <= 0.3x LiteLLM's, throughput >= 4x LiteLLM's, and ``select`` (with routing)
overhead <= LiteLLM's plain pass-through overhead. Targets (issue 20), for ``select`` with the default
embedder (the static -> MiniLM cascade): overhead p50 <= 2x pin's, p99 <= LiteLLM's p99, and >= 600
routed requests/s from the one gateway process.

LiteLLM lives in its own virtual environment (``.venv-litellm``, created on demand): installing
``litellm[proxy]`` into .venv would move pinned packages under vLLM and the gateway. If it cannot be
installed or started, the report section says so with the error and the script still succeeds.

Run: ``python -m bench.bench_litellm [--quick] [--out DIR]``; the last line printed is
the headline figure.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.benchkit import (
    Measured,
    ServerProcess,
    Target,
    assert_clean,
    bench_parser,
    build_adapters,
    measure_interleaved,
    ms,
    output_dir,
    plot_file,
    ratio,
    register,
    start_gateway,
    start_stub,
    topical_prompts,
    warm_up,
)
from loragate.loadtest.plots import latency_cdf
from loragate.server.settings import Settings
from loragate.workers.launch import free_port

LITELLM_SPEC = "litellm[proxy]==1.106.2"
VENV = report.ROOT / ".venv-litellm"
MASTER_KEY = "sk-loragate-bench"
PIN = 'pin;adapter="cooking"'
DEFAULTS = Settings.model_fields
CASCADE_FAST, CASCADE_PRECISE = DEFAULTS["cascade_fast"].default, DEFAULTS["cascade_precise"].default
DEFAULT_SELECT = f"loragate select ({DEFAULTS['embedder'].default}, default)"


def route_tiers(gateway: str) -> dict[str, float]:
    """``loragate_route_tier_total`` by embedder, scraped from a gateway's /metrics."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    return {s.labels["embedder"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "loragate_route_tier_total"}


@dataclass(frozen=True, slots=True)
class Sizes:
    c1_requests: int
    rounds: int
    throughput_s: float
    concurrency: int


FULL = Sizes(c1_requests=600, rounds=4, throughput_s=10.0, concurrency=32)
QUICK = Sizes(c1_requests=12, rounds=2, throughput_s=1.0, concurrency=8)


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the report shows why."""


def ensure_litellm(venv: Path = VENV, install: bool = True) -> Path:
    """The ``litellm`` executable of ``venv``, creating the venv and installing LiteLLM on demand."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    if not install:
        raise LiteLLMUnavailable(f"{exe} does not exist (run without --no-install to create it)")
    steps = [["python3", "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", LITELLM_SPEC]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                             if "is ignored: it is neither" not in line)[-2000:]
            raise LiteLLMUnavailable(f"`{' '.join(step)}` failed ({done.returncode}):\n{tail}")
    # A venv inside the repository must not show up in git status or be linted.
    (venv / ".gitignore").write_text("*\n")
    return exe


def litellm_config(stub_url: str, model: str) -> dict[str, object]:
    """The proxy config: one OpenAI-compatible deployment (the stub), telemetry off, a master key."""
    return {
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{stub_url}/v1", "api_key": "unused"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": MASTER_KEY},
    }


def start_litellm(exe: Path, stub_url: str, model: str, work: Path) -> ServerProcess:
    config = work / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(stub_url, model), indent=1))  # JSON is YAML
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "DO_NOT_TRACK": "1",
           "LITELLM_LOG": "ERROR"}
    command = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
               "--telemetry", "False"]
    server = ServerProcess("litellm", command, f"http://127.0.0.1:{port}", work / "logs" / "litellm.log",
                           ready_path="/health/liveliness", env=env)
    try:
        return server.start(timeout=240)
    except (RuntimeError, TimeoutError) as exc:
        raise LiteLLMUnavailable(str(exc)) from exc


def _row(label: str, c1: Measured, tp: Measured, direct_c1: Measured) -> tuple[str, float, float]:
    lat, base = c1.summary.latency, direct_c1.summary.latency
    over50, over99 = lat.p50 - base.p50, lat.p99 - base.p99
    cpu = tp.cpu_ms_per_request
    shown = ("-", "-") if c1 is direct_c1 else (ms(over50), ms(over99))
    row = (f"| {label} | {ms(lat.p50)} | {ms(lat.p99)} | {shown[0]} | {shown[1]} | "
           f"{tp.summary.throughput_rps:.0f} | {'-' if cpu is None else f'{cpu:.2f}'} |")
    return row, over50, over99


def run(sizes: Sizes, work: Path, tiny_dir: Path, install: bool, out: Path | None) -> tuple[str, str]:
    """Measure and return (markdown body, headline)."""
    _model, adapters = build_adapters(tiny_dir, ["cooking", "astronomy", "family"])
    litellm_error: str | None = None
    with start_stub(work / "logs") as stub, \
            start_gateway(work / "logs", work / "gateway-data", [stub.url], tiny_dir) as gateway, \
            start_gateway(work / "logs", work / "gateway-minilm", [stub.url], tiny_dir, embedder="minilm") as precise, \
            start_gateway(work / "logs", work / "gateway-static", [stub.url], tiny_dir, embedder="static") as fast:
        for server in (gateway, precise, fast):
            register(server.url, adapters)
        targets = [Target("direct (stub)", stub.url, servers=(stub,)),
                   Target("loragate pin", gateway.url, PIN, servers=(gateway,)),
                   Target(DEFAULT_SELECT, gateway.url, "select", servers=(gateway,)),
                   Target("loragate select (MiniLM)", precise.url, "select", servers=(precise,)),
                   Target("loragate select (static)", fast.url, "select", servers=(fast,))]
        litellm: ServerProcess | None = None
        try:
            litellm = start_litellm(ensure_litellm(install=install), stub.url, "tiny-llama", work)
            targets.append(Target("LiteLLM proxy", litellm.url, headers=(("Authorization", f"Bearer {MASTER_KEY}"),),
                                  servers=(litellm,)))
        except LiteLLMUnavailable as exc:
            litellm_error = str(exc)
        try:
            warm_up(targets)
            c1 = measure_interleaved(targets, sizes.rounds, topical_prompts(sizes.c1_requests, 11),
                                     requests=sizes.c1_requests, concurrency=1)
            tp = measure_interleaved(targets, sizes.rounds, topical_prompts(40_000, 12),
                                     duration_s=sizes.throughput_s, concurrency=sizes.concurrency)
            tiers = route_tiers(gateway.url)
        finally:
            if litellm is not None:
                litellm.stop()
    for m in [*c1.values(), *tp.values()]:
        assert_clean(m)
    direct = c1["direct (stub)"]
    rows = ["| path | p50 ms | p99 ms | p50 overhead ms | p99 overhead ms | max req/s (c="
            f"{sizes.concurrency}) | proxy CPU ms/req |", "|---|---:|---:|---:|---:|---:|---:|"]
    over: dict[str, tuple[float, float]] = {}
    for t in targets:
        row, o50, o99 = _row(t.label, c1[t.label], tp[t.label], direct)
        rows.append(row)
        over[t.label] = (o50, o99)
    plot = latency_cdf({k: v.latencies for k, v in c1.items()}, plot_file("litellm_cdf", out),
                       title="Latency at concurrency 1: direct vs loragate vs LiteLLM", log_x=True)
    intro = (f"{sizes.c1_requests} requests per path at concurrency 1 (alternating in {sizes.rounds} rounds), "
             f"then {sizes.throughput_s:g} s per path at concurrency {sizes.concurrency} (also in rounds); "
             "`max_tokens` 16, non-streamed `/v1/completions` against the instant stub. One server process "
             f"each; LiteLLM `{LITELLM_SPEC}` (own venv, `--num_workers 1`, telemetry off, master key, its "
             "default logging) routes model `tiny-llama` to the stub as an `openai/` deployment. CPU is the "
             "proxy process's user+system time per request during the throughput run (the stub's for direct).")
    body = [intro, "", *rows, ""]
    if litellm_error is not None:
        body += [f"**LiteLLM could not be measured:**\n\n```\n{litellm_error.strip()}\n```", ""]
        headline = (f"LiteLLM unavailable; loragate pin +{over['loragate pin'][0] * 1000:.2f} ms p50 over direct, "
                    f"{tp['loragate pin'].summary.throughput_rps:.0f} req/s")
        report.write_section("litellm", "loragate vs LiteLLM", "\n".join([*body, f"**Headline:** {headline}."]),
                             out_dir=out)
        return "\n".join(body), headline
    lite = "LiteLLM proxy"
    pin_p50 = ratio(over["loragate pin"][0], over[lite][0])
    pin_p99 = ratio(over["loragate pin"][1], over[lite][1])
    tput = ratio(tp["loragate pin"].summary.throughput_rps, tp[lite].summary.throughput_rps)
    cpu = ratio(tp["loragate pin"].cpu_ms_per_request, tp[lite].cpu_ms_per_request)
    # The load generator and the stub share the cores with the proxy under test, so no proxy here can
    # exceed direct's throughput: direct / LiteLLM is the highest pin / LiteLLM this machine can show.
    ceiling = ratio(tp["direct (stub)"].summary.throughput_rps, tp[lite].summary.throughput_rps)
    of_direct = ratio(tp["loragate pin"].summary.throughput_rps, tp["direct (stub)"].summary.throughput_rps)
    sel_p50 = ratio(over["loragate select (MiniLM)"][0], over[lite][0])
    sel_p99 = ratio(over["loragate select (MiniLM)"][1], over[lite][1])
    sel_tput = ratio(tp["loragate select (MiniLM)"].summary.throughput_rps, tp[lite].summary.throughput_rps)
    pin_over_ok = over["loragate pin"][0] <= 0.3 * over[lite][0]
    tput_ok = tp["loragate pin"].summary.throughput_rps >= 4 * tp[lite].summary.throughput_rps
    sel_ok = over["loragate select (MiniLM)"][0] <= over[lite][0]
    static_p50 = ratio(over["loragate select (static)"][0], over[lite][0])
    static_ok = over["loragate select (static)"][0] <= over[lite][0]
    default_p50 = over[DEFAULT_SELECT][0] / over["loragate pin"][0]
    default_p99 = c1[DEFAULT_SELECT].summary.latency.p99 / c1[lite].summary.latency.p99
    default_tput = tp[DEFAULT_SELECT].summary.throughput_rps
    escalated = tiers.get(CASCADE_PRECISE, 0.0) / max(sum(tiers.values()), 1.0)
    body += [
        "| ratio loragate / LiteLLM | measured | target | met |",
        "|---|---:|---:|:---:|",
        f"| pin overhead p50 | {pin_p50} | <= 0.30x | {'yes' if pin_over_ok else 'no'} |",
        f"| pin overhead p99 | {pin_p99} | | |",
        f"| pin max throughput | {tput} | >= 4x | {'yes' if tput_ok else 'no'} |",
        f"| ceiling: direct (no proxy) max throughput | {ceiling} | | |",
        f"| pin max throughput / direct's | {of_direct} | | |",
        f"| pin CPU per request | {cpu} | | |",
        f"| select (MiniLM routing) overhead p50 | {sel_p50} | <= 1.00x | {'yes' if sel_ok else 'no'} |",
        f"| select (MiniLM routing) overhead p99 | {sel_p99} | | |",
        f"| select max throughput | {sel_tput} | | |",
        f"| select (static embedder routing) overhead p50 | {static_p50} | <= 1.00x | {'yes' if static_ok else 'no'} |",
        "",
        f"`{DEFAULT_SELECT}` is the default embedder, the cascade `{CASCADE_FAST}` -> `{CASCADE_PRECISE}`; it "
        f"escalated {escalated:.0%} of this run's routed prompts to `{CASCADE_PRECISE}` "
        "(`loragate_route_tier_total`).",
        "",
        "| issue 20: select with the default embedder | measured | target | met |",
        "|---|---:|---:|:---:|",
        f"| overhead p50 / pin overhead p50 | {default_p50:.2f}x | <= 2.00x | {'yes' if default_p50 <= 2 else 'no'} |",
        f"| p99 / LiteLLM p99 | {default_p99:.2f}x | <= 1.00x | {'yes' if default_p99 <= 1 else 'no'} |",
        f"| routed req/s, one process (c={sizes.concurrency}) | {default_tput:.0f} | >= 600 | "
        f"{'yes' if default_tput >= 600 else 'no'} |",
        "",
        f"![latency CDF]({plot.name})",
        "",
    ]
    headline = (f"loragate pin vs LiteLLM: overhead p50 {pin_p50} (p99 {pin_p99}), max throughput {tput} "
                f"(ceiling here {ceiling}), CPU/request {cpu}; select overhead p50 {sel_p50} (MiniLM) / "
                f"{static_p50} (static) of LiteLLM's; default select (cascade): overhead p50 {default_p50:.2f}x "
                f"pin's, p99 {default_p99:.2f}x LiteLLM's, {default_tput:.0f} req/s")
    report.write_section("litellm", "loragate vs LiteLLM", "\n".join([*body, f"**Headline:** {headline}."]),
                             out_dir=out)
    return "\n".join(body), headline


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--no-install", action="store_true",
                        help=f"do not create {VENV.name} when it is missing (the section then says so)")
    args = parser.parse_args(argv)
    out = output_dir(args.out)
    with tempfile.TemporaryDirectory(prefix="loragate-bench-") as tmp:
        _body, headline = run(QUICK if args.quick else FULL, Path(tmp), args.tiny_dir.absolute(),
                              install=not args.no_install, out=out)
    print(headline)


if __name__ == "__main__":
    main()
