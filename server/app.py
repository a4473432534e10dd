"""The FastAPI app factory: wires every service once at startup and installs one error handler."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loragate import __version__
from loragate.adapters.base_shapes import BaseModelShapes
from loragate.adapters.merge_cache import MergeCache
from loragate.adapters.objectstore import S3Store, client_from, open_store
from loragate.adapters.registry import AdapterRegistry, RegistryLimits
from loragate.adapters.resolve import Resolver
from loragate.adapters.sources import AdapterSources
from loragate.database import PostgresDatabase, PostgresOptions, open_databases
from loragate.errors import ConfigError, InvalidRequest, LoragateError
from loragate.router.auto import AutoPolicy
from loragate.router.compositional import make_detector
from loragate.router.embedder import Embedder, backend_class, make_backend
from loragate.router.grammar import parse_policy
from loragate.router.index import DescriptorIndex, check_aggregate
from loragate.router.search import CASCADE, CascadeSearcher, Escalation, IndexSearcher, Searcher, Tier
from loragate.router.service import Router, check_policy
from loragate.router.types import RouterConfig
from loragate.server.admin import AdminAuth, AdminService
from loragate.server.auto import AutoLearner, auto_config
from loragate.server.calls import CallParser
from loragate.server.gate import RoutingGate
from loragate.server.metrics import GatewayMetrics
from loragate.server.outcomes import OutcomeLog
from loragate.server.pipeline import CompletionService
from loragate.server.recorder import OutcomeRecorder
from loragate.server.settings import Settings, load_settings
from loragate.server.shadows import ShadowConfig, ShadowScheduler
from loragate.workers.client import VLLMAdminClient
from loragate.workers.delivery import AdapterFiles, adapter_dir_lookup
from loragate.workers.discovery import WorkerDiscovery
from loragate.workers.dispatch import Dispatcher
from loragate.workers.pool import PoolConfig, WorkerPool, WorkerSpec
from loragate.workers.supervise import RestartCounts

logger = logging.getLogger("loragate")


@dataclass(frozen=True, slots=True)
class Services:
    """Everything route handlers may use, built once per app."""

    settings: Settings
    registry: AdapterRegistry
    pool: WorkerPool
    completions: CompletionService
    shadows: ShadowScheduler
    admin: AdminService
    auth: AdminAuth
    metrics: GatewayMetrics
    searcher: Searcher | None
    adapter_files: AdapterFiles
    outcomes: OutcomeLog
    discovery: WorkerDiscovery | None = None  # with workers_dns: keeps the pool's discovered members current
    auto: AutoLearner | None = None  # the learned auto (None: auto_arms is empty)


@contextmanager
def config_errors(setting: str | None = None) -> Iterator[None]:
    """Wiring from settings: what validators shared with request parsing (the policy grammar, worker
    specs, scheduling names) raise as :class:`InvalidRequest` is a configuration mistake here;
    ``setting`` names the option in the message."""
    try:
        yield
    except InvalidRequest as exc:
        message = f"{setting}: {exc.message}" if setting else exc.message
        raise ConfigError(message, param=setting or exc.param) from None


def pool_config(settings: Settings) -> PoolConfig:
    """The worker pool's configuration (validated on construction: delivery, scheduling profile, weights)."""
    return PoolConfig(strategy=settings.scheduling, scorer_weights=settings.scheduling_weights,
                      max_loras=settings.worker_max_loras, delivery=settings.adapter_delivery,
                      probe_interval_s=settings.probe_interval_s, probe_timeout_s=settings.probe_timeout_s,
                      scrape_interval_s=settings.scrape_interval_s)


def embedder_options(settings: Settings) -> dict[str, object]:
    """The options the embedder backend is built with."""
    options: dict[str, object] = {"threads": settings.embed_threads, "cache_dir": settings.embedder_cache_dir}
    if settings.embedder_model_dir:
        options["model_dir"] = settings.embedder_model_dir
    return options


