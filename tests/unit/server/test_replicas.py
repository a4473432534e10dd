"""Three gateway replicas on one real PostgreSQL, each with its own data dir, in front of a stub worker.

What a fleet relies on at the HTTP surface: a registration on one replica is served by the others
(LISTEN/NOTIFY, no polling of files), a delete is a 404 everywhere, the outcome summary is one
summary whichever replica answers, and feedback sent to one replica grades a request another served.
(The fleet test in tests/integration adds real vLLM workers, the object store and killed replicas.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from loadtest.stub import StubApp
from loragate.server.app import create_app
from loragate.server.settings import Settings
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving
from tests.waiting import eventually

TOKEN = "replica-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str) -> Iterator[list[str]]:
    imports = tmp_path / "imports"
    write_lora(imports / "alpha", seed=1)
    with ExitStack() as stack:
        worker = stack.enter_context(serving(StubApp(), free_port()))
        urls = []
        for i in range(3):
            settings = Settings(data_dir=tmp_path / f"replica-{i}", workers=[worker], embedder="none",
                                port=free_port(), admin_token=TOKEN, import_roots=[imports],  # type: ignore[arg-type]
                                database_url=postgres_url, probe_interval_s=0.05,  # type: ignore[arg-type]
                                outcomes_flush_interval_s=0.05)
            urls.append(stack.enter_context(serving(create_app(settings), settings.port)))
        yield urls


def test_registration_delete_and_outcomes_are_shared_by_every_replica(replicas: list[str], tmp_path: Path) -> None:
    one, two, three = replicas
    body = {"name": "alpha", "path": str(tmp_path / "imports" / "alpha"), "description": "facts", "examples": ["q"]}
    assert httpx.post(f"{one}/admin/adapters", json=body, headers=AUTH).status_code == 201
    seen_after = eventually(lambda: httpx.get(f"{three}/admin/adapters/alpha", headers=AUTH).status_code == 200)
    print(f"registration reached replica 3 after {seen_after * 1000:.0f} ms")
    # the same registration sent to another replica is the idempotent retry, not a second adapter
    again = httpx.post(f"{two}/admin/adapters", json=body, headers=AUTH)
    assert again.status_code == 200 and again.json()["sha256"] == httpx.get(
        f"{one}/admin/adapters/alpha", headers=AUTH).json()["sha256"]
    # served by a replica that never saw the registration request
    completion = httpx.post(f"{three}/v1/completions", json={"model": "alpha", "prompt": "hi"},
                            headers={"x-expected-answer": "cat"})
    assert completion.status_code == 200, completion.text
    assert completion.headers["x-adapters"] == '"alpha";w=1.0'
    base = httpx.post(f"{two}/v1/completions", json={"model": "tiny-llama", "prompt": "hi"})
    assert base.status_code == 200
    # feedback on replica 1 grades the request replica 2 served
    graded = httpx.post(f"{one}/v1/feedback", json={"request_id": base.headers["x-request-id"], "success": False})
    assert graded.status_code == 200, graded.text
    summaries = [httpx.get(f"{url}/admin/outcomes/summary", headers=AUTH).json() for url in replicas]
    assert summaries[0] == summaries[1] == summaries[2]
    groups = {g["policy"]: g for g in summaries[0]["groups"]}
    assert (groups["pin"]["requests"], groups["pin"]["successes"]) == (1, 1)
    assert (groups["base"]["graded"], groups["base"]["successes"]) == (1, 0)
    # deleted on replica 2: gone on all, and no replica serves it any more
    assert httpx.delete(f"{two}/admin/adapters/alpha", headers=AUTH).status_code == 200
    for url in replicas:
        eventually(lambda url=url: httpx.get(f"{url}/admin/adapters/alpha", headers=AUTH).status_code == 404)
        refused = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi"})
        assert refused.status_code == 404, refused.text
