"""The outcome log: one durable record per routed request, completed later by grading or feedback.

This is what shows, on live traffic, where adapter reuse works: every decision (policy asked and
applied, candidates, adapters and weights, merge method, compositional flag, worker, latencies,
status) is stored, and its outcome (success/failure/score) arrives later, from client feedback
(``POST /v1/feedback``) or from the gateway grading the answer against ``X-Expected-Answer``.

Writes never touch the request path: records go into an in-memory queue that a background task
writes in batches, off the event loop, to the outcome database (``outcomes.sqlite3`` in the data dir,
or PostgreSQL with ``database_url``, where every replica writes and every replica's summary reads the
same records). ``close()`` drains the queue, so a graceful shutdown loses nothing; feedback flushes
first so it can grade a record written a moment ago. While the database is unreachable, records stay
queued (at most ``max_pending``) and are written once it is back; a retried batch adds nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loragate.database import Database, Executor, Migration, Row, SQLiteDatabase, migrate
from loragate.errors import Conflict, InvalidRequest, NotFound
from loragate.grading import wilson
from loragate.router.auto import Observation
from loragate.router.types import StepChoice

log = logging.getLogger(__name__)

# The table as versions 1 and 2 create it (frozen: a later column is a later migration, so that
# every earlier layout migrates through the same steps as a fresh database).
_COLUMNS = """
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,               -- primary | shadow
    shadow_of TEXT,                   -- for shadows: the primary's outcome id
    route TEXT NOT NULL,
    policy_asked TEXT NOT NULL,
    policy_applied TEXT NOT NULL,
    candidates TEXT NOT NULL,         -- JSON [[name, score], ...]
    adapters TEXT NOT NULL,           -- JSON [[name, weight], ...]
    method TEXT,
    compositional INTEGER,            -- 1 | 0 | NULL (not routed)
    fallback INTEGER NOT NULL,
    worker TEXT,
    embed_ms DOUBLE PRECISION, search_ms DOUBLE PRECISION, merge_ms DOUBLE PRECISION, load_ms DOUBLE PRECISION,
    upstream_ms DOUBLE PRECISION, total_ms DOUBLE PRECISION,
    status INTEGER NOT NULL,
    expected TEXT,
    result TEXT NOT NULL DEFAULT 'unknown',   -- unknown | success | failure
    score DOUBLE PRECISION,
    note TEXT,
    graded_by TEXT,                   -- expected | feedback
    graded_at DOUBLE PRECISION
)"""
_TABLE = ("CREATE TABLE IF NOT EXISTS outcomes (\n"
          "    outcome_id TEXT PRIMARY KEY,      -- unique per request (X-Outcome-Id)\n"
          "    request_id TEXT NOT NULL,         -- X-Request-Id: the client's correlation id (may repeat)\n"
          f"{_COLUMNS}")
_INDEXES = ("outcomes_ts ON outcomes (ts)", "outcomes_shadow_of ON outcomes (shadow_of)",
            "outcomes_request_id ON outcomes (request_id)")
_CREATE_INDEXES = tuple(f"CREATE INDEX IF NOT EXISTS {index}" for index in _INDEXES)

_COLUMNS_BEFORE_OUTCOME_ID = (
    "request_id, ts, kind, shadow_of, route, policy_asked, policy_applied, candidates, adapters, method, "
    "compositional, fallback, worker, embed_ms, search_ms, merge_ms, load_ms, upstream_ms, total_ms, status, "
    "expected, result, score, note, graded_by, graded_at")


def _add_outcome_id(tx: Executor) -> None:
    """SQLite v2: a log written before ``outcome_id`` existed gets its new key (the old request ids were
    unique: ``request_id`` was the primary key, so a client reusing an id replaced the earlier record)."""
    if not any(row["name"] == "outcome_id" for row in tx.query("PRAGMA table_info(outcomes)")):
        for index in _INDEXES:
            tx.execute(f"DROP INDEX IF EXISTS {index.split()[0]}")
        tx.execute("ALTER TABLE outcomes RENAME TO outcomes_old")
        tx.execute(_TABLE)
        tx.execute(f"INSERT INTO outcomes (outcome_id, {_COLUMNS_BEFORE_OUTCOME_ID}) "
                   f"SELECT request_id, {_COLUMNS_BEFORE_OUTCOME_ID} FROM outcomes_old")
        tx.execute("DROP TABLE outcomes_old")
    for statement in _CREATE_INDEXES:
        tx.execute(statement)


MIGRATIONS = (
    Migration(1, "the outcomes table", {
        # as every release before outcome ids wrote it (a newer file already has outcome_id: v2 sees that)
        "sqlite": [f"CREATE TABLE IF NOT EXISTS outcomes (\n    request_id TEXT PRIMARY KEY,{_COLUMNS}",
                   "CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts)",
                   "CREATE INDEX IF NOT EXISTS outcomes_shadow_of ON outcomes (shadow_of)"],
        "postgresql": [_TABLE, *_CREATE_INDEXES],
    }),
    Migration(2, "outcome ids: a reused request id no longer replaces a record", {"sqlite": _add_outcome_id}),
    Migration(3, "a chain's steps (JSON; NULL for other policies)", {
        "sqlite": ["ALTER TABLE outcomes ADD COLUMN steps TEXT"],
        "postgresql": ["ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS steps TEXT"],
    }),
    Migration(4, "the learned auto's context and arm (NULL: auto did not choose)", {
        "sqlite": ["ALTER TABLE outcomes ADD COLUMN auto_context TEXT", "ALTER TABLE outcomes ADD COLUMN auto_arm TEXT",
                   "CREATE INDEX IF NOT EXISTS outcomes_auto ON outcomes (auto_arm, ts)"],
        "postgresql": ["ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS auto_context TEXT",
                       "ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS auto_arm TEXT",
                       "CREATE INDEX IF NOT EXISTS outcomes_auto ON outcomes (auto_arm, ts)"],
    }),
)

FAILED_STATUS = 500
"""An auto arm's request that ended with a status at least this (the worker failed, timed out, or the gateway
broke) counts as a failure of the arm even ungraded; a 4xx is the client's own mistake and a 499 its leaving."""


