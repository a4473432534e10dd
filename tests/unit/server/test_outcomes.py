"""The outcome log on a real SQLite file and a real PostgreSQL database: batching, grading, feedback rules,
summaries, retention, migrations."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loragate.database import PostgresDatabase, PostgresOptions, SQLiteDatabase, migrate, schema_version
from loragate.errors import Conflict, InvalidRequest, NotFound, StorageUnavailable
from loragate.grading import wilson
from loragate.router.types import StepChoice
from loragate.server.outcomes import (
    _INSERT_COLUMNS,
    MIGRATIONS,
    Feedback,
    OutcomeLog,
    OutcomeRecord,
    format_summary,
)
from tests.postgres import running_postgres

OpenLog = Callable[..., OutcomeLog]


@pytest.fixture
def open_log(tmp_path: Path, database_url: str | None) -> OpenLog:
    """Opens the test's outcome log (the same one at every call) on SQLite, then on PostgreSQL."""
    def opened(**options: Any) -> OutcomeLog:
        return OutcomeLog(PostgresDatabase(database_url) if database_url else tmp_path / "o.sqlite3", **options)

    return opened


def record(rid: str, policy: str = "select", compositional: bool | None = False, result: str = "unknown",
           kind: str = "primary", shadow_of: str | None = None, ts: float | None = None,
           status: int = 200, outcome_id: str | None = None) -> OutcomeRecord:
    graded = result != "unknown"
    return OutcomeRecord(
        outcome_id=outcome_id or rid, request_id=rid, ts=time.time() if ts is None else ts, kind=kind,
        shadow_of=shadow_of,
        route="completions", policy_asked=policy, policy_applied=policy, candidates=(("a", 0.5),),
        adapters=(("a", 1.0),), method=None, compositional=compositional, fallback=False, worker="w",
        embed_ms=1, search_ms=0.1, merge_ms=0, load_ms=0, upstream_ms=10, total_ms=12, status=status,
        expected="x" if graded else None, result=result, score=float(result == "success") if graded else None,
        graded_by="expected" if graded else None)


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "request_id"),
    ({"request_id": "r", "outcome_id": "o", "success": True}, "one of them"),
    ({"outcome_id": 3, "success": True}, "outcome_id must be a non-empty string"),
    ({"request_id": "r"}, "success"),
    ({"request_id": "r", "success": "yes"}, "true or false"),
    ({"request_id": "r", "score": 2}, "[0, 1]"),
    ({"request_id": "r", "success": True, "colour": 1}, "unknown feedback fields"),
    ({"request_id": "r", "success": True, "overwrite": "no"}, "overwrite"),
])
def test_malformed_feedback_is_400(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        Feedback.parse(body)


async def test_feedback_grades_once_unless_overwrite(open_log: OpenLog) -> None:
    log = open_log()
    log.start()
    log.add(record("r1"))
    with pytest.raises(NotFound):
        await log.feedback(Feedback.parse({"request_id": "nope", "success": True}))
    graded = await log.feedback(Feedback.parse({"request_id": "r1", "success": True, "note": "good"}))
    assert graded["result"] == "success" and graded["previous"] == "unknown"
    with pytest.raises(Conflict, match="already graded"):
        await log.feedback(Feedback.parse({"request_id": "r1", "score": 0.1}))
    again = await log.feedback(Feedback.parse({"request_id": "r1", "score": 0.1, "overwrite": True}))
    assert again["result"] == "failure"
    rows = await log.records()
    assert rows[0]["result"] == "failure" and rows[0]["score"] == pytest.approx(0.1) and rows[0]["note"] is None
    await log.close()


async def test_summary_matches_a_recount_and_pairs_shadows(open_log: OpenLog) -> None:
    log = open_log()
    results = ["success", "failure", "success", "unknown", "success"]
    for i, result in enumerate(results):
        log.add(record(f"s{i}", "select", compositional=bool(i % 2), result=result))
        log.add(record(f"s{i}-shadow", "average", compositional=bool(i % 2), kind="shadow", shadow_of=f"s{i}",
                       result="failure" if i < 3 else "success"))
    log.add(record("bad", "select", status=502))
    summary = await log.summary()
    groups = {(g["policy"], g["compositional"]): g for g in summary["groups"]}
    assert set(groups) == {("select", "false"), ("select", "true")}  # shadows and failures are not primaries
    plain = groups[("select", "false")]  # i = 0, 2, 4
    assert (plain["requests"], plain["graded"], plain["successes"]) == (3, 3, 3)
    comp = groups[("select", "true")]  # i = 1, 3
    assert (comp["requests"], comp["graded"], comp["successes"]) == (2, 1, 0)
    assert comp["ci95"] == [round(v, 4) for v in wilson(0, 1)]
    pairs = {(p["compositional"]): p for p in summary["shadow_pairs"]}
    assert pairs["false"]["pairs"] == 3 and pairs["false"]["only_primary"] == 2 and pairs["false"]["both"] == 1
    assert pairs["true"]["pairs"] == 1  # i = 3 is ungraded on the primary side
    text = format_summary(summary)
    assert "select" in text and "average" in text
    await log.close()


async def test_close_drains_the_queue_and_retention_prunes(open_log: OpenLog) -> None:
    log = open_log(retention_days=30, interval_s=3600)
    log.start()
    log.add(record("old", ts=time.time() - 3 * 86400))
    log.add(record("new"))
    await log.close()  # the writer never woke up: close must write both
    kept = open_log(retention_days=30)
    assert {r["request_id"] for r in await kept.records()} == {"old", "new"}
    await kept.close()
    reopened = open_log(retention_days=1)
    assert await reopened.prune() == 1
    assert [r["request_id"] for r in await reopened.records()] == ["new"]
    await reopened.close()


async def test_a_reused_request_id_keeps_every_record_and_feedback_names_one(open_log: OpenLog) -> None:
    log = open_log()
    log.start()
    log.add(record("dup", "base", outcome_id="first"))
    log.add(record("dup", "pin", outcome_id="second", ts=time.time() + 1))
    await log.flush()
    assert sorted((r["outcome_id"], r["policy_applied"]) for r in await log.records()) == [
        ("first", "base"), ("second", "pin")]
    with pytest.raises(Conflict, match="first, second") as ambiguous:
        await log.feedback(Feedback.parse({"request_id": "dup", "success": True}))
    assert ambiguous.value.code == "ambiguous_request_id"
    graded = await log.feedback(Feedback.parse({"outcome_id": "second", "success": True}))
    assert graded["request_id"] == "dup" and graded["outcome_id"] == "second" and graded["policy"] == "pin"
    results = {r["outcome_id"]: r["result"] for r in await log.records()}
    assert results == {"first": "unknown", "second": "success"}
    with pytest.raises(NotFound):
        await log.feedback(Feedback.parse({"outcome_id": "third", "success": True}))
    await log.close()


#: The table as releases before outcome ids wrote it (schema version 1; no schema_versions table yet).
_V1_TABLE = """CREATE TABLE IF NOT EXISTS outcomes (
    request_id TEXT PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, shadow_of TEXT, route TEXT NOT NULL,
    policy_asked TEXT NOT NULL, policy_applied TEXT NOT NULL, candidates TEXT NOT NULL, adapters TEXT NOT NULL,
    method TEXT, compositional INTEGER, fallback INTEGER NOT NULL, worker TEXT,
    embed_ms REAL, search_ms REAL, merge_ms REAL, load_ms REAL, upstream_ms REAL, total_ms REAL,
    status INTEGER NOT NULL, expected TEXT, result TEXT NOT NULL DEFAULT 'unknown', score REAL, note TEXT,
    graded_by TEXT, graded_at REAL);
CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts);
CREATE INDEX IF NOT EXISTS outcomes_shadow_of ON outcomes (shadow_of);"""
#: What the release before versioned migrations wrote (outcome ids, still no schema_versions table).
_V2_UNVERSIONED = _V1_TABLE.replace("request_id TEXT PRIMARY KEY,",
                                    "outcome_id TEXT PRIMARY KEY, request_id TEXT NOT NULL,")


NEWEST = MIGRATIONS[-1].version
V2_COLUMNS = [c for c in _INSERT_COLUMNS if c not in ("steps", "auto_context", "auto_arm")]  # versions 1 and 2


def row_of(outcome: OutcomeRecord, columns: list[str]) -> tuple[Any, ...]:
    """The record's values for ``columns`` only (an older layout's insert)."""
    values = dict(zip(_INSERT_COLUMNS, outcome.row(), strict=True))
    return tuple(values[c] for c in columns)


async def test_a_log_from_before_outcome_ids_is_migrated(tmp_path: Path) -> None:
    """The old table (request_id as primary key) gets outcome_id = request_id; shadows still pair up."""
    from loragate.server import outcomes as module

    path = tmp_path / "o.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V1_TABLE)
    for rid, kind, shadow_of, result in (("p1", "primary", None, "success"), ("p1-shadow", "shadow", "p1", "failure")):
        columns = module._COLUMNS_BEFORE_OUTCOME_ID.replace(", note", "")
        row = row_of(record(rid, kind=kind, shadow_of=shadow_of, result=result), columns.split(", "))
        db.execute(f"INSERT INTO outcomes ({columns}) VALUES ({','.join('?' * len(row))})", row)
    db.commit()
    db.close()
    log = OutcomeLog(path)
    log.start()
    assert {r["outcome_id"]: r["request_id"] for r in await log.records()} == {"p1": "p1", "p1-shadow": "p1-shadow"}
    log.add(record("p1", outcome_id="p1-again"))  # the old primary key would have replaced the first p1
    summary = await log.summary()
    assert summary["shadow_pairs"][0]["pairs"] == 1
    assert len(await log.records()) == 3
    await log.close()
    indexes = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"outcomes_ts", "outcomes_shadow_of", "outcomes_request_id"} <= indexes
    assert schema_version(SQLiteDatabase(path), "outcomes") == NEWEST


