"""The metrics catalogue: every Prometheus metric of the gateway, defined in one place.

Each app instance owns its :class:`CollectorRegistry` (no module-level globals), so tests can run
several gateways in one process. Names follow Prometheus conventions: base units in the name,
``_total`` on counters; labels stay bounded (policy names, routes, status codes, worker URLs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from loragate.adapters.merge_cache import MergeCacheStats
from loragate.router.auto import ContextView
from loragate.router.search import TierStats
from loragate.router.types import AutoChoice, ChainPlan, RoutingDecision, StepChoice
from loragate.workers.discovery import DiscoverySnapshot
from loragate.workers.observer import PoolObserver
from loragate.workers.stats import WorkerStats

MAX_ADAPTER_LABELS = 200
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CHAIN_STEP_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)  # max_steps is at most 32
_CANDIDATE_BUCKETS = (1, 2, 3, 4, 5, 6, 8)  # at most 4 adapters, plus the base
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5)


class _PoolCollector(Collector):
    """``loragate_worker_healthy`` and ``loragate_worker_inflight_requests`` from the pool's snapshots."""

    def __init__(self, views: Callable[[], Sequence[WorkerStats]]) -> None:
        self._views = views

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily("loragate_worker_healthy", "1 while the worker is in rotation", labels=["worker"])
        inflight = GaugeMetricFamily("loragate_worker_inflight_requests", "Requests in flight per worker",
                                     labels=["worker"])
        for view in self._views():
            healthy.add_metric([view.url], 1.0 if view.healthy else 0.0)
            inflight.add_metric([view.url], float(view.in_flight))
        yield healthy
        yield inflight


