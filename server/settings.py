"""Gateway configuration: pydantic-settings from ``LORAGATE_*`` env vars and an optional TOML file.

Precedence: explicit overrides (CLI) > environment > config file (``LORAGATE_CONFIG`` or
``--config``) > defaults. Every field's description doubles as its ``--help`` text, so the CLI and
the README never drift from the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from loragate.errors import ConfigError
from loragate.router.auto import DEFAULT_ARMS

CONFIG_ENV = "LORAGATE_CONFIG"


class Settings(BaseSettings):
    """Every option of the gateway (env ``LORAGATE_<NAME>``, TOML key ``<name>``)."""

    model_config = SettingsConfigDict(env_prefix="LORAGATE_", extra="forbid", frozen=True)

    data_dir: Path = Field(Path("./data"), description="Directory for the registry database and adapter store.")
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    processes: int = Field(1, ge=1, le=64, description="Gateway server processes sharing the port (and data dir).")
    registry_poll_s: float = Field(
        1.0, gt=0, le=60, description="SQLite: how often a gateway picks up adapters registered by another process "
                                   "(PostgreSQL notifies instead).")
    # -- fleet state (unset: SQLite + the local store in data_dir, the embedded default) -----------------
    database_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:port/db: the registry and outcome log live in PostgreSQL, "
                          "shared by every replica (unset: SQLite files in data_dir).")
    database_pool_size: int = Field(4, ge=1, le=64, description="PostgreSQL connections per gateway process.")
    registry_resync_s: float = Field(
        30.0, gt=0, le=3600, description="With PostgreSQL: a full re-read of the registry this often, the backstop for "
                                         "change notifications missed while disconnected.")
    store_url: str | None = Field(
        None, description="s3://bucket/prefix: adapter files and merges live in an S3-compatible object store "
                          "(unset: data_dir/adapters and data_dir/merges).")
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of the S3-compatible store (MinIO, Ceph, ...); unset: AWS_ENDPOINT_URL or AWS.")
    s3_region: str | None = Field(
        None, description="Region of the object store; unset: AWS_REGION / AWS_DEFAULT_REGION.")
    s3_access_key_id: SecretStr | None = Field(
        None, description="Access key of the object store; unset: the usual AWS credential chain (env, files, role).")
    s3_secret_access_key: SecretStr | None = Field(None, description="Secret key that goes with s3_access_key_id.")
    store_cache_bytes: int = Field(
        8 << 30, gt=0, description="With store_url: bytes of object-store files each replica keeps on local disk "
                                   "(LRU).")
    workers_dns: str | None = Field(
        None, description="name:port of a DNS name that resolves to every worker (a Kubernetes headless Service), "
                          "re-resolved every workers_dns_interval_s; used besides the workers list (which is then "
                          "empty unless set).")
    workers_dns_interval_s: float = Field(5.0, gt=0, le=3600, description="How often workers_dns is re-resolved.")
    model: str = Field("tiny-llama", description="Base model name the workers serve (their --served-model-name).")
    model_aliases: list[str] = Field(
        default_factory=list,
        description="Other base_model_name_or_path values accepted at registration (e.g. an HF id or path).",
    )
    workers: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8100"],
                               description="vLLM worker base URLs (JSON list in env).")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin; unset disables admin.")
    allow_unauthenticated_admin: bool = Field(
        False, description="Allow /admin without a token (local use only; `loragate up` sets it on loopback).")
    import_roots: list[Path] = Field(default_factory=list,
                                     description="Directories server-side adapter paths must lie in.")
    max_adapter_bytes: int = Field(2 << 30, gt=0, description="Largest adapter (all files) accepted, in bytes.")
    max_lora_rank: int = Field(16, gt=0, description="The workers' --max-lora-rank; higher ranks are refused.")
    base_model_config: Path | None = Field(
        None, description="The base model's dir (or its config.json): registration refuses adapters whose layers "
                          "or projection sizes do not fit it (`loragate up` sets it to --model).")
    default_policy: str = Field("base", description="Policy used for `auto` and when a request names none.")
    request_timeout_s: float = Field(300.0, gt=0, description="Upstream read timeout per request.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Upstream connect timeout.")
    load_timeout_s: float = Field(120.0, gt=0, description="Timeout of one adapter load on a worker.")
    max_connections: int = Field(512, gt=0, description="Pooled upstream connections (all workers).")
    # -- workers ----------------------------------------------------------------------------------
    scheduling: str = Field("affinity", description="Worker scheduling: affinity | least-loaded | round-robin.")
    scheduling_weights: dict[str, float] = Field(
        default_factory=dict, description="Scorer weights overriding the scheduling profile's (JSON object in env), "
                                          "e.g. {\"load\": 2}: lora-affinity | eviction-cost | load | "
                                          "session-affinity; 0 drops one.")
    worker_max_loras: int = Field(
        4, gt=0, description="Default per-worker cap on loaded adapters (a worker URL may end in #max_loras=N).")
    probe_interval_s: float = Field(0.5, gt=0, le=60, description="Seconds between worker health probes.")
    probe_timeout_s: float = Field(1.0, gt=0, le=60, description="Timeout of one health probe.")
    scrape_interval_s: float = Field(1.0, gt=0, le=60, description="Seconds between scrapes of workers' /metrics.")
    worker_start_timeout_s: float = Field(
        600.0, gt=0, description="`loragate up`: seconds a local worker may take to become ready (at start and "
                                 "after a restart).")
    worker_restart_backoff_s: float = Field(
        1.0, gt=0, le=3600, description="`loragate up`: delay before restarting a local worker that exited; doubles "
                                        "with each restart that follows a short run, up to 60x.")
    upstream_attempts: int = Field(
        2, ge=1, le=5, description="Workers tried per request that fails before any response byte.")
    adapter_delivery: str = Field(
        "path", description="path (workers read the gateway's data dir) | resolver (workers fetch files over HTTP "
                            "with loragate's resolver plugin).")
    delivery_token: SecretStr | None = Field(
        None, description="Bearer token of /adapters-files (the workers' LORAGATE_RESOLVER_TOKEN); unset: off.")
    # -- semantic routing -------------------------------------------------------------------------
    embedder: str = Field(
        "cascade", description="Embedding backend for routing: cascade (cascade_fast first, cascade_precise when "
                               "ambiguous) | minilm (ONNX Runtime) | minilm-int8 | minilm-torch (same vectors as "
                               "minilm, 2x slower) | static | static-256 | none (no routing).")
    cascade_fast: str = Field("static-256",
                              description="embedder=cascade: the backend every routed prompt is embedded by.")
    cascade_precise: str = Field(
        "minilm-int8", description="embedder=cascade: the backend that re-ranks a prompt the fast one finds ambiguous.")
    cascade_margin: float = Field(
        0.0, ge=0, le=2, description="embedder=cascade: escalate when the fast tier's two best adapters score closer "
                                      "than this (0 = never).")
    cascade_floor: float = Field(
        0.50, ge=-1, le=1,
        description="embedder=cascade: escalate when the fast tier's best adapter scores below this.")
    cascade_floor_gap: float = Field(
        0.11, ge=0, le=2,
        description="embedder=cascade: cascade_floor applies only when the fast tier's best adapter also scores less "
                    "than this above the mean of the other candidates (an unrelated prompt matches all about "
                    "equally); 2 = always.")
    embedder_model_dir: Path | None = Field(
        None, description="Local model dir for the embedder (default: the packaged MiniLM / shipped static model).")
    embedder_cache_dir: Path | None = Field(
        None, description="Where the minilm backend caches its exported ONNX graph (default: "
                          "$XDG_CACHE_HOME/loragate/embedders, shared by every gateway of this user).")
    embed_threads: int = Field(1, ge=1, le=256, description="CPU threads the embedder's model may use "
                               "(1 keeps routing latency steady when the gateway shares its cores).")
    embed_nice: int = Field(
        0, ge=0, le=19, description="Scheduling niceness of the embedder's worker thread (Linux): above 0, the event "
                                    "loop, which serves pinned requests too, gets the CPU first when both want it.")
    gil_switch_interval_ms: float = Field(
        1.0, gt=0, le=100, description="How long the event loop may keep the GIL from a thread that waits for it "
                                       "(sys.setswitchinterval; Python's default is 5): the embedder's worker "
                                       "thread needs it a few times per prompt.")
    embed_max_batch: int = Field(32, gt=0, description="Largest micro-batch of prompts embedded together.")
    embed_max_wait_ms: float = Field(
        0.0, ge=0, le=100, description="Longest wait to fill a micro-batch (ms). 0: never wait; prompts that arrive "
                                       "while one batch encodes still form the next.")
    embed_cache_size: int = Field(4096, ge=0, description="Prompts whose embeddings are kept (LRU).")
    index_exact_max: int = Field(50_000, gt=0, description="Descriptor vectors searched exactly; HNSW above.")
    index_aggregate: str = Field("centroid", description="Adapter score from its descriptor vectors: centroid (cosine "
                                                         "to their normalised mean) | max | top2mean.")
    route_candidates: int = Field(5, gt=0, le=64, description="Nearest adapters reported per routed request.")
    route_max_concurrency: int = Field(
        4, ge=0, le=4096, description="Routed requests (those that embed) deciding at once; more wait for a slot, "
                                      "requests that do not route never do. 0: no limit.")
    route_shared_concurrency: int = Field(
        1, ge=1, le=4096, description="Routed requests deciding at once while requests that do not route (pin, base) "
                                      "are arriving (at most route_max_concurrency).")
    route_yield_lag_ms: float = Field(
        2.0, ge=0, le=1000, description="While requests that do not route are arriving, routed ones wait to decide "
                                        "while the event loop lags more than this (at most 0.5 s). 0: never.")
    route_max_words: int = Field(
        128, ge=8, le=100_000, description="Routing reads a prompt's last this-many words (a chat's latest turns).")
    select_min_score: float = Field(0.3, ge=-1, le=1, description="Default min_score of select and average.")
    average_k: int = Field(2, ge=1, le=8, description="Default k of average.")
    average_method: str = Field("cat", description="Default merge method of average: linear | cat | svd | ties | "
                                "dare_linear | dare_ties.")
    average_weights: str = Field("softmax", description="Default weighting of average: uniform | score | softmax.")
    average_temperature: float = Field(0.05, gt=0, le=100, description="Default softmax temperature of average.")
    merge_weight_step: float = Field(
        0.05, ge=0, le=0.5, description="Similarity-derived merge weights are rounded to this step (0 = off).")
    merge_cache_bytes: int = Field(4 << 30, gt=0, description="Disk budget of the merged-adapter cache (LRU).")
    outcomes_retention_days: float = Field(30.0, gt=0, description="Outcome records older than this are deleted.")
    outcomes_flush_interval_s: float = Field(0.25, gt=0, le=3600,
                                             description="How often queued outcome records are written.")
    shadow_policy: str | None = Field(None, description="Policy to run as a shadow on sampled requests (unset: off).")
    shadow_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that get a shadow run of shadow_policy.")
    shadow_max_concurrency: int = Field(4, gt=0, description="Shadow runs in flight at most.")
    shadow_max_pending: int = Field(
        256, gt=0, description="Shadows waiting for an idle moment (no client request in flight); more are dropped.")
    shadow_max_wait_s: float = Field(
        30.0, gt=0, description="A shadow that finds no idle moment within this time expires instead of running.")
    # -- the learned auto ---------------------------------------------------------------------------
    auto_arms: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ARMS),
        description="Policies the learned auto chooses between per context, cheapest first (JSON list in env); the "
                    "default_policy is always the first (contexts without data get it). Empty: auto is the "
                    "default_policy.")
    auto_features: list[str] = Field(
        default_factory=lambda: ["nearest", "compositional"],
        description="What a request's context is made of: nearest (adapter) | compositional (flag) | pair (top-2).")
    auto_max_contexts: int = Field(32, ge=1, le=1024, description="Contexts kept; later ones share 'other'.")
    auto_half_life_s: float = Field(
        86_400.0, gt=0, description="Half-life of a graded outcome's weight in auto's statistics (follows drift).")
    auto_margin: float = Field(
        0.05, ge=0, le=1, description="auto serves the cheapest arm whose posterior mean is within this of the mean "
                                      "of the arm with the best lower 95% bound.")
    auto_refresh_s: float = Field(
        30.0, gt=0, le=3600, description="With processes > 1 or database_url: how often each process rebuilds auto's "
                                         "statistics from the shared outcome log (every process's outcomes).")
    auto_shadow_rate: float = Field(
        1.0, ge=0, le=1, description="Share of graded auto requests that get a shadow exploring another arm "
                                     "(Thompson sampling, idle moments only).")
    auto_explore_rate: float = Field(
        0.0, ge=0, le=1, description="Share of auto requests served by a Thompson draw on the client's path (for "
                                     "traffic graded only by later feedback).")
    compositional_detector: str = Field(
        "auto", description="Compositional detection: auto (learned on a static embedder or a cascade, gap on MiniLM) "
                            "| learned | gap (free) | segments | hybrid.")

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (PostgreSQL is the only shared database)")
        return value

    @field_validator("store_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("s3://") or not value[5:].split("/")[0]):
            raise ValueError("must look like s3://bucket or s3://bucket/prefix")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_default_workers_with_dns(cls, data: Any) -> Any:
        """With workers_dns set and workers not, the static list is empty, not the local default: a fleet
        found by DNS must not also send requests to a http://127.0.0.1:8100 nobody configured. Decided
        here, on the raw input, so that child processes (which get every setting, workers included,
        through the environment) see the same list."""
        if isinstance(data, dict) and data.get("workers_dns") and "workers" not in data:
            return {**data, "workers": []}
        return data

    @field_validator("workers_dns")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be name:port, e.g. vllm-workers.default.svc.cluster.local:8000")
        return value

    @field_validator("workers")
    @classmethod
    def _strip_slashes(cls, value: list[str]) -> list[str]:
        return [v.rstrip("/") for v in value]

    @property
    def base_models(self) -> frozenset[str]:
        """Names an adapter's base_model_name_or_path may carry."""
        return frozenset([self.model, *self.model_aliases])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from env + optional TOML file, with explicit overrides on top."""
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        os.environ[CONFIG_ENV] = str(config_file)
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def as_config_error(exc: ValidationError | FileNotFoundError) -> ConfigError:
    """What :func:`load_settings` raised, as the one-line :class:`ConfigError` the CLI prints (every bad setting)."""
    if isinstance(exc, FileNotFoundError):
        return ConfigError(str(exc), param="config")
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']} (got {e['input']!r})"
                         for e in exc.errors())
    return ConfigError(f"invalid settings: {problems}")


def to_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``LORAGATE_*`` variables, so that child processes rebuild exactly these."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, name)
        if raw is None:
            continue
        if isinstance(raw, SecretStr):
            value = raw.get_secret_value()
        env[f"LORAGATE_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def describe_options() -> str:
    """One line per option for ``--help``: env name, default, description."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"LORAGATE_{name.upper()} (default {default!r}): {field.description}")
    return "\n\n".join(lines)