async def test_a_log_from_the_release_before_versioned_migrations_opens_at_the_newest_version(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_V2_UNVERSIONED)
    row = row_of(record("r1"), V2_COLUMNS)
    db.execute(f"INSERT INTO outcomes ({','.join(V2_COLUMNS)}) VALUES ({','.join('?' * len(row))})", row)
    db.commit()
    db.close()
    log = OutcomeLog(path)
    assert [(r["outcome_id"], r["steps"]) for r in await log.records()] == [("r1", None)]
    await log.close()
    assert schema_version(SQLiteDatabase(path), "outcomes") == NEWEST


async def test_a_version_2_log_gets_the_steps_column_and_keeps_its_records(tmp_path: Path,
                                                                            database_url: str | None) -> None:
    """Both backends: a log a release with versioned migrations wrote before chain steps (version 2) gains a
    NULL ``steps`` for every old record; new records store theirs."""
    def opened() -> SQLiteDatabase | PostgresDatabase:
        return PostgresDatabase(database_url) if database_url else SQLiteDatabase(tmp_path / "o.sqlite3")

    old = opened()
    assert migrate(old, "outcomes", MIGRATIONS[:2]) == 2
    row = row_of(record("before"), V2_COLUMNS)
    old.execute(f"INSERT INTO outcomes ({','.join(V2_COLUMNS)}) VALUES ({','.join('?' * len(row))})", row)
    old.close()
    log = OutcomeLog(opened())
    log.add(dataclasses.replace(record("after", "chain"), steps=(StepChoice("a", -0.5, 3, " x."),)))
    steps = {r["outcome_id"]: r["steps"] for r in await log.records()}
    assert steps["before"] is None and [s["adapter"] for s in json.loads(steps["after"])] == ["a"]
    await log.close()
    assert schema_version(opened(), "outcomes") == NEWEST


