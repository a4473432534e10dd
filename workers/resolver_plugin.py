"""vLLM LoRA resolver plugin: fetch a registered adapter's files from the gateway, verify, serve.

vLLM calls ``resolve_lora(base_model_name, lora_name)`` on every registered resolver when a
request names an adapter the worker has not loaded (runtime LoRA updating must be on). This
resolver asks the gateway for the adapter's manifest (``/adapters-files/by-name/<name>``),
downloads its files by content hash into a local cache, checks the sha256 exactly as the
gateway's store computes it, and only then hands vLLM the local directory. So workers need no
shared filesystem, only HTTP to the gateway and the delivery token.

Activation: vLLM runs every ``vllm.general_plugins`` entry point in every process it starts;
:func:`register` does nothing unless ``LORAGATE_RESOLVER_URL`` is set, so installing loragate into
a worker's environment changes nothing by itself. Variables:

- ``LORAGATE_RESOLVER_URL``: the gateway's base URL (required to activate), or several replicas'
  URLs separated by commas: tried in order, the next one when a replica cannot be reached, answers
  5xx or does not know the adapter (yet), so a worker keeps resolving while a replica is down;
- ``LORAGATE_RESOLVER_TOKEN``: bearer token of the file routes;
- ``LORAGATE_RESOLVER_CACHE``: cache directory (default ``~/.cache/loragate/adapters``);
- ``LORAGATE_RESOLVER_TIMEOUT``: seconds per HTTP call (default 60).

The fetching logic (:class:`GatewayAdapterFetcher`) does not import vLLM, so it is unit-tested
without an engine; :func:`register` builds the thin ``LoRAResolver`` subclass around it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.adapters.types import NAME_PATTERN
from loragate.workers.delivery import FILES_PREFIX, SHA256

log = logging.getLogger(__name__)

RESOLVER_NAME = "loragate"
ENV_URL = "LORAGATE_RESOLVER_URL"
ENV_TOKEN = "LORAGATE_RESOLVER_TOKEN"
ENV_CACHE = "LORAGATE_RESOLVER_CACHE"
ENV_TIMEOUT = "LORAGATE_RESOLVER_TIMEOUT"
_CHUNK = 1 << 20


class AdapterRefused(Exception):
    """The gateway's files do not match their manifest (size or sha256): never served."""


class _UnknownHere(Exception):
    """One replica answered 404 for the adapter (another may have it already)."""


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """Where to fetch adapters from and where to keep them."""

    urls: tuple[str, ...]
    token: str | None
    cache_dir: Path
    timeout_s: float = 60.0

    @property
    def url(self) -> str:
        return ", ".join(self.urls)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ResolverSettings | None:
        """Settings from the environment, or None (plugin inactive) without ``LORAGATE_RESOLVER_URL``."""
        url = env.get(ENV_URL, "").strip()
        if not url:
            return None
        cache = env.get(ENV_CACHE) or str(Path.home() / ".cache" / "loragate" / "adapters")
        urls = tuple(u.strip().rstrip("/") for u in url.split(",") if u.strip())
        return cls(urls=urls, token=env.get(ENV_TOKEN) or None, cache_dir=Path(cache),
                   timeout_s=float(env.get(ENV_TIMEOUT, "60")))