def observation(row: Mapping[str, Any]) -> Observation | None:
    """What one outcome record (a row, or a record's fields) tells the learned auto: a graded outcome of its arm
    in its context, a failure for a 5xx, or nothing (not chosen by auto, or not graded yet). The one rule for the
    live statistics and for rebuilding them from the log."""
    if row["auto_arm"] is None or row["auto_context"] is None:
        return None
    served = row["kind"] == "primary"
    if row["result"] != "unknown":
        score = row["score"] if row["score"] is not None else float(row["result"] == "success")
        return Observation(row["auto_context"], row["auto_arm"], float(score), float(row["graded_at"] or row["ts"]),
                           served)
    if int(row["status"]) >= FAILED_STATUS:
        return Observation(row["auto_context"], row["auto_arm"], 0.0, float(row["ts"]), served)
    return None


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One request's decision and result, as logged."""

    outcome_id: str
    request_id: str
    ts: float
    kind: str
    shadow_of: str | None
    route: str
    policy_asked: str
    policy_applied: str
    candidates: tuple[tuple[str, float], ...]
    adapters: tuple[tuple[str, float], ...]
    method: str | None
    compositional: bool | None
    fallback: bool
    worker: str | None
    embed_ms: float
    search_ms: float
    merge_ms: float
    load_ms: float
    upstream_ms: float | None
    total_ms: float
    status: int
    expected: str | None = None
    result: str = "unknown"
    score: float | None = None
    graded_by: str | None = None
    steps: tuple[StepChoice, ...] | None = None  # a chain's steps as decided (None: not a chain)
    auto_context: str | None = None  # the learned auto's context and arm, when it chose the policy
    auto_arm: str | None = None

    def fields(self) -> dict[str, Any]:
        """The record's columns as the database stores them."""
        return dict(zip(_INSERT_COLUMNS, self.row(), strict=True))

    def row(self) -> tuple[Any, ...]:
        d = asdict(self)
        d["candidates"] = json.dumps([list(c) for c in self.candidates])
        d["adapters"] = json.dumps([list(a) for a in self.adapters])
        d["steps"] = None if self.steps is None else json.dumps(steps_json(self.steps))
        d["compositional"] = None if self.compositional is None else int(self.compositional)
        d["fallback"] = int(self.fallback)
        d["graded_at"] = self.ts if self.graded_by else None
        return tuple(d[c] for c in _INSERT_COLUMNS)