def check_config(settings: Settings) -> None:
    """Check what wiring derives from ``settings`` without building anything (no I/O, no model load).

    Runs before the app exists, so a mistake stops ``loragate serve``/``up`` with one line
    (:class:`ConfigError`) rather than a traceback from a failed startup, and ``up`` before it
    starts its workers: worker specs and duplicates, the pool's scheduling, the default and shadow
    policies (name, parameters, and whether they need routing that ``embedder=none`` leaves out), the
    embedder backend, detector and aggregate. Wiring raises :class:`ConfigError` too, for anything
    only the built services can tell.
    """
    with config_errors():
        pool_config(settings)
        urls = [WorkerSpec.parse(worker).url for worker in settings.workers]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"workers: duplicate worker URLs in {urls}", param="workers")
    if settings.store_url and not settings.database_url:
        raise ConfigError("store_url needs database_url: replicas that share a bucket must share the registry "
                          "(PostgreSQL), or one replica's garbage collection deletes another's files",
                          param="store_url")
    if not urls and not settings.workers_dns:
        raise ConfigError("workers: no workers to send requests to: set workers (a list of URLs) or workers_dns "
                          "(name:port)", param="workers")
    routing = settings.embedder != "none"
    with config_errors("default_policy"):
        check_policy(parse_policy(settings.default_policy, source="default"), router_config(settings), routing=routing)
    with config_errors("shadow_policy"):
        if settings.shadow_policy:
            check_policy(parse_policy(settings.shadow_policy, source="shadow"), router_config(settings),
                         routing=routing)
    auto_config(settings, router_config(settings))
    with config_errors():
        tiers = embedder_tiers(settings)
        for backend in tiers:
            backend_class(backend, **embedder_options(settings))
        if tiers:
            check_aggregate(settings.index_aggregate)  # first: the detector's model is looked up by it
            make_detector(settings.compositional_detector, tiers[0], settings.index_aggregate)


def router_config(settings: Settings) -> RouterConfig:
    return RouterConfig(min_score=settings.select_min_score, k=settings.average_k, method=settings.average_method,
                        weights=settings.average_weights, temperature=settings.average_temperature,
                        weight_step=settings.merge_weight_step, candidates=settings.route_candidates,
                        max_words=settings.route_max_words)


def embedder_tiers(settings: Settings) -> tuple[str, ...]:
    """The embedder backends routing runs: none, one, or the cascade's fast and precise tiers."""
    if settings.embedder == "none":
        return ()
    if settings.embedder == CASCADE:
        if settings.embedder_model_dir:
            raise ConfigError("embedder_model_dir names one model, and embedder=cascade runs two: leave it unset, or "
                              "set embedder to the one backend it is for", param="embedder_model_dir")
        if settings.cascade_fast == settings.cascade_precise:
            raise ConfigError(f"cascade_fast and cascade_precise are both {settings.cascade_fast!r}: a cascade "
                              "needs two different embedders", param="cascade_precise")
        return settings.cascade_fast, settings.cascade_precise
    return (settings.embedder,)


def build_searcher(settings: Settings) -> Searcher | None:
    """The configured embedders, each with its descriptor index under ``<data_dir>/index/<backend>``."""
    tiers = []
    for name in embedder_tiers(settings):
        embedder = Embedder(make_backend(name, **embedder_options(settings)), max_batch=settings.embed_max_batch,
                            max_wait_ms=settings.embed_max_wait_ms, cache_size=settings.embed_cache_size,
                            nice=settings.embed_nice)
        tiers.append(Tier(name, embedder, DescriptorIndex(
            embedder, settings.data_dir / "index" / name, embedder.identity, exact_max=settings.index_exact_max,
            aggregate=settings.index_aggregate)))
    if not tiers:
        return None
    if len(tiers) == 1:
        return IndexSearcher(tiers[0])
    return CascadeSearcher(tiers[0], tiers[1], Escalation(settings.cascade_margin, settings.cascade_floor,
                                                       settings.cascade_floor_gap))


def build_router(settings: Settings, learner: AutoLearner | None = None) -> Router:
    """The router with its searcher and compositional detector (unless embedder=none), and the learned auto
    reading ``learner``'s statistics."""
    config = router_config(settings)
    default = parse_policy(settings.default_policy, source="default")
    auto = None if learner is None else AutoPolicy(learner.config, lambda: learner.stats, min_score=config.min_score)
    searcher = build_searcher(settings)
    # detection reads the first tier's scores (a cascade's fast one), so its model is that embedder's
    detector = (make_detector(settings.compositional_detector, searcher.tiers[0].name, settings.index_aggregate)
                if searcher else None)
    return Router(default, config, searcher=searcher, detector=detector, auto=auto)


