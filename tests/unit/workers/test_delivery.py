"""Adapter delivery without a shared disk: the gateway's file index and the worker's resolver fetcher."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import httpx
import pytest

from loragate.adapters.objectstore import S3Location, S3Store
from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.errors import Forbidden, NotFound, Unauthorized
from loragate.workers import resolver_plugin
from loragate.workers.delivery import AdapterFiles
from loragate.workers.resolver_plugin import (
    AdapterRefused,
    GatewayAdapterFetcher,
    ResolverSettings,
    make_resolver,
    register,
)
from tests import s3
from tests.lora_files import write_lora

TOKEN = "delivery-token"


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    return {"alpha": write_lora(tmp_path / "src" / "alpha", seed=1), "beta": write_lora(tmp_path / "src" / "beta",
                                                                                        seed=2)}


def files_for(adapters: dict[str, Path]) -> AdapterFiles:
    return AdapterFiles(TOKEN, adapters.get)


def transport(files: AdapterFiles, tamper: bool = False) -> httpx.MockTransport:
    """The proposed gateway route, as a MockTransport over :class:`AdapterFiles`."""

    def handle(request: httpx.Request) -> httpx.Response:
        try:
            files.authorize(request.headers.get("authorization"))
            parts = request.url.path.split("/")
            if parts[2] == "by-name":
                manifest = asyncio.run(files.manifest(parts[3]))
                return httpx.Response(200, json=manifest.as_json())
            content = files.file(parts[2], parts[3]).read_bytes()
            if tamper and parts[3].endswith(".safetensors"):
                content = content[:-1] + bytes([content[-1] ^ 1])  # same size, one bit flipped
            return httpx.Response(200, content=content)
        except (NotFound, Unauthorized, Forbidden) as exc:
            return httpx.Response(exc.status, json=exc.body())

    return httpx.MockTransport(handle)


def fetcher(tmp_path: Path, files: AdapterFiles, token: str | None = TOKEN, tamper: bool = False
            ) -> GatewayAdapterFetcher:
    settings = ResolverSettings(urls=("http://gateway",), token=token, cache_dir=tmp_path / "cache")
    return GatewayAdapterFetcher(settings, transport=transport(files, tamper))


# -- gateway side -------------------------------------------------------------------------------------
async def test_manifest_is_the_store_content_hash(adapters: dict[str, Path]) -> None:
    files = files_for(adapters)
    manifest = await files.manifest("alpha")
    assert manifest.sha256 == AdapterStore.content_hash(adapters["alpha"])[0]
    assert [n for n, _ in manifest.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert files.file(manifest.sha256, "adapter_config.json") == adapters["alpha"] / "adapter_config.json"


async def test_files_are_only_known_names_under_known_hashes(adapters: dict[str, Path]) -> None:
    files = files_for(adapters)
    with pytest.raises(NotFound):
        await files.manifest("nope")
    sha = (await files.manifest("alpha")).sha256
    for bad_sha, bad_name in ((sha, "../../etc/passwd"), (sha, "secrets.txt"), ("0" * 64, "adapter_config.json"),
                              ("../" + sha, "adapter_config.json")):
        with pytest.raises(NotFound):
            files.file(bad_sha, bad_name)


def test_file_routes_need_the_token() -> None:
    files = AdapterFiles(TOKEN, {}.get)
    files.authorize(f"Bearer {TOKEN}")
    for header in (None, "Bearer wrong", f"Basic {TOKEN}"):
        with pytest.raises(Unauthorized):
            files.authorize(header)
    with pytest.raises(Forbidden):
        AdapterFiles(None, {}.get).authorize(f"Bearer {TOKEN}")


def test_store_entries_resolve_by_hash_without_a_manifest(tmp_path: Path, adapters: dict[str, Path]) -> None:
    sha, _ = AdapterStore.content_hash(adapters["beta"])
    entry = tmp_path / "store" / sha
    entry.parent.mkdir()
    adapters["beta"].rename(entry)
    assert AdapterFiles(TOKEN, {}.get, store_root=tmp_path / "store").file(sha, "adapter_config.json").is_file()


# -- worker side --------------------------------------------------------------------------------------
async def test_fetch_verifies_and_caches_by_hash(tmp_path: Path, adapters: dict[str, Path]) -> None:
    files = files_for(adapters)
    path = await fetcher(tmp_path, files).fetch("alpha")
    assert path is not None and path.name == AdapterStore.content_hash(adapters["alpha"])[0]
    assert (path / "adapter_model.safetensors").read_bytes() == (adapters["alpha"] /
                                                                 "adapter_model.safetensors").read_bytes()
    assert await fetcher(tmp_path, files).fetch("alpha") == path  # cache hit
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no staging leftovers


async def test_a_tampered_file_is_refused_and_not_cached(tmp_path: Path, adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterRefused, match="hash"):
        await fetcher(tmp_path, files_for(adapters), tamper=True).fetch("alpha")
    assert list((tmp_path / "cache").iterdir()) == []


async def test_unknown_or_unsafe_names_resolve_to_none(tmp_path: Path, adapters: dict[str, Path]) -> None:
    fetch = fetcher(tmp_path, files_for(adapters))
    assert await fetch.fetch("nope") is None
    assert await fetch.fetch("../admin") is None


async def test_wrong_token_is_an_http_error(tmp_path: Path, adapters: dict[str, Path]) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        await fetcher(tmp_path, files_for(adapters), token="wrong").fetch("alpha")


def test_settings_from_env_activate_only_with_a_url(tmp_path: Path) -> None:
    assert ResolverSettings.from_env({}) is None
    settings = ResolverSettings.from_env({"LORAGATE_RESOLVER_URL": "http://g:8000/", "LORAGATE_RESOLVER_TOKEN": "t",
                                          "LORAGATE_RESOLVER_CACHE": str(tmp_path)})
    assert settings == ResolverSettings(("http://g:8000",), "t", tmp_path)
    several = ResolverSettings.from_env({"LORAGATE_RESOLVER_URL": "http://a:8000/, http://b:8000"})
    assert several is not None and several.urls == ("http://a:8000", "http://b:8000")


async def test_a_replica_that_is_down_or_does_not_know_the_adapter_yet_is_skipped(
        tmp_path: Path, adapters: dict[str, Path]) -> None:
    """Several gateway URLs: the first refuses connections, the second has not seen the registration (404),
    the third serves it. An adapter no reachable replica knows is None (vLLM answers 404 for the model); while
    one could not be asked, the failure is raised (the resolver logs it and vLLM answers 404 too)."""
    serving = transport(files_for(adapters))

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "behind":
            return httpx.Response(404, json={"error": {"message": "not registered"}})
        return serving.handle_request(request)

    settings = ResolverSettings(urls=("http://down", "http://behind", "http://up"), token=TOKEN,
                                cache_dir=tmp_path / "cache")
    fetched = await GatewayAdapterFetcher(settings, transport=httpx.MockTransport(handle)).fetch("alpha")
    assert fetched is not None and fetched.name == AdapterStore.content_hash(adapters["alpha"])[0]
    reachable = ResolverSettings(urls=("http://behind", "http://up"), token=TOKEN, cache_dir=tmp_path / "cache")
    assert await GatewayAdapterFetcher(reachable, transport=httpx.MockTransport(handle)).fetch("nope") is None
    only_down = ResolverSettings(urls=("http://down",), token=TOKEN, cache_dir=tmp_path / "cache")
    with pytest.raises(httpx.ConnectError):
        await GatewayAdapterFetcher(only_down, transport=httpx.MockTransport(handle)).fetch("alpha")


async def test_vllm_resolver_returns_a_lora_request_or_none(tmp_path: Path, adapters: dict[str, Path]) -> None:
    resolver = make_resolver(fetcher(tmp_path, files_for(adapters)))
    request = await resolver.resolve_lora("/models/tiny", "beta")
    assert request.lora_name == "beta" and request.lora_path.endswith(AdapterStore.content_hash(adapters["beta"])[0])
    assert await resolver.resolve_lora("/models/tiny", "nope") is None
    refusing = make_resolver(fetcher(tmp_path / "other", files_for(adapters), tamper=True))
    assert await refusing.resolve_lora("/models/tiny", "beta") is None


def test_register_is_a_no_op_without_env_and_registers_with_it(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    registered: dict[str, object] = {}
    fake = types.SimpleNamespace(register_resolver=lambda name, resolver: registered.__setitem__(name, resolver))
    monkeypatch.setattr(resolver_plugin, "_registry", lambda: fake)
    monkeypatch.delenv("LORAGATE_RESOLVER_URL", raising=False)
    register()
    assert registered == {}
    monkeypatch.setenv("LORAGATE_RESOLVER_URL", "http://gateway")
    monkeypatch.setenv("LORAGATE_RESOLVER_CACHE", str(tmp_path))
    register()
    assert list(registered) == ["loragate"]
    assert type(registered["loragate"]).__name__ == "LoragateResolver"


s3_server = s3.s3_server  # the session's S3-protocol server (tests/s3.py) as a fixture of this module


async def test_a_replica_without_the_files_materializes_them_from_the_object_store(
        tmp_path: Path, adapters: dict[str, Path], s3_server: s3.S3Server) -> None:
    """Another replica registered the adapter: this one downloads it (verified) for the manifest, and a
    file request that reaches a replica which never served the manifest still finds the files."""
    bucket = s3_server.new_bucket()

    def replica(name: str) -> S3Store:
        return S3Store(tmp_path / name / "adapters", s3_server.client(), S3Location(bucket), cache_bytes=10**9)

    writer = replica("writer")
    staged = writer.stage_copy([adapters["alpha"] / n for n in ADAPTER_FILES])
    sha, _ = AdapterStore.content_hash(staged)
    writer.commit(staged, sha)
    reader = replica("reader")
    files = AdapterFiles(TOKEN, {"alpha": reader.path_for(sha)}.get, store=reader)
    manifest = await files.manifest("alpha")
    assert manifest.sha256 == sha and reader.downloads == 1 and reader.path_for(sha).is_dir()
    other = replica("other")
    path = await AdapterFiles(TOKEN, {}.get, store=other).fetch(sha, "adapter_model.safetensors")
    assert path == other.path_for(sha) / "adapter_model.safetensors"
    assert path.read_bytes() == (adapters["alpha"] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(NotFound):  # not in the bucket: a 404 for the worker, not the store's 502
        await AdapterFiles(TOKEN, {}.get, store=other).fetch("f" * 64, "adapter_config.json")
    with pytest.raises(NotFound):  # the local store: nothing to download, the same 404
        await AdapterFiles(TOKEN, {}.get, store=AdapterStore(tmp_path / "local")).fetch(sha, "adapter_config.json")
