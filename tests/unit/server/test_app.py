"""The HTTP surface without a worker: auth, error bodies, policy errors, admin round trips.

The worker URL points at a closed port, which doubles as fault injection for "worker unreachable".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def imports(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    write_lora(root / "alpha", seed=1)
    return root


def make_client(tmp_path: Path, imports: Path, **overrides: object) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", workers=[f"http://127.0.0.1:{free_port()}"],
                        import_roots=[imports], embedder="none", **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


@pytest.fixture
def client(tmp_path: Path, imports: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, imports, admin_token=TOKEN) as c:
        yield c


ADMIN_ROUTES = [("POST", "/admin/adapters"), ("GET", "/admin/adapters"), ("GET", "/admin/adapters/alpha"),
                ("PATCH", "/admin/adapters/alpha"), ("DELETE", "/admin/adapters/alpha"), ("GET", "/admin/workers")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                                     {"authorization": f"Basic {TOKEN}"}])
def test_every_admin_route_rejects_missing_or_wrong_token(client: TestClient, method: str, path: str,
                                                          headers: dict[str, str]) -> None:
    response = client.request(method, path, headers=headers, json={"name": "alpha", "path": "/tmp"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_is_disabled_without_a_token(tmp_path: Path, imports: Path, method: str, path: str) -> None:
    with make_client(tmp_path, imports) as c:
        response = c.request(method, path, json={})
    assert response.status_code == 403
    assert "LORAGATE_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_admin_round_trip_path_registration(client: TestClient, imports: Path) -> None:
    created = client.post("/admin/adapters", headers=AUTH, json={
        "name": "alpha", "path": str(imports / "alpha"), "description": "greek", "examples": ["a?"]})
    assert created.status_code == 201, created.text
    assert created.json()["rank"] == 8
    listed = client.get("/admin/adapters", headers=AUTH).json()["data"]
    assert [a["name"] for a in listed] == ["alpha"]
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny-llama", "alpha"]
    patched = client.patch("/admin/adapters/alpha", headers=AUTH, json={"examples": ["b?"]})
    assert patched.json()["examples"] == ["b?"] and patched.json()["description"] == "greek"
    assert client.patch("/admin/adapters/alpha", headers=AUTH, json={"rank": 4}).status_code == 400
    duplicate = client.post("/admin/adapters", headers=AUTH, json={"name": "alpha", "path": str(imports / "alpha")})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "adapter_exists"


def test_upload_registration_and_upload_errors(client: TestClient, imports: Path) -> None:
    src = imports / "alpha"
    files = [("files", (n, (src / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    ok = client.post("/admin/adapters", headers=AUTH, data={"name": "up", "examples": '["x"]'}, files=files)
    assert ok.status_code == 201, ok.text
    assert ok.json()["examples"] == ["x"]
    bad = client.post("/admin/adapters", headers=AUTH, data={"name": "up2"}, files=files[:1])
    assert bad.status_code == 422
    assert "adapter_model.safetensors is missing" in bad.json()["error"]["message"]
    odd = client.post("/admin/adapters", headers=AUTH, data={"name": "up3"},
                      files=[*files, ("files", ("evil.py", b"x"))])
    assert odd.status_code == 400 and "evil.py" in odd.json()["error"]["message"]
    assert [a["name"] for a in client.get("/admin/adapters", headers=AUTH).json()["data"]] == ["up"]


def test_upload_over_the_limit_is_413(tmp_path: Path, imports: Path) -> None:
    with make_client(tmp_path, imports, admin_token=TOKEN, max_adapter_bytes=1000) as c:
        src = imports / "alpha"
        files = [("files", (n, (src / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
        response = c.post("/admin/adapters", headers=AUTH, data={"name": "big"}, files=files)
        assert response.status_code == 413
        assert c.get("/admin/adapters", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize(("body", "headers", "status", "fragment"), [
    (b"{not json", {}, 400, "not valid JSON"),
    (b"[1, 2]", {}, 400, "must be a JSON object"),
    (b'{"prompt": "hi"}', {}, 400, "model is required"),
    (b'{"model": "nope", "prompt": "hi"}', {}, 404, "the model 'nope' does not exist"),
    (b'{"model": "tiny-llama", "prompt": "hi"}', {"x-adapter-policy": "pin;adapter=\"x"}, 400, "RFC 8941"),
    (b'{"model": "tiny-llama", "prompt": "hi"}', {"x-adapter-policy": "magic"}, 400,
     "supported: auto, average, base, chain, pin"),
    (b'{"model": "tiny-llama", "prompt": "hi"}', {"x-adapter-policy": "select"}, 400, "needs semantic routing"),
    (b'{"model": "tiny-llama", "prompt": "hi", "adapter_policy": 3}', {}, 400, "adapter_policy must be a string"),
    (b'{"model": "tiny-llama", "prompt": "hi"}', {"x-adapter-policy": 'pin;adapter="ghost"'}, 404, "'ghost'"),
    (b'{"model": "tiny-llama", "prompt": 5}', {}, 400, "prompt must be"),
])
def test_client_mistakes_are_openai_style_4xx(client: TestClient, body: bytes, headers: dict[str, str], status: int,
                                              fragment: str) -> None:
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json", **headers})
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unreachable_worker_is_an_upstream_error_and_counted(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi"})
    # 502 when the request finds the worker dead; 503 once the health probe has taken it out of rotation
    assert response.status_code in (502, 503)
    assert response.json()["error"]["type"] == "upstream_error"
    metrics = client.get("/metrics").text
    status = response.status_code
    assert f'loragate_requests_total{{policy="base",route="completions",status="{status}"}} 1.0' in metrics


def test_unknown_route_is_openai_style_404(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "http_404"


def test_adapter_file_delivery_for_the_resolver_plugin(tmp_path: Path, imports: Path) -> None:
    with make_client(tmp_path, imports, admin_token=TOKEN, delivery_token="deliver") as c:
        created = c.post("/admin/adapters", headers=AUTH, json={"name": "alpha", "path": str(imports / "alpha")})
        assert created.status_code == 201
        assert c.get("/adapters-files/by-name/alpha").status_code == 401
        assert c.get("/adapters-files/by-name/alpha", headers={"authorization": "Bearer nope"}).status_code == 401
        manifest = c.get("/adapters-files/by-name/alpha", headers={"authorization": "Bearer deliver"}).json()
        assert manifest["sha256"] == created.json()["sha256"]
        served = c.get(f"/adapters-files/{manifest['sha256']}/adapter_model.safetensors",
                       headers={"authorization": "Bearer deliver"})
        assert served.status_code == 200
        assert served.content == (imports / "alpha" / "adapter_model.safetensors").read_bytes()
        sneaky = c.get(f"/adapters-files/{manifest['sha256']}/..%2Fregistry.sqlite3",
                       headers={"authorization": "Bearer deliver"})
        assert sneaky.status_code == 404


def test_adapter_file_delivery_is_off_without_a_token(client: TestClient) -> None:
    response = client.get("/adapters-files/by-name/alpha", headers={"authorization": "Bearer x"})
    assert response.status_code == 403


def test_startup_objects_are_frozen_out_of_garbage_collection(tmp_path: Path, imports: Path) -> None:
    """A full collection while serving skips what startup built, and the heap is collectable again after."""
    import gc

    gc.unfreeze()
    with make_client(tmp_path, imports) as c:
        assert c.get("/health").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the interpreter, FastAPI and the services: all out of the collector's scans
    assert gc.get_freeze_count() == 0
