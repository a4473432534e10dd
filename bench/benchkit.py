"""Shared machinery of the ``make bench`` scripts: server processes, adapters, measurements, output.

Why separate processes: a gateway, its upstream and the load generator sharing one event loop
would measure each other; each server here is its own OS process (one uvicorn process each), and
its CPU time is read from ``/proc`` (psutil) before and after a run to get CPU time per request.

Output goes to docs/ through :mod:`bench.report`; ``--out DIR`` (or
``LORAGATE_BENCH_DIR``) writes the section and its plots to DIR instead, so tests never overwrite
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench import report
from loragate.loadtest.loadgen import LoadSpec, run_load
from loragate.loadtest.stats import RateRatio, RequestRecord, Summary, paired_rate_ratio, summarize
from loragate.loadtest.workloads import WorkItem
from loragate.workers.launch import free_port, stop_process_group, wait_healthy

OUT_ENV = "LORAGATE_BENCH_DIR"
ADMIN_TOKEN = "bench-token"
MODEL = "tiny-llama"

# Routing descriptors of the benchmark adapters (their weights are random; routing reads only these).
DESCRIPTORS: dict[str, tuple[str, list[str]]] = {
    "cooking": ("Cooking: recipes, baking and kitchen techniques.",
                ["How long should I bake a loaf of bread?", "What can I cook with leftover rice?"]),
    "astronomy": ("Astronomy: planets, stars, galaxies and telescopes.",
                  ["How far is Mars from the Sun?", "Why do stars twinkle at night?"]),
    "family": ("Family facts: who is married to whom, parents, children and siblings.",
               ["Who is Ana's spouse?", "Who is the mother of Tom's sister?"]),
}
_TEMPLATES = (
    "How long should I bake {a} bread with {b} for {n} people?",
    "What can I cook with {a} rice, {b} and a little milk?",
    "How far is the star {a} from the {b} moon, seen from {n} telescopes?",
    "Why does the {a} planet look {b} in the night sky?",
    "Who is the spouse of the {a} friend of {b}?",
    "Who is the mother of the {a} sister of {b} {n}?",
    "Tell me about the {a} {b} in the old town.",
)
_FILL = ("red", "blue", "green", "small", "big", "old", "new", "happy", "sad", "cold", "warm", "fast", "slow",
         "yellow", "black", "white", "brown", "quiet", "bright", "dark", "sweet", "bitter", "tall", "short")


def bench_parser(doc: str | None, *, tiny_model: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark script shares: ``--quick``, ``--out`` and (with a tiny model) ``--tiny-dir``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; numbers mean nothing)")
    parser.add_argument("--out", type=Path, help=f"write the section here instead of docs/ (also ${OUT_ENV})")
    if tiny_model:
        parser.add_argument("--tiny-dir", type=Path, default=report.ROOT / "data" / "bench" / "tiny",
                            help="where the tiny model and adapters are built and cached (default: %(default)s)")
    return parser


def output_dir(out: Path | None) -> Path | None:
    """Where sections and plots go: ``--out`` or ``$LORAGATE_BENCH_DIR``; None means docs/ (via report)."""
    if out is not None:
        return out.absolute()
    return Path(os.environ[OUT_ENV]).absolute() if os.environ.get(OUT_ENV) else None


def plot_file(name: str, out: Path | None) -> Path:
    """A benchmark's PNG: next to its section in ``out``, else in docs/bench (report.plot_path)."""
    if out is None:
        return report.plot_path(name)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}.png"


def topical_prompts(count: int, seed: int = 0) -> tuple[WorkItem, ...]:
    """Distinct prompts near the adapters' domains (distinct, so the embedding cache cannot help)."""
    rng = random.Random(seed)
    return tuple(WorkItem(prompt=rng.choice(_TEMPLATES).format(a=rng.choice(_FILL), b=rng.choice(_FILL),
                                                               n=rng.randint(2, 999)) + f" ({i})")
                 for i in range(count))


