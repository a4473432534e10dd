"""Registration from a source URL over HTTP (``{"name", "source": "s3://bucket/key/"}``) against a real
S3-protocol server (moto, tests/s3.py): copied into the store and validated exactly like an upload, and
every refusal a 4xx on ``source`` in the user's terms (the URL, never the staging dir)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.s3 import KEY_ID, REGION, SECRET, S3Server

AUTH = {"authorization": "Bearer t0ken"}
MAX_BYTES = 1 << 20

Client = Callable[[S3Server], TestClient]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Client]:
    """A real app (local store, workers on a closed port) whose source reads go to the given S3 endpoint."""
    with_clients: list[TestClient] = []

    def make(server: S3Server) -> TestClient:
        settings = Settings(data_dir=tmp_path / f"data{len(with_clients)}",  # type: ignore[call-arg]
                            workers=[f"http://127.0.0.1:{free_port()}"], embedder="none", admin_token="t0ken",
                            max_adapter_bytes=MAX_BYTES, s3_endpoint_url=server.endpoint, s3_region=REGION,
                            s3_access_key_id=KEY_ID, s3_secret_access_key=SECRET)
        client = TestClient(create_app(settings))
        client.__enter__()
        with_clients.append(client)
        return client

    yield make
    for client in with_clients:
        client.__exit__(None, None, None)


def put_dir(server: S3Server, bucket: str, prefix: str, directory: Path, only: tuple[str, ...] = ADAPTER_FILES) -> str:
    client = server.client()
    for name in only:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(directory / name).read_bytes())
    return f"s3://{bucket}/{prefix}/"


def error(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()["error"]  # type: ignore[attr-defined]
    assert set(body) == {"message", "type", "param", "code"}
    return body  # type: ignore[no-any-return]


def staging_dir(client: TestClient) -> Path:
    store: AdapterStore = client.app.state.services.registry.store  # type: ignore[attr-defined]
    return store.staging


def test_a_source_is_copied_into_the_store_and_registered_like_an_upload(
        gateway: Client, s3_server: S3Server, tmp_path: Path) -> None:
    client = gateway(s3_server)
    bucket = s3_server.new_bucket()
    lora = write_lora(tmp_path / "alpha", seed=1)
    url = put_dir(s3_server, bucket, "loras/alpha", lora)
    body = {"name": "alpha", "source": url, "description": "family facts", "examples": ["who?"]}
    created = client.post("/admin/adapters", headers=AUTH, json=body)
    assert created.status_code == 201, created.text
    record = created.json()
    sha, size = AdapterStore.content_hash(lora)
    assert (record["sha256"], record["size_bytes"], record["rank"]) == (sha, size, 8)
    store: AdapterStore = client.app.state.services.registry.store  # type: ignore[attr-defined]
    assert AdapterStore.content_hash(store.path_for(sha))[0] == sha  # a copy of its own, content-addressed
    assert client.post("/admin/adapters", headers=AUTH, json=body).status_code == 200  # an identical retry
    trailing = {**body, "source": url.rstrip("/")}  # the prefix without its slash names the same files
    assert client.post("/admin/adapters", headers=AUTH, json=trailing).status_code == 200
    assert list(staging_dir(client).iterdir()) == []


def test_what_fails_validation_is_refused_as_for_an_upload(gateway: Client, s3_server: S3Server,
                                                         tmp_path: Path) -> None:
    client = gateway(s3_server)
    bucket = s3_server.new_bucket()
    url = put_dir(s3_server, bucket, "wrong-base", write_lora(tmp_path / "w", base="other-model", seed=2))
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "w", "source": url}), 422)
    assert failure["code"] == "base_model_mismatch" and "other-model" in str(failure["message"])
    ia3 = put_dir(s3_server, bucket, "ia3", write_lora(tmp_path / "b", seed=3, config_overrides={"peft_type": "IA3"}))
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "b", "source": ia3}), 422)
    assert "not a LoRA adapter" in str(failure["message"]) and str(staging_dir(client)) not in str(failure["message"])
    assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []
    assert list(staging_dir(client).iterdir()) == []


def test_bad_schemes_missing_files_and_missing_buckets_are_4xx_on_source(gateway: Client, s3_server: S3Server,
                                                                         tmp_path: Path) -> None:
    client = gateway(s3_server)
    for source in ("https://example.com/alpha/", "/srv/loras/alpha", "gs://bucket/alpha/"):
        failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "a", "source": source}), 400)
        assert failure["param"] == "source" and failure["code"] == "unsupported_source"
        assert "only s3:// URLs are supported for now" in str(failure["message"])
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "a", "source": "s3:///x"}), 400)
    assert failure["code"] == "invalid_source"

    bucket = s3_server.new_bucket()
    url = put_dir(s3_server, bucket, "half", write_lora(tmp_path / "half", seed=4), only=("adapter_config.json",))
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "a", "source": url}), 422)
    assert failure["param"] == "source" and failure["code"] == "source_files_missing"
    assert "has no adapter_model.safetensors" in str(failure["message"]) and "adapter_config.json" not in \
        str(failure["message"]).split("(")[0]
    nothing = f"s3://{bucket}/nothing/"
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "a", "source": nothing}), 422)
    assert "has no adapter_config.json and no adapter_model.safetensors" in str(failure["message"])
    absent = "s3://no-such-bucket-for-sources/x/"
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "a", "source": absent}), 422)
    assert failure["code"] == "source_not_found" and "'no-such-bucket-for-sources' does not exist" in \
        str(failure["message"])
    both = {"name": "a", "source": url, "path": str(tmp_path)}
    assert error(client.post("/admin/adapters", headers=AUTH, json=both), 400)["param"] == "source"
    failure = error(client.post("/admin/adapters", headers=AUTH, data={"name": "a", "source": url},
                                files=[("files", ("adapter_config.json", b"{}"))]), 400)
    assert failure["param"] == "source"


def test_too_large_is_413_before_anything_is_downloaded(gateway: Client, s3_server: S3Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    client = gateway(s3_server)
    bucket = s3_server.new_bucket()
    lora = write_lora(tmp_path / "big", seed=5)
    (lora / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_BYTES + 1))
    url = put_dir(s3_server, bucket, "big", lora)
    from loragate.adapters import sources

    downloads: list[str] = []
    real = sources.AdapterSources._download
    monkeypatch.setattr(sources.AdapterSources, "_download",
                        lambda self, *args: downloads.append(args[2]) or real(self, *args))
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "big", "source": url}), 413)
    assert failure["param"] == "source" and url in str(failure["message"]) and str(MAX_BYTES) in \
        str(failure["message"])
    assert downloads == [] and list(staging_dir(client).iterdir()) == []


def test_access_denied_is_403_naming_the_url(gateway: Client, locked_s3_server: S3Server) -> None:
    client = gateway(locked_s3_server)
    url = "s3://private-loras/alpha/"
    failure = error(client.post("/admin/adapters", headers=AUTH, json={"name": "alpha", "source": url}), 403)
    assert failure["param"] == "source" and failure["code"] == "source_forbidden"
    assert url in str(failure["message"]) and "access denied" in str(failure["message"])
    assert str(staging_dir(client)) not in str(failure["message"])


def test_the_openapi_document_offers_path_or_source(gateway: Client, s3_server: S3Server) -> None:
    spec = gateway(s3_server).get("/openapi.json").json()
    schema = spec["paths"]["/admin/adapters"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"path", "source"} <= set(schema["properties"]) and schema["required"] == ["name"]
    assert [branch["required"] for branch in schema["oneOf"]] == [["path"], ["source"]]
    assert "s3://" in schema["properties"]["source"]["description"]