async def test_a_schema_newer_than_this_release_is_refused(open_log: OpenLog) -> None:
    log = open_log()
    await log.close()
    bumped = open_log()  # the same database, one release ahead
    database = bumped._db
    database.execute("UPDATE schema_versions SET version = 99 WHERE component = 'outcomes'")
    await bumped.close()
    with pytest.raises(StorageUnavailable, match="version 99, newer than this loragate knows"):
        open_log()


async def test_records_wait_in_the_queue_while_postgres_is_down_and_are_written_once(tmp_path: Path) -> None:
    """A server of its own, stopped and started: the writer keeps its batch, reads are a 503, nothing is lost
    and nothing is written twice."""
    with running_postgres() as server:
        log = OutcomeLog(PostgresDatabase(server.url(), PostgresOptions(connect_timeout_s=2)), interval_s=0.05)
        log.start()
        log.add(record("before"))
        await log.flush()
        server.stop()
        log.add(record("during-1"))
        log.add(record("during-2"))
        with pytest.raises(StorageUnavailable, match="unreachable"):
            await log.flush()
        with pytest.raises(StorageUnavailable):
            await log.summary()
        await asyncio.sleep(0.2)  # the writer's own rounds fail too and keep the batch
        server.start()
        rows = await _once_reachable(log)
        assert sorted(r["outcome_id"] for r in rows) == ["before", "during-1", "during-2"]
        await log.close()


async def _once_reachable(log: OutcomeLog) -> list[dict[str, Any]]:
    """The records, as soon as the pool has reconnected (it retries with backoff: seconds, not at once)."""
    for _ in range(60):
        try:
            return await log.records()
        except StorageUnavailable:
            await asyncio.sleep(0.5)
    raise AssertionError("the outcome log did not reconnect within 30 s")


async def test_a_read_waits_for_the_batch_the_writer_has_in_flight(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer has taken the queue and is still writing it (a slow database) when a read comes: the read
    must wait for that batch, not answer from a database it has not reached yet."""
    log = OutcomeLog(SQLiteDatabase(tmp_path / "outcomes.sqlite3"))
    await log.flush()  # the first flush also applies retention; after it, only records make a flush write
    writing, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    slow_write = log._write

    def write(batch: list[OutcomeRecord], prune: bool) -> int:
        if batch:
            loop.call_soon_threadsafe(writing.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return slow_write(batch, prune)

    monkeypatch.setattr(log, "_write", write)
    log.add(record("in-flight"))
    writer = asyncio.create_task(log.flush())  # the background writer's round
    await writing.wait()
    reader = asyncio.create_task(log.records())
    await asyncio.sleep(0.05)
    assert not reader.done()  # it waits for the batch in flight
    release.set()
    await writer
    assert [r["outcome_id"] for r in await reader] == ["in-flight"]
    await log.close()