def build_services(settings: Settings, http: httpx.AsyncClient, upstream: aiohttp.ClientSession) -> Services:
    """Every service, wired once. ``http`` carries the pool's admin calls, probes and scrapes; ``upstream``
    the proxied requests (aiohttp: a third of httpx's CPU per request on this path)."""
    metrics = GatewayMetrics()
    registry_db, outcomes_db = open_databases(
        settings.data_dir, settings.database_url.get_secret_value() if settings.database_url else None,
        PostgresOptions(pool_size=settings.database_pool_size, connect_timeout_s=settings.connect_timeout_s))
    registry = AdapterRegistry.open(settings.data_dir, RegistryLimits(
        base_models=settings.base_models, max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes, import_roots=tuple(settings.import_roots),
        base_shapes=BaseModelShapes.read(settings.base_model_config) if settings.base_model_config else None),
        # grace 0: the registry collects under its exclusive lock, which every registration in flight on any
        # replica holds shared, so an unreferenced object is an orphan (check_config: a bucket needs PostgreSQL)
        database=registry_db, store=open_store(settings.data_dir, settings, grace_s=0.0))
    metrics.registered_adapters.set_function(lambda: len(registry.snapshot()))
    adapter_dirs = adapter_dir_lookup(registry.snapshot, settings.data_dir / "merges")
    pool = WorkerPool(settings.workers, VLLMAdminClient(http, settings.load_timeout_s), metrics,
                      pool_config(settings), adoptable=adapter_dirs)
    metrics.watch_pool(pool.views)
    discovery = None
    if settings.workers_dns:
        discovery = WorkerDiscovery(settings.workers_dns, pool, interval_s=settings.workers_dns_interval_s)
        metrics.watch_discovery(lambda: discovery.snapshot)
    metrics.watch_worker_restarts(RestartCounts.in_data_dir(settings.data_dir).read)  # written by `loragate up`
    delivery_token = settings.delivery_token.get_secret_value() if settings.delivery_token else None
    adapter_files = AdapterFiles(delivery_token, adapter_dirs, store=registry.store)
    auto = auto_config(settings, router_config(settings))
    learner = None if auto is None else AutoLearner(auto, retention_s=settings.outcomes_retention_days * 86400)
    router = build_router(settings, learner)
    searcher = router.searcher
    merges = MergeCache(settings.data_dir / "merges", max_bytes=settings.merge_cache_bytes,
                        remote=registry.store.merges() if isinstance(registry.store, S3Store) else None,
                        locks=registry_db if isinstance(registry_db, PostgresDatabase) else None)
    metrics.watch_components(searcher.stats if searcher is not None else None, merges.stats)
    outcomes = OutcomeLog(outcomes_db, retention_days=settings.outcomes_retention_days,
                          interval_s=settings.outcomes_flush_interval_s)
    if learner is not None:
        outcomes.observe(learner.observe)
        metrics.watch_auto(learner.views)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    recorder = OutcomeRecorder(metrics, outcomes)
    gate = RoutingGate(settings.route_max_concurrency, shared_limit=settings.route_shared_concurrency,
                       yield_lag_s=settings.route_yield_lag_ms / 1000)
    metrics.route_waiting.set_function(lambda: gate.waiting)
    dispatcher = Dispatcher(pool, upstream, attempts=settings.upstream_attempts, retried=metrics.request_retried)
    completions = CompletionService(
        model=settings.model, registry=registry, router=router, recorder=recorder, dispatcher=dispatcher,
        calls=CallParser(settings.model, registry, router.check, unknown_ttl_s=settings.registry_poll_s),
        resolver=Resolver(registry, merges, default_method=settings.average_method, max_rank=settings.max_lora_rank),
        gate=gate)
    shadows = ShadowScheduler(ShadowConfig(settings.shadow_policy, settings.shadow_rate,
                                           settings.shadow_max_concurrency, settings.shadow_max_pending,
                                           settings.shadow_max_wait_s), completions.run, dispatcher.in_flight, metrics,
                              explore=learner.exploration if learner is not None else None)
    recorder.subscribe(shadows.on_event)
    metrics.shadow_pending.set_function(lambda: shadows.pending)
    return Services(
        settings=settings, registry=registry, pool=pool, metrics=metrics, searcher=searcher,
        outcomes=outcomes,
        completions=completions,
        shadows=shadows,
        admin=AdminService(registry, pool, settings.max_adapter_bytes, searcher,
                           sources=AdapterSources(functools.partial(client_from, settings))),
        auth=AdminAuth(token, settings.allow_unauthenticated_admin),
        adapter_files=adapter_files,
        discovery=discovery,
        auto=learner,
    )


