"""Hostile and ambiguous client input on every route that reads it: always an OpenAI-style 4xx.

JSON nested past Python's recursion limit, NaN, integers too long to convert, headers sent twice,
UTF-8 in headers (which arrive as latin-1); plus readiness, which must fail while no worker can
take a request. The stub upstream (``loadtest/stub.py``) stands in for a healthy worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loragate.errors import InvalidRequest
from loragate.loadtest.stub import StubApp
from loragate.server.app import create_app
from loragate.server.calls import MAX_JSON_DEPTH, parse_json
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving
from tests.unit.server.test_app import AUTH, TOKEN, make_client

DEEP = b'{"model": "tiny-llama", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
JUST_UNDER_RECURSION_LIMIT = b'{"model": "tiny-llama", "prompt": "hi", "x": ' + b"[" * 900 + b"]" * 900 + b"}"
JSON_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"),
               ("POST", "/admin/adapters"), ("PATCH", "/admin/adapters/alpha")]


@pytest.fixture
def imports(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    write_lora(root / "alpha", seed=1)
    return root


@pytest.fixture
def client(tmp_path: Path, imports: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, imports, admin_token=TOKEN) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in str(error["message"]), error
    return error


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
@pytest.mark.parametrize(("body", "fragment"), [
    (DEEP, f"nested more than {MAX_JSON_DEPTH} levels"),
    (JUST_UNDER_RECURSION_LIMIT, f"nested more than {MAX_JSON_DEPTH} levels"),  # parsed, then broke json.dumps
    (b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"model": "tiny-llama", "prompt": "hi", "n": ' + b"9" * 5000 + b"}", "not valid JSON"),  # int digit limit
])
def test_unusable_json_is_a_400_on_every_json_route(client: TestClient, method: str, path: str, body: bytes,
                                                    fragment: str) -> None:
    response = client.request(method, path, content=body, headers={**AUTH, "content-type": "application/json"})
    error = assert_openai_error(response, 400, fragment)
    assert error["code"] == "invalid_json"


def test_deep_examples_in_a_multipart_registration_are_a_400(client: TestClient, imports: Path) -> None:
    files = [("files", (n, (imports / "alpha" / n).read_bytes()))
             for n in ("adapter_config.json", "adapter_model.safetensors")]
    response = client.post("/admin/adapters", headers=AUTH, files=files,
                           data={"name": "deep", "examples": "[" * 100_000 + "]" * 100_000})
    assert assert_openai_error(response, 400, "examples")["param"] == "examples"


def test_ordinary_nesting_is_accepted() -> None:
    tool = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "array"}}}}}
    body = parse_json(b'{"tools": [{"function": {"parameters": %s}}], "prompt": [1, 2, 3]}'
                      % str(tool).replace("'", '"').encode())
    assert body["prompt"] == [1, 2, 3]
    levels = MAX_JSON_DEPTH - 1  # lists inside the top-level object: exactly at the limit
    assert parse_json('{"x": ' + "[" * levels + "]" * levels + "}")["x"]
    with pytest.raises(InvalidRequest, match="nested more than"):
        parse_json('{"x": ' + "[" * (levels + 1) + "]" * (levels + 1) + "}")


@pytest.mark.parametrize("header", ["x-adapter-policy", "x-adapter-policy-shadow", "x-expected-answer"])
def test_a_header_sent_twice_is_a_400(client: TestClient, header: str) -> None:
    response = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi"},
                           headers=[(header, "base"), (header, 'pin;adapter="alpha"')])
    error = assert_openai_error(response, 400, "was sent 2 times; send it once")
    assert str(error["param"]).lower() == header and error["code"] == "duplicate_header"


def test_utf8_in_a_bad_policy_header_is_quoted_as_sent(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi"},
                           headers=[(b"x-adapter-policy", 'pin;adapter="café"'.encode())])
    error = assert_openai_error(response, 400, "café")
    assert "Ã" not in str(error["message"])


def test_latin1_bytes_that_are_not_utf8_still_give_a_400(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi"},
                           headers=[(b"x-adapter-policy", 'pin;adapter="caf\xe9"'.encode("latin-1"))])
    assert_openai_error(response, 400, "café")


def stub_settings(tmp_path: Path, worker: str, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", workers=[worker], embedder="none", port=free_port(),
                    probe_interval_s=0.05, **overrides)  # type: ignore[arg-type]


def test_utf8_expected_answer_is_graded_as_sent(tmp_path: Path) -> None:
    """X-Expected-Answer in UTF-8 (the stub answers "the cat ..."): grading folds accents, so "thé" matches;
    read as latin-1 it was "thÃ©" and failed."""
    with serving(StubApp(), free_port()) as worker, \
            serving(create_app(stub_settings(tmp_path, worker, admin_token=TOKEN)), free_port()) as gateway:
        ids = {}
        for expected in ("the", "thé"):
            response = httpx.post(f"{gateway}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"},
                                  headers=[(b"x-expected-answer", expected.encode())])
            assert response.status_code == 200, response.text
            ids[expected] = response.headers["x-request-id"]
        rows = {r["request_id"]: r for r in httpx.get(f"{gateway}/admin/outcomes", headers=AUTH).json()["data"]}
        assert rows[ids["the"]]["result"] == "success"
        assert rows[ids["thé"]]["result"] == "success" and rows[ids["thé"]]["expected"] == "thé"


def test_ready_is_200_with_a_worker_in_rotation_and_health_stays_live(tmp_path: Path) -> None:
    with serving(StubApp(), free_port()) as worker, \
            serving(create_app(stub_settings(tmp_path, worker)), free_port()) as gateway:
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{gateway}/ready")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # before the first probe round ("not probed yet"), or a probe slowed by a busy machine
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["workers"] == [{"url": worker, "healthy": True}]
        assert httpx.get(f"{gateway}/health").status_code == 200


def test_ready_is_503_naming_why_when_no_worker_is_in_rotation(tmp_path: Path) -> None:
    """The worker URL is a closed port: once its probe fails, /ready says so and /health stays 200."""
    down = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(stub_settings(tmp_path, down))) as c:
        deadline = time.monotonic() + 30
        while "no worker is in rotation" not in (response := c.get("/ready")).text and time.monotonic() < deadline:
            assert response.status_code == 503  # not probed yet, then out of rotation: never ready
            time.sleep(0.05)
        error = assert_openai_error(response, 503, "not ready: no worker is in rotation")
        assert down in str(error["message"]) and error["code"] == "not_ready"
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["workers"] == [{"url": down, "healthy": False}]


def test_a_reused_request_id_keeps_both_records_and_feedback_stays_unambiguous(tmp_path: Path) -> None:
    """Real SQLite behind the real app: the id is echoed for correlation, each answer names its own record."""
    with serving(StubApp(), free_port()) as worker, \
            serving(create_app(stub_settings(tmp_path, worker, admin_token=TOKEN)), free_port()) as gateway:
        answers = [httpx.post(f"{gateway}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"},
                              headers={"x-request-id": "client-7", "x-adapter-policy": policy})
                   for policy in ("base", "auto")]
        assert [a.headers["x-request-id"] for a in answers] == ["client-7", "client-7"]
        outcome_ids = [a.headers["x-outcome-id"] for a in answers]
        assert len(set(outcome_ids)) == 2
        rows = [r for r in httpx.get(f"{gateway}/admin/outcomes", headers=AUTH).json()["data"]
                if r["request_id"] == "client-7"]
        assert sorted(r["outcome_id"] for r in rows) == sorted(outcome_ids)
        ambiguous = httpx.post(f"{gateway}/v1/feedback", json={"request_id": "client-7", "success": True})
        assert_openai_error(ambiguous, 409, outcome_ids[0])
        graded = httpx.post(f"{gateway}/v1/feedback", json={"outcome_id": outcome_ids[1], "success": False})
        assert graded.status_code == 200 and graded.json()["outcome_id"] == outcome_ids[1]
        fresh = httpx.post(f"{gateway}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"})
        assert fresh.headers["x-outcome-id"] == fresh.headers["x-request-id"]  # generated ids are unique already
        assert httpx.post(f"{gateway}/v1/feedback", json={"request_id": fresh.headers["x-request-id"],
                                                          "success": True}).status_code == 200


class RecordingStub:
    """The stub upstream, remembering the completion bodies it received."""

    def __init__(self) -> None:
        self.app = StubApp()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http" and str(scope["path"]).endswith("completions"):
            async def recording() -> dict[str, object]:
                message: dict[str, object] = await receive()  # type: ignore[operator]
                self.bodies.append(bytes(message.get("body", b"")))  # type: ignore[arg-type]
                return message
            await self.app(scope, recording, send)  # type: ignore[arg-type]
        else:
            await self.app(scope, receive, send)  # type: ignore[arg-type]


def test_declared_bodies_still_forward_unknown_fields_untouched(tmp_path: Path) -> None:
    stub = RecordingStub()
    sent = {"model": "tiny-llama", "prompt": "hi", "min_tokens": 1, "ignore_eos": True, "n": 1,
            "vendor_extension": {"nested": [1, 2.5, None, "x"]}, "adapter_policy": "base", "max_tokens": 3}
    with serving(stub, free_port()) as worker, \
            serving(create_app(stub_settings(tmp_path, worker)), free_port()) as gateway:
        assert httpx.post(f"{gateway}/v1/completions", json=sent).status_code == 200
    forwarded = json.loads(stub.bodies[-1])
    assert forwarded == {k: v for k, v in sent.items() if k != "adapter_policy"}  # the policy field is the gateway's


def test_a_malformed_multipart_body_is_the_clients_error(client: TestClient) -> None:
    """Starlette's own 400s (here: a multipart part without a name) used to carry type server_error."""
    body = b'--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n'
    response = client.post("/admin/adapters", content=body,
                           headers={**AUTH, "content-type": "multipart/form-data; boundary=b"})
    error = assert_openai_error(response, 400, "")
    assert error["type"] == "invalid_request_error"