_INSERT_COLUMNS = ("outcome_id", "request_id", "ts", "kind", "shadow_of", "route", "policy_asked", "policy_applied",
                   "candidates", "adapters", "method", "compositional", "fallback", "worker", "embed_ms", "search_ms",
                   "merge_ms", "load_ms", "upstream_ms", "total_ms", "status", "expected", "result", "score",
                   "graded_by", "graded_at", "steps", "auto_context", "auto_arm")


def steps_json(steps: Iterable[StepChoice]) -> list[dict[str, Any]]:
    """A chain's steps as the ``steps`` column stores them: per step the winner (None: the base model),
    its score, tokens and decision time, and every candidate's score — what a chain's outcomes are
    analysed by (which adapter answered which hop, how close the runner-up was). Not the step text:
    the log keeps no generated text. A score of a step of no tokens (-inf) is null (JSON has no -inf)."""
    return [{"step": i, "adapter": s.adapter, "score": _finite(s.score), "tokens": s.tokens,
             "seconds": round(s.decide_s, 6),
             "candidates": [{"adapter": a, "score": _finite(v)} for a, v in s.scores]}
            for i, s in enumerate(steps, start=1)]


def _finite(score: float) -> float | None:
    return round(score, 6) if math.isfinite(score) else None


@dataclass(frozen=True, slots=True)
class Feedback:
    """A client's verdict on one request, named by its request id or (unambiguously) its outcome id."""

    request_id: str | None
    success: bool | None
    score: float | None
    note: str | None
    overwrite: bool = False
    outcome_id: str | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Feedback:
        """Validate ``{request_id | outcome_id, success | score, note, overwrite}`` (400 on anything else)."""
        unknown = sorted(set(body) - {"request_id", "outcome_id", "success", "score", "note", "overwrite"})
        if unknown:
            raise InvalidRequest(f"unknown feedback fields {unknown}", param=unknown[0])
        request_id, outcome_id = body.get("request_id"), body.get("outcome_id")
        for key, value in (("request_id", request_id), ("outcome_id", outcome_id)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequest(f"{key} must be a non-empty string", param=key)
        if (request_id is None) == (outcome_id is None):
            raise InvalidRequest("give request_id (the X-Request-Id of the response) or outcome_id (its "
                                 "X-Outcome-Id), one of them", param="request_id")
        success, score = body.get("success"), body.get("score")
        if success is None and score is None:
            raise InvalidRequest("give success (true/false) or score (0..1)", param="success")
        if success is not None and not isinstance(success, bool):
            raise InvalidRequest("success must be true or false", param="success")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)
                                  or not 0 <= score <= 1):
            raise InvalidRequest("score must be a number in [0, 1]", param="score")
        note = body.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > 2000):
            raise InvalidRequest("note must be a string of at most 2000 characters", param="note")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise InvalidRequest("overwrite must be true or false", param="overwrite")
        return cls(request_id, success, None if score is None else float(score), note, overwrite, outcome_id)

    @property
    def result(self) -> str:
        ok = self.success if self.success is not None else (self.score or 0.0) >= 0.5
        return "success" if ok else "failure"