async def follow_registry(services: Services) -> None:
    """Pick up adapters that another gateway process or replica registered, patched or removed."""
    async def reindex() -> None:
        if services.searcher is not None:
            await services.searcher.sync(services.registry.snapshot())

    await services.registry.follow(reindex, poll_s=services.settings.registry_poll_s,
                                   resync_s=services.settings.registry_resync_s)


def app_from_env() -> FastAPI:
    """The app factory of each process when ``processes`` > 1 (settings come from LORAGATE_* variables)."""
    return create_app(load_settings())


def error_response(error: LoragateError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The pooled client for proxied requests: no total deadline (streams run long), a connect
    timeout, and a read timeout between bytes."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                    sock_read=settings.request_timeout_s)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=settings.max_connections),
                                 raise_for_status=False)


@contextmanager
def gil_switch_interval(ms: float) -> Iterator[None]:
    """CPython's switch interval set to ``ms`` while the gateway runs (``gil_switch_interval_ms``, 1 ms; Python's
    default is 5 ms), then restored.

    The event loop holds the GIL whenever it serves requests, and a thread that wants the GIL waits up to
    the interval before the loop is made to hand it over. The embedder's worker thread needs it a few times
    per prompt (around the tokenizer and ONNX Runtime calls, which release it): with a busy Python thread
    beside it, one ~2 ms MiniLM prompt took ~16 ms at 5 ms and ~5 ms at 1 ms, and less CPU (3.9 -> 2.8 ms).
    The loop gives the GIL up only when a thread asks for it, so pinned traffic alone pays nothing.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(ms / 1000)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def freeze_startup_heap() -> None:
    """Move everything allocated at startup into the garbage collector's permanent generation.

    Loading the embedding model leaves ~500k long-lived objects (torch, transformers, the tokenizer):
    a full collection then took ~200 ms here, a pause for every request in flight whenever enough
    request objects had survived to trigger one. Those startup objects live as long as the process,
    so leaving them out of collection loses nothing, and a full collection after this one costs well
    under a millisecond. Reference counting still frees frozen objects that are dropped.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings) -> FastAPI:
    """A gateway app; services exist between startup and shutdown (``app.state.services``).

    Raises :class:`ConfigError` for a configuration mistake (:func:`check_config`)."""
    from loragate.server.routes import admin, files, openai, ops

    check_config(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as http, upstream_session(settings) as upstream:
            with config_errors():
                services = build_services(settings, http, upstream)
            app.state.services = services
            if services.searcher is not None:
                await services.searcher.sync(services.registry.snapshot())
            if services.auto is not None:  # the statistics as the outcome log left them: a restart loses nothing
                await services.auto.rebuild(services.outcomes)
            services.outcomes.start()
            if services.discovery is not None:  # first: the first probe round then sees the discovered workers
                await services.discovery.start()
            await services.pool.start()  # health probes and /metrics scrapes of the workers
            poller = asyncio.get_running_loop().create_task(follow_registry(services), name="registry-follower")
            refresher = None
            if services.auto is not None and (settings.processes > 1 or settings.database_url):
                refresher = asyncio.get_running_loop().create_task(
                    services.auto.follow(services.outcomes, settings.auto_refresh_s), name="auto-refresh")
            freeze_startup_heap()
            try:
                with gil_switch_interval(settings.gil_switch_interval_ms):
                    yield
            finally:
                gc.unfreeze()  # an app built again in this process (tests) starts from a collectable heap
                poller.cancel()
                if refresher is not None:
                    refresher.cancel()
                if services.discovery is not None:
                    await services.discovery.stop()
                await services.pool.stop()
                await services.shadows.close()  # running shadows finish and are recorded
                await services.outcomes.close()  # drains the queue: nothing recorded is lost
                await services.completions.gate.close()
                if services.searcher is not None:
                    await services.searcher.close()
                services.registry.close()

    app = FastAPI(title="loragate", version=__version__, lifespan=lifespan)

    @app.exception_handler(LoragateError)
    async def _loragate_error(request: Request, exc: LoragateError) -> JSONResponse:
        response = error_response(exc)
        request_id = getattr(request.state, "request_id", None)
        if request_id is not None:  # errors of completions carry the id too (outcome log, feedback)
            response.headers["x-request-id"] = request_id
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(InvalidRequest(f"{where}: {first.get('msg', 'invalid request')}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = InvalidRequest if exc.status_code < 500 else LoragateError  # e.g. a malformed multipart body: 400
        return error_response(kind(str(exc.detail), status=exc.status_code, code=f"http_{exc.status_code}"))

    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(files.router)
    return app
