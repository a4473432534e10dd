"""Gateways sharing PostgreSQL (``database_url``): what a fleet of replicas costs on one machine.

Three measurements, side by side in one run, on one real PostgreSQL server (``tests/postgres.py``:
Debian's binaries, a throwaway cluster):

1. Propagation: two ``loragate serve`` replicas (own data dirs, one database). Registrations on
   replica 1, one after another; for each, the time from its 201 until replica 2 lists the adapter
   in ``GET /v1/models``, which a second client polls back to back in a thread (replica 2 learns of
   it through ``LISTEN``/``NOTIFY`` and re-reads the registry).
2. Outcome-log write cost: a SQLite gateway (the default) and a PostgreSQL one in front of the
   same instant stub, pinned requests at concurrency 1 and 32 in alternating rounds; CPU per
   request of the gateway and of the PostgreSQL server (the postmaster and its backends), so the
   database's share is visible. Plus the log alone: ``OutcomeLog`` writing batches in-process.
3. Replicas behind a load balancer: 1, 2 and 3 PostgreSQL replicas behind a minimal asyncio TCP
   round-robin proxy (each client connection goes to the next replica), concurrency 32, against
   the instant stub. On a 2-core machine this measures contention, not scaling; CPU per request
   (replicas + proxy) is the figure that carries over.

Run: ``python -m bench.bench_fleet [--quick]``; prints its headline figure last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench import report
from bench.benchkit import (
    ADMIN_TOKEN,
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
    register,
    start_gateway,
    start_stub,
    topical_prompts,
    warm_up,
)
from loragate.database import PostgresDatabase, SQLiteDatabase
from loragate.loadtest.plots import latency_cdf
from loragate.server.outcomes import OutcomeLog, OutcomeRecord
from loragate.workers.launch import free_port
from tests.postgres import PostgresServer, running_postgres  # benchmarks run from the repository root
from tests.s3 import KEY_ID, REGION, SECRET, moto_server

PIN = 'pin;adapter="cooking"'
SETTLE_S = 0.5  # after each slice: longer than the outcome log's flush interval (0.25 s), so a slice's
# records are written before the next slice starts


@dataclass(frozen=True, slots=True)
class Sizes:
    registrations: int
    outcome_slice_s: float
    outcome_rounds: int
    micro_records: int
    lb_slice_s: float
    lb_rounds: int
    merges: int


FULL = Sizes(registrations=100, outcome_slice_s=5.0, outcome_rounds=4, micro_records=40_000, lb_slice_s=5.0,
             lb_rounds=4, merges=10)
QUICK = Sizes(registrations=8, outcome_slice_s=0.5, outcome_rounds=2, micro_records=1_000, lb_slice_s=0.4,
              lb_rounds=2, merges=2)


# -- PostgreSQL's CPU ------------------------------------------------------------------------------------
def postgres_cpu_seconds(server: PostgresServer) -> float:
    """User + system CPU seconds of the cluster so far: the postmaster (from ``postmaster.pid``), its live
    children (backends, checkpointer, WAL writer, ...) and, through its ``cutime``/``cstime``, the
    children it has already reaped (connections that closed).

    The postmaster's tree rather than every process of the server's user: other test clusters on this
    machine run as the same user.
    """
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    root = psutil.Process(pid)
    total = 0.0
    for child in root.children(recursive=True):  # before the root: a child exiting in between counts twice,
        with contextlib.suppress(psutil.Error):  # never not at all
            times = child.cpu_times()
            total += times.user + times.system
    times = root.cpu_times()
    return total + float(times.user + times.system + times.children_user + times.children_system)


# -- 1. propagation --------------------------------------------------------------------------------------
class ModelsPoller(threading.Thread):
    """Polls ``GET /v1/models`` back to back and notes when each name first appears (at the response
    that first lists it): the resolution is one poll's round trip, recorded in ``polls``."""

    def __init__(self, url: str) -> None:
        super().__init__(name="models-poller", daemon=True)
        self.url = url
        self.first_seen: dict[str, float] = {}
        self.polls: list[float] = []
        self._seen = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._halt.is_set():
                start = time.perf_counter()
                names = [m["id"] for m in client.get("/v1/models").raise_for_status().json()["data"]]
                now = time.perf_counter()
                self.polls.append(now - start)
                with self._seen:
                    for name in names:
                        self.first_seen.setdefault(name, now)
                    self._seen.notify_all()

    def wait_for(self, name: str, timeout: float = 30.0) -> float:
        with self._seen:
            if not self._seen.wait_for(lambda: name in self.first_seen, timeout):
                raise RuntimeError(f"{name} did not appear on {self.url} within {timeout:g} s")
            return self.first_seen[name]

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass(frozen=True, slots=True)
class Propagation:
    register_s: tuple[float, ...]  # POST -> 201 on replica 1
    visible_s: tuple[float, ...]  # 201 on replica 1 -> listed by replica 2
    poll_s: tuple[float, ...]  # one GET /v1/models round trip on replica 2


