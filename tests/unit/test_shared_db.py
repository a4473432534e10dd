"""Shared SQLite files: a process opening a database another is still creating waits instead of failing."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.adapters.registry import AdapterRegistry, RegistryLimits
from loragate.server.outcomes import OutcomeLog
from loragate.shared_db import connect_shared, lock_for

SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER);"


def open_while_another_creates(path: Path, opener: Callable[[], object]) -> object:
    """Open with ``opener`` while a raw connection is mid-way through creating the file (as another
    process's first open is, before its switch to WAL), then let the creator finish."""
    creator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    with lock_for(path):
        creator.execute("BEGIN IMMEDIATE")
        creator.execute("CREATE TABLE creator (x INTEGER)")
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.append(_capture(opener)))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), f"the opener did not wait for the creator: {results}"
        creator.execute("COMMIT")
    thread.join(30)
    creator.close()
    assert len(results) == 1
    if isinstance(results[0], BaseException):
        raise results[0]
    return results[0]


def _capture(opener: Callable[[], object]) -> object:
    try:
        return opener()
    except BaseException as exc:  # handed to the test thread
        return exc


def test_plain_sqlite_fails_in_that_window(tmp_path: Path) -> None:
    """Why the lock exists: without it, the switch to WAL fails at once, whatever the busy timeout."""
    path = tmp_path / "raw.sqlite3"
    creator = sqlite3.connect(path, isolation_level=None)
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE creator (x INTEGER)")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(path, timeout=5).execute("PRAGMA journal_mode=WAL")


def test_connect_shared_waits_for_the_creator(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = open_while_another_creates(path, lambda: connect_shared(path, SCHEMA))
    assert isinstance(db, sqlite3.Connection)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row["name"] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"creator", "t"}


@pytest.mark.parametrize("name", ["registry.sqlite3", "outcomes.sqlite3"])
def test_gateway_databases_open_through_it(tmp_path: Path, name: str) -> None:
    def open_it() -> object:
        if name == "registry.sqlite3":
            return AdapterRegistry.open(tmp_path, RegistryLimits(base_models=frozenset({"b"}), max_rank=8,
                                                                 max_bytes=1 << 20, import_roots=()))
        return OutcomeLog(tmp_path / name)

    opened = open_while_another_creates(tmp_path / name, open_it)
    assert isinstance(opened, AdapterRegistry | OutcomeLog)