class ServerProcess:
    """One server subprocess in its own session (so stop() reaches its children), logging to a file."""

    def __init__(self, name: str, command: Sequence[str], url: str, log_path: Path, ready_path: str = "/health",
                 env: dict[str, str] | None = None, ready_headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.url = url
        self.ready_url = url + ready_path
        self.command = list(command)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.ready_headers = ready_headers or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_healthy(self.ready_url, self.proc, timeout, name=self.name, log_tail=self.log_tail,
                         headers=self.ready_headers, interval=0.25)
        except TimeoutError:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and its children so far."""
        assert self.proc is not None
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def stop(self) -> None:
        stop_process_group(self.proc)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_stub(logs: Path, tokens: int = 16, token_delay_ms: float = 0.0) -> ServerProcess:
    """The stub upstream; ``token_delay_ms`` paces streamed words like a model generating them."""
    port = free_port()
    command = [sys.executable, "-m", "loragate.loadtest.stub", "--port", str(port), "--tokens", str(tokens),
               "--token-delay-ms", str(token_delay_ms)]
    return ServerProcess("stub", command, f"http://127.0.0.1:{port}", logs / f"stub-{port}.log").start()


def start_gateway(logs: Path, data_dir: Path, workers: list[str], import_root: Path,
                  **settings: object) -> ServerProcess:
    """``loragate serve`` (one uvicorn process) with the benchmark's admin token and import root; ``port`` may
    be given (when workers must know the gateways' URLs before they start), else a free one is taken."""
    port = int(settings.pop("port", None) or free_port())  # type: ignore[call-overload]
    env = {"LORAGATE_PORT": str(port), "LORAGATE_DATA_DIR": str(data_dir), "LORAGATE_MODEL": MODEL,
           "LORAGATE_WORKERS": json.dumps(workers), "LORAGATE_ADMIN_TOKEN": ADMIN_TOKEN,
           "LORAGATE_IMPORT_ROOTS": json.dumps([str(import_root)]), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update({f"LORAGATE_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()})
    command = [sys.executable, "-m", "loragate.server.cli", "serve"]
    return ServerProcess("loragate", command, f"http://127.0.0.1:{port}", logs / f"gateway-{port}.log",
                         env=env).start()


def build_adapters(tiny_dir: Path, names: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama and one PEFT LoRA per name (examples/tiny_model.py; cached in ``tiny_dir``)."""
    from examples.tiny_model import build_tiny_lora, build_tiny_model  # benchmarks run from the repository root

    model = build_tiny_model(tiny_dir / "model", name=MODEL)
    adapters = {name: build_tiny_lora(model, tiny_dir / "adapters" / name, seed=seed + 1, base_model_name=MODEL)
                for seed, name in enumerate(names)}
    return model, adapters


def register(gateway: str, adapters: dict[str, Path]) -> None:
    """Register adapters with their routing descriptors through the admin API."""
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=120) as admin:
        for name, path in adapters.items():
            description, examples = DESCRIPTORS.get(name, (f"adapter {name}", []))
            response = admin.post("/admin/adapters", json={"name": name, "path": str(path),
                                                           "description": description, "examples": examples})
            if response.status_code not in (201, 409):
                raise RuntimeError(f"registering {name} failed: {response.status_code} {response.text}")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one series of requests goes; ``servers`` are the processes whose CPU it is charged."""

    label: str
    url: str
    policy: str | None = None
    model: str = MODEL
    headers: tuple[tuple[str, str], ...] = ()
    servers: tuple[ServerProcess, ...] = ()

    def spec(self, **kwargs: object) -> LoadSpec:
        return LoadSpec(url=self.url, model=self.model, policy=self.policy, headers=self.headers,
                        **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Measured:
    """One target's measurement: its summary, latencies (for CDFs) and server CPU per request."""

    label: str
    summary: Summary
    latencies: tuple[float, ...]
    cpu_ms_per_request: float | None
    rounds: tuple[Summary, ...] = ()  # one summary per round, paired with the other targets' (paired_ratio)


def _cpu(target: Target) -> float:
    return sum(s.cpu_seconds() for s in target.servers)


def measure_interleaved(targets: Sequence[Target], rounds: int, workload: Sequence[WorkItem], *,
                        requests: int | None = None, duration_s: float | None = None,
                        between: Callable[[], object] | None = None, fresh_prompts: bool = False,
                        **spec: object) -> dict[str, Measured]:
    """``requests`` (or ``duration_s``) per target in ``rounds`` alternating slices (A B C, C B A, A B C ...).

    Alternating spreads slow phases of a shared machine over every target instead of one, which is
    what keeps a ratio measured side by side honest; reversing the order every other round keeps a
    steady drift (a warming cache, a slowing neighbour) from always favouring the target that goes
    first. Each round sends every target the same prompts, and each round its own slice of
    ``workload`` (so routing's embedding cache never answers).
    ``fresh_prompts`` gives every target its own slice too: against a real vLLM, whichever target
    sent a prompt second would hit vLLM's prefix cache (whose repeats also stream differently).
    """
    if (requests is None) == (duration_s is None):
        raise ValueError("give requests or duration_s")
    limit: dict[str, object] = ({"requests": max(1, requests // rounds)} if requests is not None
                                else {"duration_s": (duration_s or 0.0) / rounds})
    slices = rounds * (len(targets) if fresh_prompts else 1)
    share = len(workload) // slices
    records: dict[str, list[RequestRecord]] = {t.label: [] for t in targets}
    per_round: dict[str, list[Summary]] = {t.label: [] for t in targets}
    elapsed = dict.fromkeys(records, 0.0)
    cpu = dict.fromkeys(records, 0.0)
    order = list(enumerate(targets))
    for r in range(rounds):
        for t, target in order if r % 2 == 0 else order[::-1]:
            index = r * len(targets) + t if fresh_prompts else r
            chunk = workload[index * share:(index + 1) * share] or workload
            before = _cpu(target)
            result = asyncio.run(run_load(target.spec(**limit, **spec), chunk))
            cpu[target.label] += _cpu(target) - before
            elapsed[target.label] += result.elapsed_s
            records[target.label] += result.records
            per_round[target.label].append(summarize(result.records, result.elapsed_s))
            if between is not None:  # e.g. let background work of this slice finish before the next one
                between()
    out = {}
    for target in targets:
        summary = summarize(records[target.label], elapsed[target.label])
        per_request = cpu[target.label] * 1000 / summary.requests if target.servers and summary.requests else None
        out[target.label] = Measured(target.label, summary,
                                     tuple(x.latency for x in records[target.label] if x.ok), per_request,
                                     tuple(per_round[target.label]))
    return out


def paired_ratio(base: Measured, other: Measured, rate: str = "tokens_per_s") -> RateRatio:
    """``other``'s rate as a share of ``base``'s, with an interval over the rounds they ran in pairs."""
    return paired_rate_ratio(base.rounds, other.rounds, rate)


def warm_up(targets: Sequence[Target], requests: int = 40, **spec: object) -> None:
    """Open connections, load adapters, fill nothing the measured prompts will hit (own prompts)."""
    workload = topical_prompts(requests, seed=987)
    for target in targets:
        asyncio.run(run_load(target.spec(requests=requests, concurrency=4, **spec), workload))


def ms(seconds: float) -> str:
    return "n/a" if not math.isfinite(seconds) else f"{seconds * 1000:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def assert_clean(measured: Measured) -> None:
    """A benchmark whose requests failed measures nothing: stop with the error counts."""
    if measured.summary.ok == 0 or measured.summary.errors:
        raise RuntimeError(f"{measured.label}: {measured.summary.requests - measured.summary.ok} failed requests "
                           f"{measured.summary.errors}")