def measure_propagation(one: ServerProcess, two: ServerProcess, adapter: Path, count: int) -> Propagation:
    """``count`` registrations on ``one``, each waited for on ``two`` before the next is sent."""
    poller = ModelsPoller(two.url)
    poller.start()
    register_s, visible_s = [], []
    try:
        with httpx.Client(base_url=one.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as admin:
            for i in range(count):
                name = f"fleet-{i:03d}"
                sent = time.perf_counter()
                response = admin.post("/admin/adapters", json={"name": name, "path": str(adapter),
                                                               "description": f"adapter {name}", "examples": []})
                created = time.perf_counter()
                if response.status_code != 201:
                    raise RuntimeError(f"registering {name} failed: {response.status_code} {response.text}")
                register_s.append(created - sent)
                visible_s.append(poller.wait_for(name) - created)
    finally:
        poller.stop()
    return Propagation(tuple(register_s), tuple(visible_s), tuple(poller.polls))


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def propagation_section(p: Propagation) -> str:
    def row(label: str, values: Sequence[float]) -> str:
        return (f"| {label} | {len(values)} | {ms(_quantile(values, 0.5))} | {ms(_quantile(values, 0.99))} | "
                f"{ms(max(values))} | {ms(min(values))} |")

    early = sum(v <= 0 for v in p.visible_s)
    return (
        "### Registration propagation\n\n"
        f"Two replicas (`loragate serve`, `embedder=none`, own data dirs) on one PostgreSQL database. "
        f"{len(p.visible_s)} registrations of distinct names (the same small adapter files) on replica 1, one "
        "after another; for each, the time from its 201 until replica 2 lists the name in `GET /v1/models`, "
        "which a second client polls back to back in a thread. Replica 2 hears of it through `LISTEN`/`NOTIFY` "
        "(a trigger on the table) and re-reads the registry; each registration is waited for before the next. The "
        "listener collects a burst of notifications for 2 ms after the first (`Database.changes` in "
        "loragate/database.py) and then re-reads once, so up to 2 ms of each figure is that wait by design.\n\n"
        "| what | n | p50 ms | p99 ms | max ms | min ms |\n|---|---:|---:|---:|---:|---:|\n"
        + "\n".join([row("register on replica 1 (POST -> 201)", p.register_s),
                     row("201 -> listed by replica 2", p.visible_s),
                     row("one poll of replica 2's `/v1/models`", p.poll_s)])
        + f"\n\nResolution: a name is timed at the first poll response that lists it, so the figure is late by at "
        f"most one poll round trip (p50 {ms(_quantile(p.poll_s, 0.5))} ms, p99 {ms(_quantile(p.poll_s, 0.99))} "
        f"ms above) plus the thread's wake-up. The clock starts when the client has read the 201; replica 2 can "
        f"hear the notification at the commit, before that response reaches the client ({early} of "
        f"{len(p.visible_s)} were listed by then: zero or negative above). The poller keeps replica 2 busy and "
        "shares the 2 cores with both replicas and PostgreSQL; a replica nobody polls has that CPU to itself.\n\n"
        "![propagation CDF](fleet_propagation.png)\n"
    )


# -- CPU per slice ---------------------------------------------------------------------------------------
class SliceCpu:
    """CPU charged to each target of :func:`~bench.benchkit.measure_interleaved`, read in its ``between`` hook.

    Why not ``Target.servers``: that reads CPU right before and after a slice's requests, but a gateway
    writes its last outcome batch up to 0.25 s later, and the PostgreSQL server is no process of any
    target. Here every meter is read after each slice *and* a settling pause, and the whole interval is
    charged to the slice's target, in the order measure_interleaved runs them (A B, B A, A B, ...).
    """

    def __init__(self, labels: Sequence[str], rounds: int, meters: dict[str, Callable[[], float]]) -> None:
        self.order = [labels[i] for r in range(rounds)
                      for i in (range(len(labels)) if r % 2 == 0 else reversed(range(len(labels))))]
        self.meters = meters
        self.spent = {label: dict.fromkeys(meters, 0.0) for label in labels}
        self.seconds = dict.fromkeys(labels, 0.0)
        self._slices = 0
        self._last, self._at = self._read(), time.perf_counter()

    def _read(self) -> dict[str, float]:
        return {name: meter() for name, meter in self.meters.items()}

    def __call__(self) -> None:
        time.sleep(SETTLE_S)
        now, at = self._read(), time.perf_counter()
        label = self.order[self._slices]
        for name in self.meters:
            self.spent[label][name] += now[name] - self._last[name]
        self.seconds[label] += at - self._at
        self._last, self._at = now, at
        self._slices += 1

    def ms_per_request(self, label: str, meters: Sequence[str], measured: Measured) -> float:
        assert self._slices == len(self.order), f"{self._slices} slices measured, {len(self.order)} expected"
        return sum(self.spent[label][m] for m in meters) * 1000 / measured.summary.requests


# -- 2. outcome-log write cost ---------------------------------------------------------------------------
SQLITE, POSTGRES = "SQLite (default)", "PostgreSQL"


@dataclass(frozen=True, slots=True)
class CostRow:
    measured: Measured
    gateway_cpu_ms: float
    postgres_cpu_ms: float  # in the SQLite gateway's slices: what the idle cluster spends meanwhile
    postgres_ms_per_s: float  # the cluster's CPU per second of this target's slices


def measure_outcome_cost(sqlite_gw: ServerProcess, pg_gw: ServerProcess, pg: PostgresServer, concurrency: int,
                         sizes: Sizes, seed: int) -> dict[str, CostRow]:
    """Both gateways in alternating rounds; each slice is charged its gateway's and the cluster's CPU."""
    targets = [Target(SQLITE, sqlite_gw.url, PIN), Target(POSTGRES, pg_gw.url, PIN)]
    cpu = SliceCpu([t.label for t in targets], sizes.outcome_rounds,
                   {SQLITE: sqlite_gw.cpu_seconds, POSTGRES: pg_gw.cpu_seconds,
                    "server": lambda: postgres_cpu_seconds(pg)})
    measured = measure_interleaved(targets, sizes.outcome_rounds, topical_prompts(60_000, seed),
                                   duration_s=sizes.outcome_slice_s * sizes.outcome_rounds,
                                   concurrency=concurrency, between=cpu)
    rows = {}
    for label, m in measured.items():
        assert_clean(m)
        rows[label] = CostRow(m, cpu.ms_per_request(label, [label], m), cpu.ms_per_request(label, ["server"], m),
                              cpu.spent[label]["server"] * 1000 / cpu.seconds[label])
    return rows


def _record(run: str, i: int) -> OutcomeRecord:
    """A record as a pinned request through the gateway writes it."""
    return OutcomeRecord(
        outcome_id=f"{run}-{i}", request_id=f"{run}-{i}", ts=time.time(), kind="primary", shadow_of=None,
        route="completions", policy_asked=PIN, policy_applied=PIN, candidates=(), adapters=(("cooking", 1.0),),
        method=None, compositional=None, fallback=False, worker="http://127.0.0.1:9000", embed_ms=0.0,
        search_ms=0.0, merge_ms=0.0, load_ms=0.0, upstream_ms=0.41, total_ms=1.12, status=200)


@dataclass(frozen=True, slots=True)
class MicroRow:
    backend: str
    records: int
    wall_us: float
    client_cpu_us: float
    server_cpu_us: float | None


def measure_outcome_log(work: Path, pg: PostgresServer, records: int, batch: int = 256, rounds: int = 4
                        ) -> list[MicroRow]:
    """``OutcomeLog`` alone, in this process: ``records`` per backend, added and flushed ``batch`` at a time
    (the gateway's default batch), the two backends alternating in ``rounds``."""

    async def run() -> list[MicroRow]:
        logs = {"SQLite": OutcomeLog(SQLiteDatabase(work / "micro-outcomes.sqlite3")),
                "PostgreSQL": OutcomeLog(PostgresDatabase(pg.create_database("micro")))}
        totals = {name: [0, 0.0, 0.0, 0.0] for name in logs}
        try:
            for r in range(rounds):
                for name, log in logs.items() if r % 2 == 0 else reversed(logs.items()):
                    count = records // rounds
                    batches = [[_record(f"{name}-{r}", i + j) for j in range(min(batch, count - i))]
                               for i in range(0, count, batch)]
                    server = postgres_cpu_seconds(pg)
                    cpu, wall = time.process_time(), time.perf_counter()
                    for chunk in batches:
                        for record in chunk:
                            log.add(record)
                        await log.flush()
                    t = totals[name]
                    t[0] += count
                    t[1] += time.perf_counter() - wall
                    t[2] += time.process_time() - cpu
                    t[3] += postgres_cpu_seconds(pg) - server
        finally:
            for log in logs.values():
                await log.close()
        return [MicroRow(name, int(t[0]), t[1] * 1e6 / t[0], t[2] * 1e6 / t[0],
                         t[3] * 1e6 / t[0] if name == "PostgreSQL" else None) for name, t in totals.items()]

    return asyncio.run(run())


def outcome_section(costs: dict[int, dict[str, CostRow]], micro: list[MicroRow], sizes: Sizes) -> str:
    rows, shares = [], []
    for concurrency, pair in costs.items():
        for c in pair.values():
            s = c.measured.summary
            server = c.postgres_cpu_ms if c.measured.label == POSTGRES else None
            rows.append(f"| {concurrency} | {c.measured.label} | {s.throughput_rps:.0f} | {ms(s.latency.p50)} | "
                        f"{ms(s.latency.p99)} | {c.gateway_cpu_ms:.3f} | {'-' if server is None else f'{server:.3f}'} "
                        f"| {c.gateway_cpu_ms + (server or 0.0):.3f} |")
        sq, pq = pair[SQLITE], pair[POSTGRES]
        total = pq.gateway_cpu_ms + pq.postgres_cpu_ms
        rate = pq.measured.summary.throughput_rps / sq.measured.summary.throughput_rps
        shares.append(f"at concurrency {concurrency} the PostgreSQL setup spends {total / sq.gateway_cpu_ms:.2f}x "
                      f"SQLite's CPU per request ({total - sq.gateway_cpu_ms:+.3f} ms; the server's share "
                      f"{pq.postgres_cpu_ms / total:.0%}) at {rate:.2f}x its throughput")
    idle = max(c[SQLITE].postgres_ms_per_s for c in costs.values())
    micro_rows = [f"| {m.backend} | {m.records} | {m.wall_us:.1f} | {m.client_cpu_us:.1f} | "
                  f"{'-' if m.server_cpu_us is None else f'{m.server_cpu_us:.1f}'} |" for m in micro]
    return (
        "### Outcome-log write cost: PostgreSQL vs SQLite\n\n"
        "Two gateways (`embedder=none`) in front of the same instant stub: one with the default SQLite outcome "
        "log in its data dir, one with `database_url`. Pinned non-streamed requests, "
        f"{sizes.outcome_slice_s:g} s per gateway per round, {sizes.outcome_rounds} alternating rounds per "
        f"concurrency. CPU is user+system time from `/proc`, read after each slice and a {SETTLE_S:g} s pause "
        "(the log writes its batch every 0.25 s, so a slice's last records are charged to it), per request of "
        "the slice's gateway: the gateway's process, and the PostgreSQL cluster's: the postmaster found through "
        "`postmaster.pid`, its live children (the gateway's backends, the WAL writer, the checkpointer, ...) "
        "and the children it has reaped. Not every process of the server's user: other test clusters on this "
        "machine run as that user too. The cluster's column includes its idle background; in the SQLite "
        f"gateway's slices, when nothing used it, it spent at most {idle:.2f} ms of CPU per second. "
        "`/proc` counts in 10 ms ticks.\n\n"
        "| concurrency | outcome log | req/s | p50 ms | p99 ms | gateway CPU ms/req | PostgreSQL CPU ms/req | "
        "total CPU ms/req |\n|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
        + "\n\nThe log alone, in one process: `OutcomeLog.add` then `flush` (one `executemany` transaction per "
        "batch of 256, as the gateway's writer does), the two backends alternating in 4 rounds. Wall and client "
        "CPU are this process's (all its threads); server CPU is the cluster's.\n\n"
        "| backend | records | wall us/record | client CPU us/record | server CPU us/record |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(micro_rows)
        + "\n\nIn the gateways, " + "; ".join(shares) + ".\n\n"
        "Durability is not equal here: the test cluster runs with `fsync=off` and `synchronous_commit=off` "
        "(tests/postgres.py), while SQLite syncs each batch's commit (`synchronous=FULL`). One commit per batch "
        "makes that cost small per record on either side; a production PostgreSQL with fsync pays it on its "
        "own disk, not on the gateway's CPU.\n"
    )


# -- 3. replicas behind a load balancer ------------------------------------------------------------------
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve_round_robin(port: int, backends: Sequence[str]) -> None:
    """A minimal TCP load balancer: each accepted connection is piped, both ways, to the next backend
    (``host:port``) in turn. Per connection, not per request: a keep-alive client stays on one replica."""
    addresses = itertools.cycle([(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in backends])

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        host, backend_port = next(addresses)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, backend_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def start_balancer(logs: Path, replicas: Sequence[ServerProcess]) -> ServerProcess:
    """The round-robin proxy in its own process (``--lb-port``), so its CPU is its own and it shares no event
    loop with the load generator."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bench_fleet", "--lb-port", str(port),
               *itertools.chain.from_iterable(("--lb-backend", r.url.removeprefix("http://")) for r in replicas)]
    return ServerProcess(f"lb-{len(replicas)}", command, f"http://127.0.0.1:{port}", logs / f"lb-{port}.log",
                         env={"PYTHONPATH": str(report.ROOT)}).start()


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    measured: Measured
    cpu_ms: float  # the replicas in the path plus the proxy, per request


def measure_replicas(replicas: Sequence[ServerProcess], logs: Path, sizes: Sizes) -> list[ReplicaRow]:
    """One replica directly, then 1..n behind their own proxy; each slice is charged the CPU of its path."""
    with contextlib.ExitStack() as stack:
        paths = {"1 replica, no LB": (replicas[0].url, [replicas[0]])}
        for n in range(1, len(replicas) + 1):
            lb = stack.enter_context(start_balancer(logs, replicas[:n]))
            paths[f"{n} replica{'s' if n > 1 else ''} via LB"] = (lb.url, [lb, *replicas[:n]])
        targets = [Target(label, url, PIN) for label, (url, _) in paths.items()]
        processes = {id(p): p for _, members in paths.values() for p in members}
        cpu = SliceCpu(list(paths), sizes.lb_rounds, {str(k): p.cpu_seconds for k, p in processes.items()})
        warm_up(targets, requests=64)
        measured = measure_interleaved(targets, sizes.lb_rounds, topical_prompts(80_000, 9),
                                       duration_s=sizes.lb_slice_s * sizes.lb_rounds, concurrency=32, between=cpu)
    rows = []
    for label, (_, members) in paths.items():
        assert_clean(measured[label])
        rows.append(ReplicaRow(measured[label], cpu.ms_per_request(label, [str(id(p)) for p in members],
                                                                  measured[label])))
    return rows


def replicas_section(rows: list[ReplicaRow], sizes: Sizes) -> str:
    base = next(r for r in rows if r.measured.label == "1 replica via LB").measured.summary.throughput_rps
    table = [f"| {r.measured.label} | {r.measured.summary.throughput_rps:.0f} | "
             f"{r.measured.summary.throughput_rps / base:.2f}x | {ms(r.measured.summary.latency.p50)} | "
             f"{ms(r.measured.summary.latency.p99)} | {r.cpu_ms:.3f} |" for r in rows]
    lb_cost = rows[1].cpu_ms - rows[0].cpu_ms
    spread = rows[-1].cpu_ms - rows[1].cpu_ms
    return (
        "### Replicas behind a load balancer\n\n"
        "1, 2 and 3 PostgreSQL-backed replicas (`embedder=none`, own data dirs, one database) behind a minimal "
        "asyncio TCP round-robin proxy written in the benchmark (its own process; each client connection is piped "
        "to the next replica, so the 32 keep-alive connections spread evenly), and one replica without it, all "
        f"against the instant stub. Pinned non-streamed requests at concurrency 32, {sizes.lb_slice_s:g} s per "
        f"target per round, {sizes.lb_rounds} alternating rounds. CPU is user+system time of the replicas in "
        "the path plus the proxy's, per request. The replicas' data dirs do not hold each other's adapter files; "
        "the stub never reads them (a real fleet shares them through `store_url`).\n\n"
        "**On this 2-core machine this measures contention, not scaling:** the replicas, the proxy, the load "
        "generator, the stub and PostgreSQL all share two cores. One replica's event loop is one thread; what a "
        "second replica adds is the share of the second core the others leave idle (as with the `processes` "
        "setting), and beyond that replicas only take CPU time from each other. CPU per request does not depend "
        "on that, and is what sizes a fleet: req/s per core is 1000 / (CPU ms/req).\n\n"
        "| target | req/s | vs 1 via LB | p50 ms | p99 ms | CPU ms/req (replicas + LB) |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(table)
        + f"\n\nThe proxy's hop costs {lb_cost:+.3f} CPU ms per request (1 replica via LB vs without); from 1 to "
        f"{len(rows) - 1} replicas the CPU per request changes {spread:+.3f} ms.\n"
    )


# -- 4. one merge across replicas ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MergeOnce:
    merges: int  # distinct merges asked, each of every replica at the same moment
    replicas: int
    builds: int  # summed over the replicas' loragate_merge_cache_total{result="build"}
    downloads: int  # summed loragate_merge_cache_downloads_total
    seconds: list[float]  # per merge: until every replica answered


def _merge_counts(url: str) -> tuple[int, int]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    builds = downloads = 0.0
    for line in text.splitlines():
        if line.startswith('loragate_merge_cache_total{result="build"}'):
            builds = float(line.split()[-1])
        elif line.startswith("loragate_merge_cache_downloads_total "):
            downloads = float(line.split()[-1])
    return int(builds), int(downloads)


def _until_listed(url: str, names: Sequence[str], wait_s: float = 60.0) -> None:
    deadline = time.monotonic() + wait_s
    while not set(names) <= {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not list {names} within {wait_s:.0f} s")
        time.sleep(0.01)


def measure_merge_once(replicas: Sequence[ServerProcess], merges: int) -> MergeOnce:
    """Each merge (weights differ, so keys differ) is requested of every replica at once, from one thread per
    replica released together; the replicas share the bucket and the database's advisory lock per merge key."""
    before = [_merge_counts(r.url) for r in replicas]
    seconds = []
    for i in range(merges):
        w = round(0.2 + 0.6 * i / max(merges - 1, 1), 2)
        policy = f'average;adapters="cooking math";weights="{w} {round(1 - w, 2)}";method=cat'
        barrier = threading.Barrier(len(replicas))

        def ask(url: str, policy: str = policy, barrier: threading.Barrier = barrier) -> int:
            barrier.wait()
            return httpx.post(f"{url}/v1/completions", headers={"x-adapter-policy": policy}, timeout=120,
                              json={"model": "tiny-llama", "prompt": "merge me"}).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(len(replicas)) as pool:
            statuses = list(pool.map(ask, [r.url for r in replicas]))
        seconds.append(time.perf_counter() - started)
        if statuses != [200] * len(replicas):
            raise RuntimeError(f"merge {i}: statuses {statuses}")
    after = [_merge_counts(r.url) for r in replicas]
    return MergeOnce(merges, len(replicas), sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
                     sum(a[1] - b[1] for a, b in zip(after, before, strict=True)), seconds)


def merge_section(m: MergeOnce) -> str:
    return (
        "## A merge asked of every replica at once\n\n"
        f"{m.merges} different `cat` merges of two adapters, each requested of all {m.replicas} replicas at the same "
        "moment (one thread per replica, released together). The replicas share an S3-protocol store (moto's "
        "server, as in the tests) for adapter files and merges and take PostgreSQL's advisory lock per merge key "
        "before building.\n\n"
        "| merges | replicas | builds | downloads from the store | p50 until all answered |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| {m.merges} | {m.replicas} | {m.builds} | {m.downloads} | {ms(_quantile(m.seconds, 0.5))} ms |\n\n"
        f"Exactly one build per merge means {m.merges} builds and {m.merges * (m.replicas - 1)} downloads.\n"
    )


# -- the run ---------------------------------------------------------------------------------------------
def run(quick: bool, tiny_dir: Path, out: Path | None) -> str:
    sizes = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    logs = work / "logs"
    _model, adapters = build_adapters(tiny_dir, ["cooking"])
    _model, merge_inputs = build_adapters(tiny_dir, ["cooking", "math"])
    with running_postgres() as pg, start_stub(logs) as stub, contextlib.ExitStack() as stack:
        url = pg.create_database("fleet")

        def gateway(name: str, **settings: object) -> ServerProcess:
            return stack.enter_context(start_gateway(logs, work / name, [stub.url], tiny_dir,
                                                     **{"embedder": "none", **settings}))

        # 2 first, while both registries hold the one adapter the requests pin
        sqlite_gw, one = gateway("sqlite"), gateway("replica-1", database_url=url)
        register(sqlite_gw.url, adapters)
        register(one.url, adapters)
        warm_up([Target(SQLITE, sqlite_gw.url, PIN), Target(POSTGRES, one.url, PIN)])
        costs = {c: measure_outcome_cost(sqlite_gw, one, pg, c, sizes, seed=c) for c in (1, 32)}
        micro = measure_outcome_log(work, pg, sizes.micro_records)
        sqlite_gw.stop()

        two = gateway("replica-2", database_url=url)
        propagation = measure_propagation(one, two, adapters["cooking"], sizes.registrations)

        three = gateway("replica-3", database_url=url)
        replicas = measure_replicas([one, two, three], logs, sizes)
        for replica in (one, two, three):
            replica.stop()

        s3 = stack.enter_context(moto_server())
        bucket = s3.new_bucket()
        store = {"database_url": pg.create_database("merges"), "store_url": f"s3://{bucket}/bench",
                 "s3_endpoint_url": s3.endpoint, "s3_region": REGION, "s3_access_key_id": KEY_ID,
                 "s3_secret_access_key": SECRET}
        # the static embedder: `average` needs the router even with explicit adapters (the cheapest one will do)
        sharing = [gateway(f"sharing-{i}", embedder="static", **store) for i in range(3)]
        register(sharing[0].url, merge_inputs)
        for replica in sharing[1:]:
            _until_listed(replica.url, sorted(merge_inputs))
        merge_once = measure_merge_once(sharing, sizes.merges)

    plot = latency_cdf({"register on replica 1 (POST -> 201)": propagation.register_s,
                        "201 -> listed by replica 2": propagation.visible_s},
                       plot_file("fleet_propagation", out), title="Registration on PostgreSQL: time per adapter")
    body = ("Replicas of `loragate serve` sharing one PostgreSQL (`database_url`) on this machine: how fast a "
            "registration reaches the others, what the shared outcome log costs per request next to SQLite, and "
            "throughput and CPU of 1-3 replicas behind a load balancer. PostgreSQL is a throwaway cluster of "
            "Debian's server (tests/postgres.py) on the same 2 cores.\n\n"
            + propagation_section(propagation).replace("fleet_propagation.png", plot.name) + "\n"
            + outcome_section(costs, micro, sizes) + "\n" + replicas_section(replicas, sizes) + "\n"
            + merge_section(merge_once))
    sq, pq = costs[32][SQLITE], costs[32][POSTGRES]
    by_label = {r.measured.label: r for r in replicas}
    lb1, lb3 = by_label["1 replica via LB"], by_label["3 replicas via LB"]
    visible = propagation.visible_s
    headline = (f"fleet on PostgreSQL: a registration is listed by replica 2 {ms(_quantile(visible, 0.5))} ms "
                f"after its 201 (p50; p99 {ms(_quantile(visible, 0.99))} ms, max {ms(max(visible))} ms); at c=32 "
                f"the PostgreSQL outcome log costs {pq.gateway_cpu_ms + pq.postgres_cpu_ms:.2f} CPU ms/req "
                f"(gateway {pq.gateway_cpu_ms:.2f} + server {pq.postgres_cpu_ms:.2f}) vs SQLite's "
                f"{sq.gateway_cpu_ms:.2f}, {pq.measured.summary.throughput_rps:.0f} vs "
                f"{sq.measured.summary.throughput_rps:.0f} req/s; 3 replicas behind the LB "
                f"{lb3.measured.summary.throughput_rps:.0f} req/s vs 1's {lb1.measured.summary.throughput_rps:.0f} "
                f"(2 cores: contention, not scaling), {lb3.cpu_ms:.2f} vs {lb1.cpu_ms:.2f} CPU ms/req; "
                f"{merge_once.merges} merges each asked of 3 replicas at once: {merge_once.builds} builds, "
                f"{merge_once.downloads} downloads")
    report.write_section("bench_fleet", "Fleet: gateways sharing PostgreSQL",
                         body + f"\n**Headline:** {headline}.\n", out_dir=out)
    return headline


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--lb-port", type=int, help=argparse.SUPPRESS)  # internal: run the round-robin proxy
    parser.add_argument("--lb-backend", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lb_port is not None:
        asyncio.run(serve_round_robin(args.lb_port, args.lb_backend))
        return
    print(run(args.quick, args.tiny_dir, output_dir(args.out)))


if __name__ == "__main__":
    main()
