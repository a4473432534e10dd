"""A client that disconnects before a whole (non-streamed) answer is ready stops the work behind it.

Through the real app over a real socket, in front of a stub worker that takes 10 s for an answer: the
client gives up after a fraction of a second, and the request ends at once as 499 (client closed) —
the single-shot dispatch and a chain's step generations are cancelled, not left running for 10 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from loragate.loadtest.stub import StubApp
from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving
from tests.waiting import eventually

TOKEN = "disconnect-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-llama"
SLOW_S = 10.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("disconnect")
    for seed, name in enumerate(("alpha", "beta")):
        write_lora(root / "imports" / name, seed=seed)
    with ExitStack() as stack:
        worker = stack.enter_context(serving(StubApp(MODEL, whole_delay_s=SLOW_S), free_port()))
        settings = Settings(data_dir=root / "data", workers=[worker], embedder="none", port=free_port(),
                            admin_token=TOKEN, import_roots=[root / "imports"], probe_interval_s=0.05,
                            outcomes_flush_interval_s=0.05)
        url = stack.enter_context(serving(create_app(settings), settings.port))
        for name in ("alpha", "beta"):
            body = {"name": name, "path": str(root / "imports" / name)}
            assert httpx.post(f"{url}/admin/adapters", json=body, headers=AUTH).status_code == 201
        yield url


def _record(gateway: str, request_id: str) -> dict[str, Any] | None:
    data = httpx.get(f"{gateway}/admin/outcomes", headers=AUTH, timeout=10).json()["data"]
    return next((r for r in data if r["request_id"] == request_id), None)


@pytest.mark.parametrize("policy", ["base", 'chain;adapters="alpha beta";score=mean'])
def test_a_client_gone_before_a_whole_answer_ends_the_request_as_499(gateway: str, policy: str) -> None:
    request_id = f"gone-{policy.split(';')[0]}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4},
                   headers={"x-adapter-policy": policy, "x-request-id": request_id}, timeout=0.5)
    eventually(lambda: _record(gateway, request_id) is not None, wait_s=SLOW_S / 2)  # long before the worker answers
    record = _record(gateway, request_id)
    assert record is not None and record["status"] == 499 and record["policy_applied"] == policy.split(";")[0]
