"""Immutable snapshots of worker state: what scheduling strategies read, and nothing they can change.

The pool mutates its private bookkeeping only on the event loop and publishes a fresh
:class:`WorkerStats` per worker on every decision, so a strategy sees one consistent moment and
cannot corrupt the pool (the production-stack pattern: discovery and stats publish, routers read).

vLLM's own view comes from its Prometheus ``/metrics``: ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:lora_requests_info``. The last is an info-style gauge
whose *labels* carry the data (``max_lora``, and comma-separated ``running_lora_adapters`` /
``waiting_lora_adapters``); vLLM emits one sample per change with the timestamp as value, so the
newest sample (largest value) is the current one.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What one scrape of a vLLM worker's ``/metrics`` says (summed over its engines/models)."""

    running: int = 0
    waiting: int = 0
    max_lora: int | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    scraped_at: float | None = None  # monotonic; None: never scraped (or reset)


def _split_adapters(value: str) -> frozenset[str]:
    return frozenset(a for a in (p.strip() for p in value.split(",")) if a)


WANTED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:lora_requests_info")


def _wanted_lines(text: str) -> str:
    """Only the lines of the families in :data:`WANTED` (samples and their ``# HELP``/``# TYPE``).

    vLLM's ``/metrics`` is ~50 KB of histograms; the Prometheus parser took ~11 ms of the gateway's
    event loop for all of it, once a second per worker, against well under 1 ms for these few lines.
    A prefix match may keep a longer name that shares a prefix; the exact-name checks below drop it.
    """
    keep = [line for line in text.splitlines()
            if line.startswith(WANTED) or (line.startswith("#") and any(f" {name} " in line for name in WANTED))]
    return "\n".join(keep) + "\n" if keep else ""


def parse_vllm_metrics(text: str, scraped_at: float | None = None) -> EngineStats:
    """Parse the parts of vLLM's Prometheus text the scheduler uses; unknown metrics are ignored.

    The parser strips the ``vllm:`` prefix nowhere (metric names with colons are legal), and the
    counters-vs-gauges suffix rules do not apply to these gauges, so names are matched exactly.
    """
    running = waiting = 0.0
    lora_latest: tuple[float, dict[str, str]] | None = None
    for family in text_string_to_metric_families(_wanted_lines(text)):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
            elif sample.name == "vllm:lora_requests_info" and (lora_latest is None or sample.value >= lora_latest[0]):
                lora_latest = (sample.value, dict(sample.labels))
    max_lora: int | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    if lora_latest is not None:
        labels = lora_latest[1]
        try:
            max_lora = int(labels.get("max_lora", ""))
        except ValueError:
            max_lora = None
        running_adapters = _split_adapters(labels.get("running_lora_adapters", ""))
        waiting_adapters = _split_adapters(labels.get("waiting_lora_adapters", ""))
    return EngineStats(running=int(running), waiting=int(waiting), max_lora=max_lora,
                       running_adapters=running_adapters, waiting_adapters=waiting_adapters, scraped_at=scraped_at)


@dataclass(frozen=True, slots=True)
class LoadBackoff:
    """Loads of ``adapter`` failed ``count`` times in a row on one worker: not retried before ``retry_at``."""

    adapter: str
    count: int
    retry_at: float  # monotonic
    message: str  # the last failure's


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """One worker at one moment, as strategies and the admin API see it.

    ``loaded`` is in least-recently-used-first order (the eviction order). ``max_loras`` is the
    pool's cap on adapters registered on this worker (not vLLM's ``--max-loras`` GPU slots, which
    only bound how many run in one batch; vLLM swaps the rest in from CPU memory).
    """

    url: str
    index: int  # position in configuration: the deterministic tie-break
    healthy: bool
    in_flight: int
    loaded: tuple[str, ...]
    max_loras: int
    loading: tuple[str, ...] = ()
    engine: EngineStats = EngineStats()
    adapter_in_flight: tuple[tuple[str, int], ...] = ()
    victim_idle_s: float | None = None  # how long ago the LRU idle adapter (the next eviction) was used
    panic_eligible: bool = False  # out of rotation only because probes went unanswered (see the health filter)
    backoff: tuple[LoadBackoff, ...] = ()  # adapters whose loads failed here, newest failure state each

    @property
    def load(self) -> int:
        """Requests queued or running here: this gateway's in-flight count, or vLLM's own if larger.

        vLLM's numbers also count other gateways' requests but lag by one scrape; this gateway's
        count is exact for its own requests. Taking the larger of the two never hides either.
        """
        return max(self.in_flight, self.engine.running + self.engine.waiting)

    @property
    def free_slots(self) -> int:
        return self.max_loras - len(self.loaded) - len(self.loading)

    def backoff_for(self, adapter: str) -> LoadBackoff | None:
        return next((b for b in self.backoff if b.adapter == adapter), None)

    def has_adapter(self, adapter: str) -> bool:
        """Loaded (per this pool) or active (per vLLM's running/waiting adapter lists)."""
        return (adapter in self.loaded or adapter in self.loading or adapter in self.engine.running_adapters
                or adapter in self.engine.waiting_adapters)