class OutcomeLog:
    """Batched, durable storage of outcome records in a :class:`~loragate.database.Database` (a path:
    that SQLite file)."""

    def __init__(self, db: Database | Path, *, retention_days: float = 30.0, batch: int = 256,
                 interval_s: float = 0.25, max_pending: int = 100_000) -> None:
        self._db = SQLiteDatabase(db) if isinstance(db, Path) else db
        migrate(self._db, "outcomes", MIGRATIONS)
        self.retention_s = retention_days * 86400
        self._batch = batch
        self._interval = interval_s
        self._pending: list[OutcomeRecord] = []
        self.max_pending = max_pending
        self._writing = asyncio.Lock()  # so "flush, then read" sees every record queued before the flush
        self.dropped = 0  # records given up while the database was unreachable and the queue full
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.written = 0
        self._observers: list[Callable[[Observation], None]] = []

    def observe(self, observer: Callable[[Observation], None]) -> None:
        """Call ``observer`` with every auto observation as records are added or regraded (a regrade: the
        old observation with weight -1, then the new one), in the process that wrote them."""
        self._observers.append(observer)

    def _notify(self, *observations: Observation | None) -> None:
        for obs in observations:
            if obs is not None:
                for observer in self._observers:
                    observer(obs)

    # -- writing ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outcome-log-writer")

    def add(self, record: OutcomeRecord) -> None:
        """Queue a record (never blocks the request path)."""
        self._pending.append(record)
        if len(self._pending) >= self._batch:
            self._wake.set()
        if self._observers and record.auto_arm is not None:
            self._notify(observation(record.fields()))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the database is down: the batch waits in the queue for the next round
                log.warning("writing %d outcome records failed (%s); retrying in %.2f s", len(self._pending),
                            getattr(exc, "message", exc), self._interval)

    async def flush(self) -> None:
        """Write everything queued so far (in a thread), including a batch the writer already has in flight;
        also applies retention once an hour. (Waiting only when the queue was non-empty let a read right after
        an outage miss the batch the writer had taken and was still writing.)"""
        due = time.time() - self._last_prune > 3600
        if self._pending or due or self._writing.locked():
            await self._write_pending(prune=due)

    async def prune(self) -> int:
        """Write what is queued, then apply retention now; returns the number of records removed."""
        return await self._write_pending(prune=True)

    async def _write_pending(self, *, prune: bool) -> int:
        """Write the queue; if that fails, the batch goes back to the front of the queue (at most
        ``max_pending`` records are kept while the database is unreachable; the oldest go first)."""
        async with self._writing:  # one write at a time: a flush waits for the batch already in flight
            batch, self._pending = self._pending, []
            try:
                return await asyncio.to_thread(self._write, batch, prune)
            except BaseException:
                self._pending = batch + self._pending
                if (excess := len(self._pending) - self.max_pending) > 0:
                    del self._pending[:excess]
                    self.dropped += excess
                raise

    def _write(self, batch: list[OutcomeRecord], prune: bool) -> int:
        removed = 0
        if batch:
            placeholders = ",".join("?" * len(_INSERT_COLUMNS))
            with self._db.transaction() as tx:  # a batch retried after a lost commit acknowledgement adds nothing
                tx.executemany(f"INSERT INTO outcomes ({','.join(_INSERT_COLUMNS)}) VALUES ({placeholders}) "
                               "ON CONFLICT (outcome_id) DO NOTHING", [r.row() for r in batch])
            self.written += len(batch)
        if prune:
            self._last_prune = time.time()
            removed = self._db.execute("DELETE FROM outcomes WHERE ts < ?", (self._last_prune - self.retention_s,))
        return removed

    async def close(self) -> None:
        """Stop the writer and drain the queue: a graceful shutdown loses no record."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        self._db.close()

    # -- grading ---------------------------------------------------------------------------------
    async def feedback(self, fb: Feedback) -> dict[str, Any]:
        """Grade a record from client feedback: 404 unknown id, 409 already graded unless overwrite.

        The record may have been served by another gateway process or replica that has not written its
        queue yet (it writes every ``outcomes_flush_interval_s``): an id not found is looked up once
        more after two such intervals (at most 1 s) before the 404.
        """
        await self.flush()
        try:
            return await self._grade(fb)
        except NotFound:
            await asyncio.sleep(min(2 * self._interval, 1.0))
            return await self._grade(fb)

    async def _grade(self, fb: Feedback) -> dict[str, Any]:
        def run() -> tuple[dict[str, Any], Row, dict[str, Any]]:
            row = self._graded_row(fb)
            graded = {"result": fb.result, "score": fb.score if fb.score is not None else float(fb.result == "success"),
                      "graded_at": time.time()}
            # conditional on the grade read: two replicas grading one record at once cannot both win
            changed = 0 if row["result"] != "unknown" and not fb.overwrite else self._db.execute(
                "UPDATE outcomes SET result = ?, score = ?, note = ?, graded_by = 'feedback', graded_at = ? "
                "WHERE outcome_id = ? AND result = ?",
                (graded["result"], graded["score"], fb.note, graded["graded_at"], row["outcome_id"], row["result"]))
            if not changed:
                current = self._graded_row(fb)["result"]
                raise Conflict(f"request {self._named(fb)} is already graded ({current}); "
                               "send overwrite=true to replace it", param="request_id", code="already_graded")
            return ({"request_id": row["request_id"], "outcome_id": row["outcome_id"], "result": fb.result,
                     "policy": row["policy_applied"], "compositional": _flag(row["compositional"]),
                     "previous": row["result"]}, row, graded)

        answer, before, graded = await asyncio.to_thread(run)
        if (old := observation(before)) is not None:
            self._notify(replace(old, weight=-1.0))
        self._notify(observation({**dict(before), **graded}))
        return answer

    async def observations(self, since: float, limit: int = 200_000) -> list[Observation]:
        """The auto observations of the newest ``limit`` auto records since ``since`` (unix seconds): the learned
        auto's statistics rebuilt from the log (at startup, and by a process that did not see them live).
        Their sums do not depend on order, and older records weigh less, so the newest are the ones to keep."""
        await self.flush()

        def run() -> list[Observation]:
            rows = self._db.query("SELECT kind, status, result, score, graded_at, ts, auto_context, auto_arm "
                                  "FROM outcomes WHERE auto_arm IS NOT NULL AND ts >= ? ORDER BY ts DESC LIMIT ?",
                                  (since, limit))
            return [obs for row in reversed(rows) if (obs := observation(row)) is not None]

        return await asyncio.to_thread(run)

    @staticmethod
    def _named(fb: Feedback) -> str:
        return f"with outcome id {fb.outcome_id!r}" if fb.outcome_id is not None else repr(fb.request_id)

    def _graded_row(self, fb: Feedback) -> Row:
        """The one record feedback names: 404 if none, 409 if a reused request id names several."""
        key, value = ("outcome_id", fb.outcome_id) if fb.outcome_id is not None else ("request_id", fb.request_id)
        rows = self._db.query("SELECT outcome_id, request_id, result, policy_applied, compositional, kind, status, "
                              "score, graded_at, ts, auto_context, auto_arm FROM outcomes "
                              f"WHERE {key} = ? ORDER BY ts LIMIT 6", (value,))
        if not rows:
            raise NotFound(f"no request {self._named(fb)} in the outcome log", param=key, code="request_not_found")
        if len(rows) > 1:
            listed = ", ".join(r["outcome_id"] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise Conflict(f"request id {fb.request_id!r} was sent with more than one request; grade one of them "
                           f"by outcome_id (the X-Outcome-Id of its response), oldest first: {listed}",
                           param="request_id", code="ambiguous_request_id")
        return rows[0]

    # -- reading ---------------------------------------------------------------------------------
    async def records(self, limit: int = 100) -> list[dict[str, Any]]:
        await self.flush()

        def run() -> list[dict[str, Any]]:
            return [dict(r) for r in self._db.query("SELECT * FROM outcomes ORDER BY ts DESC LIMIT ?", (limit,))]

        return await asyncio.to_thread(run)

    async def summary(self) -> dict[str, Any]:
        """Success rate with a Wilson 95% interval by policy x compositional, and paired shadow comparisons."""
        await self.flush()

        def run() -> dict[str, Any]:
            groups = self._db.query(
                "SELECT policy_applied, compositional, COUNT(*) AS n, "
                "COUNT(*) FILTER (WHERE result != 'unknown') AS graded, "
                "COUNT(*) FILTER (WHERE result = 'success') AS ok "
                "FROM outcomes WHERE kind = 'primary' AND status < 400 "
                "GROUP BY policy_applied, compositional ORDER BY policy_applied, compositional")
            pairs = self._db.query(
                "SELECT p.policy_applied AS primary_policy, s.policy_applied AS shadow_policy, "
                "p.compositional AS compositional, COUNT(*) AS n, "
                "COUNT(*) FILTER (WHERE p.result = 'success') AS primary_ok, "
                "COUNT(*) FILTER (WHERE s.result = 'success') AS shadow_ok, "
                "COUNT(*) FILTER (WHERE p.result = 'success' AND s.result = 'success') AS both_ok, "
                "COUNT(*) FILTER (WHERE p.result = 'success' AND s.result != 'success') AS only_primary, "
                "COUNT(*) FILTER (WHERE p.result != 'success' AND s.result = 'success') AS only_shadow "
                "FROM outcomes s JOIN outcomes p ON s.shadow_of = p.outcome_id "
                "WHERE s.kind = 'shadow' AND p.result != 'unknown' AND s.result != 'unknown' "
                "GROUP BY p.policy_applied, s.policy_applied, p.compositional "
                "ORDER BY p.policy_applied, s.policy_applied, p.compositional")
            return {"object": "outcomes.summary", "groups": [_group(g) for g in groups],
                    "shadow_pairs": [_pair(p) for p in pairs]}

        return await asyncio.to_thread(run)


def _flag(value: int | None) -> str:
    return "unknown" if value is None else ("true" if value else "false")


def _group(g: Row) -> dict[str, Any]:
    graded, ok = int(g["graded"] or 0), int(g["ok"] or 0)
    low, high = wilson(ok, graded)
    return {"policy": g["policy_applied"], "compositional": _flag(g["compositional"]), "requests": g["n"],
            "graded": graded, "successes": ok, "success_rate": ok / graded if graded else None,
            "ci95": [round(low, 4), round(high, 4)]}


def _pair(p: Row) -> dict[str, Any]:
    n = int(p["n"])
    return {"primary_policy": p["primary_policy"], "shadow_policy": p["shadow_policy"],
            "compositional": _flag(p["compositional"]), "pairs": n,
            "primary_success_rate": int(p["primary_ok"]) / n, "shadow_success_rate": int(p["shadow_ok"]) / n,
            "both": int(p["both_ok"]), "only_primary": int(p["only_primary"]), "only_shadow": int(p["only_shadow"]),
            "neither": n - int(p["both_ok"]) - int(p["only_primary"]) - int(p["only_shadow"])}


def format_summary(summary: dict[str, Any], lines: Iterable[str] = ()) -> str:
    """The summary as the plain-text tables `loragate outcomes` prints."""
    out = list(lines)
    out.append(f"{'POLICY':24} {'COMPOSITIONAL':13} {'REQUESTS':>8} {'GRADED':>6} {'SUCCESS':>8}  95% CI")
    for g in summary["groups"]:
        rate = "-" if g["success_rate"] is None else f"{g['success_rate']:.1%}"
        out.append(f"{g['policy']:24} {g['compositional']:13} {g['requests']:>8} {g['graded']:>6} {rate:>8}  "
                   f"[{g['ci95'][0]:.1%}, {g['ci95'][1]:.1%}]")
    if summary["shadow_pairs"]:
        out.append("")
        out.append(f"{'PRIMARY':16} {'SHADOW':16} {'COMPOSITIONAL':13} {'PAIRS':>5} {'PRIMARY OK':>10} "
                   f"{'SHADOW OK':>9} {'ONLY P':>6} {'ONLY S':>6}")
        for p in summary["shadow_pairs"]:
            out.append(f"{p['primary_policy']:16} {p['shadow_policy']:16} {p['compositional']:13} {p['pairs']:>5} "
                       f"{p['primary_success_rate']:>10.1%} {p['shadow_success_rate']:>9.1%} "
                       f"{p['only_primary']:>6} {p['only_shadow']:>6}")
    return "\n".join(out)