class GatewayAdapterFetcher:
    """Fetches, verifies and caches adapters by content hash; all blocking work runs in a thread."""

    def __init__(self, settings: ResolverSettings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._transport = transport  # tests inject a MockTransport
        settings.cache_dir.mkdir(parents=True, exist_ok=True)

    async def fetch(self, name: str) -> Path | None:
        """The verified local directory of adapter ``name``; None when the gateway does not know it.

        Raises :class:`AdapterRefused` when the files do not match the manifest.
        """
        return await asyncio.to_thread(self._fetch_sync, name)

    def _client(self, url: str) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.settings.token}"} if self.settings.token else {}
        return httpx.Client(base_url=url, headers=headers, timeout=self.settings.timeout_s,
                            transport=self._transport)

    def _fetch_sync(self, name: str) -> Path | None:
        if not NAME_PATTERN.fullmatch(name):
            return None  # vLLM asks for any unknown `model`: never put an arbitrary one into a URL path
        failure: Exception | None = None
        for url in self.settings.urls:
            try:
                with self._client(url) as client:
                    return self._fetch_from(client, name)
            except httpx.TransportError as exc:
                failure = exc
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code < 500:
                    raise
                failure = exc
            except _UnknownHere:
                continue
            log.warning("loragate resolver: %s failed for %r (%s); trying the next replica", url, name, failure)
        if failure is not None:
            raise failure
        return None

    def _fetch_from(self, client: httpx.Client, name: str) -> Path:
        """From one replica; :class:`_UnknownHere` when it does not know ``name``."""
        response = client.get(f"{FILES_PREFIX}/by-name/{name}")
        if response.status_code == 404:
            raise _UnknownHere(name)
        response.raise_for_status()
        sha256, sizes = _parse_manifest(response.json())
        target = self.settings.cache_dir / sha256
        if all((target / f).is_file() for f in ADAPTER_FILES):
            return target  # only verified downloads are ever renamed into place
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.settings.cache_dir))
        try:
            for filename in ADAPTER_FILES:
                self._download(client, f"{FILES_PREFIX}/{sha256}/{filename}", staging / filename,
                               sizes[filename])
            actual, _ = AdapterStore.content_hash(staging)
            if actual != sha256:
                raise AdapterRefused(f"adapter {name!r}: files hash to {actual}, manifest says {sha256}")
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not a concurrent fetch of the same content: a real error
                    raise
            return target
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _download(client: httpx.Client, url: str, destination: Path, expected_size: int) -> None:
        written = 0
        with client.stream("GET", url) as response:
            response.raise_for_status()
            with destination.open("wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    written += len(chunk)
                    if written > expected_size:
                        raise AdapterRefused(f"{url}: more than the {expected_size} bytes the manifest lists")
                    out.write(chunk)
        if written != expected_size:
            raise AdapterRefused(f"{url}: {written} bytes, the manifest lists {expected_size}")


def _parse_manifest(body: object) -> tuple[str, dict[str, int]]:
    if not isinstance(body, dict):
        raise AdapterRefused("manifest is not a JSON object")
    sha256 = body.get("sha256")
    files = body.get("files")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256) or not isinstance(files, list):
        raise AdapterRefused(f"malformed manifest: {body!r}"[:300])
    sizes = {f.get("name"): f.get("size") for f in files if isinstance(f, dict)}
    if set(sizes) != set(ADAPTER_FILES) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise AdapterRefused(f"manifest must list exactly {list(ADAPTER_FILES)} with sizes: {files!r}"[:300])
    return sha256, {str(k): int(v) for k, v in sizes.items() if v is not None}


def make_resolver(fetcher: GatewayAdapterFetcher) -> Any:
    """A ``vllm.lora.resolver.LoRAResolver`` around ``fetcher``.

    vLLM is imported here, by name, so that this module imports without vLLM (the gateway's
    environment) and mypy does not type-check all of vLLM through it.
    """
    resolver_module = importlib.import_module("vllm.lora.resolver")
    request_module = importlib.import_module("vllm.lora.request")

    class LoragateResolver(resolver_module.LoRAResolver):  # type: ignore[misc, name-defined]
        """Resolves adapter names through the loragate gateway's file routes."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            # base_model_name is the worker's --model value (often a path); the gateway already
            # checked the adapter's base model at registration, so it is not compared here.
            try:
                path = await fetcher.fetch(lora_name)
            except (AdapterRefused, httpx.HTTPError, OSError, ValueError) as exc:
                log.error("loragate resolver refused adapter %r: %s", lora_name, exc)
                return None
            if path is None:
                return None
            return request_module.LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)) or 1,
                                              lora_path=str(path))

    return LoragateResolver()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver when configured by env.

    vLLM may call this in several processes and more than once; registering again under the same
    name replaces the previous instance, which is harmless.
    """
    settings = ResolverSettings.from_env(os.environ)
    if settings is None:
        return
    _registry().register_resolver(RESOLVER_NAME, make_resolver(GatewayAdapterFetcher(settings)))
    log.info("loragate LoRA resolver active: %s -> %s", settings.url, settings.cache_dir)


def _registry() -> Any:
    """vLLM's process-wide resolver registry (imported by name, see :func:`make_resolver`)."""
    return importlib.import_module("vllm.lora.resolver").LoRAResolverRegistry