class _RestartsCollector(Collector):
    """``loragate_worker_restarts_total`` from the supervisor's counts (``loragate up``), read at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        restarts = CounterMetricFamily("loragate_worker_restarts", "Local workers restarted by loragate up after "
                                       "their process exited", labels=["worker"])
        for worker, count in sorted(self._counts().items()):
            restarts.add_metric([worker], float(count))
        yield restarts


class _DiscoveryCollector(Collector):
    """``loragate_worker_discovery_errors_total`` and ``loragate_worker_discovered`` from discovery's snapshot."""

    def __init__(self, snapshot: Callable[[], DiscoverySnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._snapshot()
        yield CounterMetricFamily("loragate_worker_discovery_errors", "Failed resolutions of workers_dns (the last "
                                  "known workers were kept)", value=float(s.errors))
        yield GaugeMetricFamily("loragate_worker_discovered", "Workers the last successful resolution of "
                                "workers_dns listed", value=float(len(s.urls)))


class _StatsCollector(Collector):
    """Counters the embedder and the merge cache keep themselves, exported from their snapshots at scrape time
    (one copy of each count: the component's own, which its tests read too)."""

    def __init__(self, embedder: Callable[[], TierStats] | None, merges: Callable[[], MergeCacheStats]) -> None:
        self._embedder = embedder
        self._merges = merges

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self._embedder is not None:
            stats = self._embedder()
            # unlabelled totals over every tier (what a one-embedder deployment always exported) ...
            for name, text, field in (
                    ("loragate_embed_batches", "Embedding backend calls (micro-batches)", "batches"),
                    ("loragate_embed_texts", "Texts sent to the embedding backend", "encoded_texts"),
                    ("loragate_embed_cache_hits", "Prompts whose embedding came from the LRU cache", "cache_hits"),
                    ("loragate_embed_coalesced", "Prompts that shared an identical prompt's pending embedding",
                     "coalesced")):
                yield CounterMetricFamily(name, text, value=float(sum(getattr(e, field)
                                                                      for e in stats.embedders.values())))
            # ... and which embedder decided each routed request (a cascade: how often it escalated)
            decided = CounterMetricFamily("loragate_route_tier", "Routed requests by the embedder whose search "
                                          "decided them (embedder=cascade: the precise one means escalated)",
                                          labels=["embedder"])
            for tier, count in stats.decided.items():
                decided.add_metric([tier], float(count))
            yield decided
        m = self._merges()
        yield CounterMetricFamily("loragate_merge_cache_joins", "Merge requests that waited on an identical "
                                  "build already in flight", value=float(m.joins))
        yield CounterMetricFamily("loragate_merge_cache_evictions", "Merged adapters evicted to stay within "
                                  "merge_cache_bytes", value=float(m.evictions))
        yield CounterMetricFamily("loragate_merge_cache_failures", "Merge builds that failed", value=float(m.failures))
        yield CounterMetricFamily("loragate_merge_cache_downloads", "Merged adapters another replica built, "
                                  "downloaded from the object store", value=float(m.downloads))
        yield GaugeMetricFamily("loragate_merge_cache_entries", "Merged adapters in the cache", value=float(m.entries))
        yield GaugeMetricFamily("loragate_merge_cache_bytes", "Disk used by the merged-adapter cache",
                                value=float(m.bytes))


class _AutoCollector(Collector):
    """The learned auto's statistics per context and arm, read from its snapshot at scrape time (contexts are
    capped by auto_max_contexts, arms by auto_arms: the label sets stay bounded)."""

    def __init__(self, views: Callable[[], Sequence[ContextView]]) -> None:
        self._views = views

    def collect(self) -> Iterator[GaugeMetricFamily]:
        mean = GaugeMetricFamily("loragate_auto_arm_success", "Posterior mean success of an arm in a context "
                                 "(graded outcomes, primaries and shadows, decayed)", labels=["context", "arm"])
        low = GaugeMetricFamily("loragate_auto_arm_success_low", "Lower end of the arm's 95% posterior interval",
                                labels=["context", "arm"])
        high = GaugeMetricFamily("loragate_auto_arm_success_high", "Upper end of the arm's 95% posterior interval",
                                 labels=["context", "arm"])
        graded = GaugeMetricFamily("loragate_auto_arm_observations", "Decayed graded outcomes of an arm in a context",
                                   labels=["context", "arm"])
        chosen = GaugeMetricFamily("loragate_auto_choice", "1 for the arm auto currently serves a context with",
                                   labels=["context", "arm"])
        served = GaugeMetricFamily("loragate_auto_success", "Success of auto's own client-path choices in a context "
                                   "(decayed), beside the best arm's posterior mean", labels=["context", "series"])
        regret = GaugeMetricFamily("loragate_auto_regret", "Best tried arm's posterior mean minus that of auto's own "
                                   "choices in a context", labels=["context"])
        for view in self._views():
            for arm in view.arms:
                labels = [view.context, arm.arm]
                mean.add_metric(labels, arm.mean)
                low.add_metric(labels, arm.ci95[0])
                high.add_metric(labels, arm.ci95[1])
                graded.add_metric(labels, arm.observations)
                chosen.add_metric(labels, 1.0 if arm.arm == view.choice else 0.0)
            if view.best_mean is not None:
                served.add_metric([view.context, "best_arm"], view.best_mean)
            if view.served_success is not None and view.regret is not None:
                served.add_metric([view.context, "auto"], view.served_success)
                regret.add_metric([view.context], view.regret)
        yield from (mean, low, high, graded, chosen, served, regret)


class GatewayMetrics(PoolObserver):
    """All gateway metrics; also the worker pool's observer (``workers.observer.PoolObserver``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loragate_requests_total", "Completion requests by route, applied policy and status",
                                ["route", "policy", "status"], registry=r)
        self.upstream_latency = Histogram("loragate_upstream_latency_seconds",
                                          "Time from sending to the worker until its full response",
                                          ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("loragate_gateway_overhead_seconds",
                                  "Time the gateway itself adds (total minus upstream and adapter loading)",
                                  ["route"], buckets=_OVERHEAD_BUCKETS, registry=r)
        self.adapter_loads = Counter("loragate_adapter_loads_total", "Adapter loads on workers by result",
                                     ["worker", "result"], registry=r)
        self.adapter_load_latency = Histogram("loragate_adapter_load_seconds", "Latency of one adapter load",
                                              ["worker"], buckets=_LATENCY_BUCKETS, registry=r)
        self.loaded_adapters = Gauge("loragate_worker_loaded_adapters", "Adapters loaded per worker (gateway view)",
                                     ["worker"], registry=r)
        self.registered_adapters = Gauge("loragate_registered_adapters", "Adapters in the registry", registry=r)
        self.routing = Counter("loragate_routing_decisions_total",
                               "Decisions of searching policies: hit (adapters chosen) or fallback (base)",
                               ["policy", "result"], registry=r)
        self.route_score = Histogram("loragate_route_top_score", "Similarity of the nearest adapter per routed request",
                                     ["policy"], buckets=(0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1), registry=r)
        self.compositional = Counter("loragate_compositional_queries_total",
                                     "Routed requests by compositional flag", ["policy", "compositional"], registry=r)
        self.selections = Counter("loragate_adapter_selections_total", "Adapters chosen by decisions",
                                  ["adapter"], registry=r)
        self.route_latency = Histogram("loragate_route_seconds", "Routing time (embed + search + decide)",
                                       ["policy"], buckets=_OVERHEAD_BUCKETS, registry=r)
        self.merge_builds = Histogram("loragate_merge_build_seconds", "Time to build one merged adapter",
                                      ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.merge_cache = Counter("loragate_merge_cache_total", "Merged-adapter lookups: hit or build",
                                   ["result"], registry=r)
        self.outcomes = Counter("loragate_outcomes_total",
                                "Graded requests by applied policy, compositional flag, result, kind (primary|shadow)",
                                ["policy", "compositional", "result", "kind"], registry=r)
        self.shadow_runs = Counter("loragate_shadow_runs_total",
                                   "Shadow runs: done, error, dropped (too many pending), expired (no idle moment)",
                                   ["result"], registry=r)
        self.shadow_pending = Gauge("loragate_shadow_pending", "Shadow runs scheduled and not finished", registry=r)
        self.route_waiting = Gauge("loragate_route_waiting", "Routed requests waiting for a slot of the routing gate "
                                   "(route_max_concurrency) or yielding to pinned traffic", registry=r)
        self.worker_transitions = Counter("loragate_worker_health_transitions_total",
                                          "Workers leaving (to=down) or re-entering (to=up) rotation",
                                          ["worker", "to"], registry=r)
        self.adapter_evictions = Counter("loragate_adapter_evictions_total",
                                         "LRU adapter unloads to stay under a worker's cap", ["worker"], registry=r)
        self.adapter_load_failures = Counter("loragate_adapter_load_failures_total",
                                             "Adapter loads a worker refused (backed off, not retried at once)",
                                             ["worker"], registry=r)
        self.request_retries = Counter("loragate_request_retries_total",
                                       "Requests retried on another worker before any response byte", ["route"],
                                       registry=r)
        self.panic_routes = Counter("loragate_panic_routes_total",
                                    "Requests sent to a worker out of rotation because none was in rotation and "
                                    "its probes had only timed out", ["worker"], registry=r)
        # chain (labelled by choose only: likelihood runs every candidate per step, route one)
        self.chain_steps = Histogram("loragate_chain_steps", "Steps per chain request answered whole",
                                     ["choose"], buckets=_CHAIN_STEP_BUCKETS, registry=r)
        self.chain_step_candidates = Histogram("loragate_chain_step_candidates",
                                               "Candidate generations per chain step", ["choose"],
                                               buckets=_CANDIDATE_BUCKETS, registry=r)
        self.chain_step_latency = Histogram("loragate_chain_step_seconds",
                                            "Time to decide one chain step (all its candidates' generations)",
                                            ["choose"], buckets=_LATENCY_BUCKETS, registry=r)
        self.auto_choices = Counter("loragate_auto_choices_total", "Client requests the learned auto routed, by "
                                    "context, arm and reason (default | exploit | explore)",
                                    ["context", "arm", "reason"], registry=r)
        self._selection_labels: set[str] = set()

    # -- PoolObserver ----------------------------------------------------------------------------
    def adapter_loaded(self, worker: str, adapter: str, seconds: float, ok: bool) -> None:
        self.adapter_loads.labels(worker, "ok" if ok else "error").inc()
        self.adapter_load_latency.labels(worker).observe(seconds)

    def adapters_on_worker(self, worker: str, count: int) -> None:
        self.loaded_adapters.labels(worker).set(count)

    @classmethod
    def catalogue(cls) -> GatewayMetrics:
        """An instance exporting every metric family the gateway has (for docs and dashboard checks)."""
        metrics = cls()
        metrics.watch_pool(list)
        metrics.watch_worker_restarts(dict)
        metrics.watch_components(lambda: TierStats({}), lambda: MergeCacheStats(0, 0, 0, 0, 0, 0.0, 0, 0))
        metrics.watch_discovery(lambda: DiscoverySnapshot(""))
        metrics.watch_auto(tuple)
        return metrics

    def watch_auto(self, views: Callable[[], Sequence[ContextView]]) -> None:
        """The learned auto's per-context statistics (when auto_arms is set), read at scrape time."""
        self.registry.register(_AutoCollector(views))

    def watch_pool(self, views: Callable[[], Sequence[WorkerStats]]) -> None:
        """Per-worker gauges read from the pool's snapshots at scrape time (nothing on the request path)."""
        self.registry.register(_PoolCollector(views))

    def watch_components(self, embedder: Callable[[], TierStats] | None,
                         merges: Callable[[], MergeCacheStats]) -> None:
        """The embedder's (when routing is on) and the merge cache's own counters, read at scrape time."""
        self.registry.register(_StatsCollector(embedder, merges))

    def watch_discovery(self, snapshot: Callable[[], DiscoverySnapshot]) -> None:
        """Worker discovery's resolution counts (with ``workers_dns`` only), read at scrape time."""
        self.registry.register(_DiscoveryCollector(snapshot))

    def watch_worker_restarts(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Restart counts of supervised local workers, read at scrape time (they live in another process)."""
        self.registry.register(_RestartsCollector(counts))

    def worker_health(self, worker: str, healthy: bool) -> None:
        self.worker_transitions.labels(worker, "up" if healthy else "down").inc()

    def adapter_evicted(self, worker: str, adapter: str) -> None:
        self.adapter_evictions.labels(worker).inc()

    def adapter_load_failed(self, worker: str, adapter: str, message: str) -> None:
        self.adapter_load_failures.labels(worker).inc()

    def panic_routed(self, worker: str) -> None:
        self.panic_routes.labels(worker).inc()

    def worker_removed(self, worker: str) -> None:
        """Delete the series of a worker that left the pool, rather than leave them at their last value
        or at 0: discovered workers are pod IPs, new with every restart, so kept series would grow
        without bound, and Prometheus already holds their history (a counter that ends is fine for
        ``rate``). The gauges read from pool snapshots drop it by themselves."""
        by_worker = (self.adapter_load_latency, self.loaded_adapters, self.adapter_evictions,
                     self.adapter_load_failures, self.panic_routes)
        series: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [(m, (worker,)) for m in by_worker]
        series += [(self.adapter_loads, (worker, r)) for r in ("ok", "error")]
        series += [(self.worker_transitions, (worker, to)) for to in ("up", "down")]
        for metric, labels in series:
            with contextlib.suppress(KeyError):  # a series that never had a sample
                metric.remove(*labels)

    def request_retried(self, route: str) -> None:
        self.request_retries.labels(route).inc()

    # -- request path ----------------------------------------------------------------------------
    def request_done(self, route: str, policy: str, status: int, upstream_s: float | None, overhead_s: float) -> None:
        self.requests.labels(route, policy, str(status)).inc()
        if upstream_s is not None:
            self.upstream_latency.labels(route).observe(upstream_s)
        self.overhead.labels(route).observe(max(overhead_s, 0.0))

    def decided(self, decision: RoutingDecision, route_s: float) -> None:
        """Routing read-outs of one decision (searching policies only say hit/fallback)."""
        policy = decision.policy_applied
        self.route_latency.labels(policy).observe(route_s)
        for chosen in decision.adapters:
            self.selections.labels(self._adapter_label(chosen.name)).inc()
        if decision.candidates or decision.fallback:
            self.routing.labels(policy, "fallback" if decision.fallback else "hit").inc()
            if decision.candidates:
                self.route_score.labels(policy).observe(decision.candidates[0][1])
        if decision.compositional is not None:
            self.compositional.labels(policy, str(decision.compositional).lower()).inc()

    def chain_ran(self, plan: ChainPlan, steps: Sequence[StepChoice], *, completed: bool) -> None:
        """A chain request's steps (shadows included, as in ``decided``). Steps per request only for an
        answer completed (a failed chain stopped early, so its count says nothing about answers); each
        step decided counts for the per-step histograms however the request ended."""
        if completed:
            self.chain_steps.labels(plan.choose).observe(len(steps))
        for step in steps:
            self.chain_step_candidates.labels(plan.choose).observe(len(step.scores))
            self.chain_step_latency.labels(plan.choose).observe(step.decide_s)

    def _adapter_label(self, name: str) -> str:
        """Adapter names as labels, capped so that label cardinality stays bounded."""
        if name in self._selection_labels or len(self._selection_labels) < MAX_ADAPTER_LABELS:
            self._selection_labels.add(name)
            return name
        return "other"

    def merged(self, method: str, built: bool, seconds: float) -> None:
        self.merge_cache.labels("build" if built else "hit").inc()
        if built:
            self.merge_builds.labels(method).observe(seconds)

    def outcome(self, policy: str, compositional: bool | None, result: str, kind: str) -> None:
        flag = "unknown" if compositional is None else str(compositional).lower()
        self.outcomes.labels(policy, flag, result, kind).inc()

    def auto_chose(self, choice: AutoChoice) -> None:
        self.auto_choices.labels(choice.context, choice.arm, choice.reason).inc()

    def shadow_run(self, result: str) -> None:
        self.shadow_runs.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
