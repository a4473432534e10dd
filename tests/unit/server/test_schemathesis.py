"""Schema-driven fuzzing of every published route (schemathesis), against the real app in-process.

The OpenAPI document the gateway publishes is the input: valid and invalid bodies, query and
header values are generated from it (a few per operation and mode, derandomised so the suite is
stable) and sent over real HTTP to the gateway on an in-thread uvicorn, whose worker is the
instant stub upstream. Whatever arrives, the gateway must not fail: no 5xx other than the
documented upstream failures (502/503/504, typed ``upstream_error``), and every error body is
OpenAI-style.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from loragate.loadtest.stub import StubApp
from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving

TOKEN = "fuzz-token"
MODEL = "tiny-llama"
EXAMPLES_PER_OPERATION = 6  # per generation mode: the whole module runs in seconds
UPSTREAM_FAILURES = {502, 503, 504}
COMPLETION_PATHS = {"/v1/completions", "/v1/chat/completions"}


def published_spec() -> dict[str, Any]:
    """The OpenAPI document as the gateway serves it (building the app starts nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=Path(tmp), workers=["http://127.0.0.1:9"], embedder="none"))
        spec: dict[str, Any] = app.openapi()
    return spec


schema = schemathesis.openapi.from_dict(published_spec())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES_PER_OPERATION, deterministic=True, database="none")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    write_lora(root / "imports" / "alpha", seed=1)
    with serving(StubApp(MODEL), free_port()) as worker:
        settings_ = Settings(data_dir=root / "data", workers=[worker], embedder="none", admin_token=TOKEN,
                             import_roots=[root / "imports"], model=MODEL, port=free_port())
        with serving(create_app(settings_), settings_.port) as url:
            yield url


def assert_no_gateway_failure(status: int, body: Any) -> None:
    if status >= 500:
        assert status in UPSTREAM_FAILURES, f"{status}: {body}"
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["type"] == ("upstream_error" if status >= 500 else body["error"]["type"]), body
        assert status >= 500 or body["error"]["type"] != "server_error", body  # a 4xx is the client's error


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_gateway_fail(case: schemathesis.Case, gateway: str) -> None:
    if case.path in COMPLETION_PATHS and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # reach routing and the proxy, not only "model does not exist"
    if case.path == "/admin/adapters" and isinstance(case.body, dict) and isinstance(case.body.get("name"), str):
        case.body["name"] = "fuzzed"  # reach the path and file checks, not only "invalid adapter name"
    response = case.call(base_url=gateway, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    is_json = response.headers.get("content-type", [""])[0].startswith("application/json")
    assert_no_gateway_failure(response.status_code, response.json() if is_json else response.text)
