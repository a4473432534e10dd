"""Registration over HTTP: idempotent retries, what workers cannot load, bad paths, messages in the
client's terms. Real SQLite, real files, the real app (workers point at a closed port)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from fastapi.testclient import TestClient

from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora

AUTH = {"authorization": "Bearer t0ken"}
BASE_CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4}


@pytest.fixture
def imports(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    write_lora(root / "alpha", hidden=256, seed=1)
    return root


@pytest.fixture
def client(tmp_path: Path, imports: Path) -> Iterator[TestClient]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(BASE_CONFIG))
    settings = Settings(data_dir=tmp_path / "data", workers=[f"http://127.0.0.1:{free_port()}"],  # type: ignore[call-arg]
                        import_roots=[imports], embedder="none", admin_token="t0ken", base_model_config=model,
                        max_adapter_bytes=5 << 20)
    with TestClient(create_app(settings)) as c:
        yield c


def _error(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


def _upload(client: TestClient, name: str, directory: Path, **data: str) -> object:
    files = [("files", (f.name, f.read_bytes())) for f in sorted(directory.iterdir())]
    return client.post("/admin/adapters", headers=AUTH, data={"name": name, **data}, files=files)


def test_a_retried_registration_answers_200_with_the_existing_record(client: TestClient, imports: Path) -> None:
    body = {"name": "alpha", "path": str(imports / "alpha"), "description": "d", "examples": ["q?"]}
    first = client.post("/admin/adapters", headers=AUTH, json=body)
    assert first.status_code == 201, first.text
    again = client.post("/admin/adapters", headers=AUTH, json=body)
    assert again.status_code == 200 and again.json() == first.json()
    uploaded = _upload(client, "alpha", imports / "alpha", description="d", examples='["q?"]')
    assert uploaded.status_code == 200 and uploaded.json() == first.json()  # type: ignore[attr-defined]
    error = _error(client.post("/admin/adapters", headers=AUTH, json={**body, "description": "other"}), 409)
    assert error["code"] == "adapter_exists" and "a different description" in str(error["message"])
    write_lora(imports / "beta", hidden=256, seed=2)
    error = _error(client.post("/admin/adapters", headers=AUTH, json={**body, "path": str(imports / "beta")}), 409)
    assert "different files" in str(error["message"])
    assert [a["name"] for a in client.get("/admin/adapters", headers=AUTH).json()["data"]] == ["alpha"]


@pytest.mark.parametrize(("lora", "code", "fragment"), [
    ({"hidden": 512}, "base_shape_mismatch", "LoRA maps 512 -> 512 features, the base model's q_proj maps 256 -> 256"),
    ({"hidden": 256, "config_overrides": {"modules_to_save": ["lm_head"]}}, "unsupported_adapter",
     "modules_to_save ['lm_head']"),
])
def test_adapters_the_workers_cannot_load_are_422_naming_why(client: TestClient, imports: Path, lora: dict[str, object],
                                                             code: str, fragment: str) -> None:
    write_lora(imports / "bad", **lora)  # type: ignore[arg-type]
    for response in (client.post("/admin/adapters", headers=AUTH, json={"name": "bad", "path": str(imports / "bad")}),
                     _upload(client, "bad", imports / "bad")):
        error = _error(response, 422)
        assert error["code"] == code and fragment in str(error["message"]), error
    assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize(("path", "fragment"), [("a\u0000b", "NUL byte"), ("x" * 5000, "File name too long")])
def test_paths_the_os_refuses_are_400_on_path(client: TestClient, imports: Path, path: str, fragment: str) -> None:
    error = _error(client.post("/admin/adapters", headers=AUTH, json={"name": "p", "path": str(imports / path)}), 400)
    assert error["param"] == "path" and error["code"] == "invalid_path" and fragment in str(error["message"])


def test_messages_name_the_users_path_or_upload_never_the_staging_dir(client: TestClient, imports: Path,
                                                                      tmp_path: Path) -> None:
    (imports / "empty").mkdir()
    error = _error(client.post("/admin/adapters", headers=AUTH, json={"name": "e", "path": str(imports / "empty")}),
                   422)
    assert error["message"] == f"adapter_config.json is missing in {imports / 'empty'}"
    (imports / "half").mkdir()
    (imports / "half" / "adapter_config.json").write_text((imports / "alpha" / "adapter_config.json").read_text())
    error = _error(_upload(client, "h", imports / "half"), 422)
    assert error["message"] == "adapter_model.safetensors is missing in the upload (adapter_config.json)"
    error = _error(client.post("/admin/adapters", headers=AUTH,
                               json={"name": "o", "path": str(imports / ".." / "elsewhere")}), 403)
    assert "is outside the import roots" in str(error["message"])
    assert not list((tmp_path / "data" / "adapters" / "tmp").iterdir())


def test_limits_and_a_form_without_files(client: TestClient) -> None:
    assert client.get("/admin/limits", headers=AUTH).json() == {"max_adapter_bytes": 5 << 20, "max_lora_rank": 16}
    assert client.get("/admin/limits").status_code == 401
    error = _error(client.post("/admin/adapters", headers=AUTH, data={"name": "x"}), 400)
    assert "a form without files" in str(error["message"])


def test_uploaded_chunks_are_written_off_the_event_loop(client: TestClient, imports: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload of up to max_adapter_bytes (2 GiB by default) is written in threads, never on the loop."""
    from loragate.server import admin

    threads: list[tuple[int, bool]] = []
    write = admin._write

    def recording(out: BinaryIO, chunk: bytes) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        threads.append((threading.get_ident(), on_loop))
        write(out, chunk)

    monkeypatch.setattr(admin, "_write", recording)
    response = _upload(client, "alpha", imports / "alpha")
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    assert len(threads) >= 2 and not any(on_loop for _, on_loop in threads)  # one chunk per file at least
