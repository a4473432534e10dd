"""The adapter registry: SQLite (WAL) rows plus the content-addressed store.

Writes happen in a worker thread (``asyncio.to_thread``) so SQLite and file copies never block the
event loop. Readers on the request path use :meth:`AdapterRegistry.snapshot`, an immutable mapping
republished after every write, so routing never touches SQLite.

Ordering gives crash safety: copy to staging -> validate the copy -> rename into the store ->
insert the row and commit. A crash before the commit leaves only files no row references, which
:meth:`AdapterRegistry.open` collects on the next start.

Validation refuses what a worker could not load (vLLM's PEFT rules, and shapes that do not fit the
base model's config when one is configured): such an adapter would otherwise register and then fail
every request that uses it.

Registering is idempotent: a client that lost the response to a committed registration and sends
it again (same name, same files, same description and examples) gets the existing record back
(``created`` false); a different registration under a taken name is a 409 naming what differs.

The rows live in a :class:`~loragate.database.Database`: a SQLite file in the data dir (the
embedded default, shared by the gateway processes of one host) or PostgreSQL (``database_url``,
shared by every replica, with an object store holding the files). Whatever changes files and rows
together holds the database's lock: registrations hold it shared (they only add files, and may run
side by side on different replicas), removing files and collecting garbage hold it exclusive, so
nothing is collected that another process has stored but not yet committed a row for. On SQLite
every holder is exclusive (a file lock next to the database). With PostgreSQL a replica killed in the
middle of a registration leaves at most unreferenced files, and its lock dies with its connection:
the next collection (any replica's start) removes them.

Other processes' changes arrive through :meth:`AdapterRegistry.follow`: ``PRAGMA data_version``
polls on SQLite, ``LISTEN``/``NOTIFY`` (a trigger on the table) on PostgreSQL, plus a periodic
full re-read there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from loragate.adapters.base_shapes import BaseModelShapes
from loragate.adapters.peft_format import LoraSpec, inspect_dir
from loragate.adapters.store import AdapterStore, shown_path
from loragate.adapters.types import NAME_PATTERN, AdapterRecord, Descriptors
from loragate.database import Database, DuplicateRow, Executor, Migration, Row, SQLiteDatabase, migrate
from loragate.errors import Conflict, InvalidRequest, NotFound, Unprocessable

log = logging.getLogger(__name__)

#: PostgreSQL channel the table's trigger notifies (payload: the adapter name)
CHANNEL = "loragate_registry"
_COLUMNS = ("name, base_model, rank, alpha, target_modules, use_rslora, modules_to_save, sha256, "
            "size_bytes, description, examples, created_at")


def _table(name: str, *, with_path: bool) -> str:
    path = "    path TEXT NOT NULL,\n" if with_path else ""
    return (f"CREATE TABLE IF NOT EXISTS {name} (\n    name TEXT PRIMARY KEY,\n    base_model TEXT NOT NULL,\n"
            "    rank INTEGER NOT NULL,\n    alpha DOUBLE PRECISION NOT NULL,\n    target_modules TEXT NOT NULL,\n"
            "    use_rslora INTEGER NOT NULL,\n    modules_to_save TEXT NOT NULL,\n    sha256 TEXT NOT NULL,\n"
            f"{path}    size_bytes BIGINT NOT NULL,\n    description TEXT NOT NULL,\n    examples TEXT NOT NULL,\n"
            "    created_at DOUBLE PRECISION NOT NULL\n)")


def _drop_path_column(tx: Executor) -> None:
    """SQLite v2: rows stop carrying an absolute path (it is the store's business, and differs per host)."""
    columns = {row["name"] for row in tx.query("PRAGMA table_info(adapters)")}
    if "path" in columns:
        tx.execute(_table("adapters_v2", with_path=False))
        tx.execute(f"INSERT INTO adapters_v2 ({_COLUMNS}) SELECT {_COLUMNS} FROM adapters")
        tx.execute("DROP TABLE adapters")
        tx.execute("ALTER TABLE adapters_v2 RENAME TO adapters")
    tx.execute("CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters (sha256)")


MIGRATIONS = (
    Migration(1, "the adapters table", {
        "sqlite": [_table("adapters", with_path=True)],  # as every release before versioned migrations wrote it
        "postgresql": [_table("adapters", with_path=False)],
    }),
    Migration(2, "no stored paths; files by sha256; change notifications", {
        "sqlite": _drop_path_column,
        "postgresql": [
            "CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters (sha256)",
            "CREATE OR REPLACE FUNCTION loragate_registry_notify() RETURNS trigger AS $$ BEGIN "
            f"PERFORM pg_notify('{CHANNEL}', COALESCE(NEW.name, OLD.name)); RETURN NULL; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER adapters_notify AFTER INSERT OR UPDATE OR DELETE ON adapters "
            "FOR EACH ROW EXECUTE FUNCTION loragate_registry_notify()",
        ],
    }),
)


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    """What a registration is checked against; comes from the gateway's settings."""

    base_models: frozenset[str]
    max_rank: int
    max_bytes: int
    import_roots: tuple[Path, ...]
    #: the base model's sizes (from its config.json); None: shapes are checked against the rank only
    base_shapes: BaseModelShapes | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """A registration's result: the record, and whether this call created it (False: an identical retry)."""

    record: AdapterRecord
    created: bool


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(f"invalid adapter name {name!r}: must match [a-z0-9][a-z0-9._-]{{0,63}}",
                             param="name", code="invalid_name")
    return name


def validate_descriptors(description: object, examples: object) -> Descriptors:
    if not isinstance(description, str) or len(description) > 4096:
        raise InvalidRequest("description must be a string of at most 4096 characters", param="description")
    if not isinstance(examples, list | tuple) or not all(isinstance(e, str) and e for e in examples):
        raise InvalidRequest("examples must be a list of non-empty strings", param="examples")
    if len(examples) > 256:
        raise InvalidRequest("at most 256 examples per adapter", param="examples")
    return Descriptors(description=description, examples=tuple(examples))


def _row_to_record(row: Row, store: AdapterStore) -> AdapterRecord:
    return AdapterRecord(
        name=row["name"], base_model=row["base_model"], rank=row["rank"], alpha=row["alpha"],
        target_modules=tuple(json.loads(row["target_modules"])), use_rslora=bool(row["use_rslora"]),
        modules_to_save=tuple(json.loads(row["modules_to_save"])), sha256=row["sha256"],
        path=store.path_for(row["sha256"]), size_bytes=row["size_bytes"], created_at=row["created_at"],
        descriptors=Descriptors(row["description"], tuple(json.loads(row["examples"]))),
    )


class AdapterRegistry:
    """Registered adapters: durable rows, immutable files, and an in-memory snapshot for readers."""

    def __init__(self, db: Database, store: AdapterStore, limits: RegistryLimits) -> None:
        migrate(db, "registry", MIGRATIONS)
        self._db = db
        self._reading = threading.Lock()  # a re-read and its publication are one step (no stale overwrite)
        self.store = store
        self.limits = limits
        self._snapshot: Mapping[str, AdapterRecord] = MappingProxyType({})
        self._reload()

    @classmethod
    def open(cls, data_dir: Path, limits: RegistryLimits, *, database: Database | None = None,
             store: AdapterStore | None = None) -> AdapterRegistry:
        """Open (or create) the registry — by default SQLite and the store in ``data_dir`` — and collect
        what an interrupted registration left."""
        data_dir.mkdir(parents=True, exist_ok=True)
        registry = cls(database or SQLiteDatabase(data_dir / "registry.sqlite3"),
                       store or AdapterStore(data_dir / "adapters"), limits)
        registry.collect_garbage()
        return registry

    def collect_garbage(self) -> list[str]:
        """Remove store entries no row references and stale staging dirs; returns what went."""
        with self._db.lock("registry"):
            referenced = {row["sha256"] for row in self._db.query("SELECT sha256 FROM adapters")}
            return self.store.collect_garbage(referenced)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    # -- readers ---------------------------------------------------------------------------------
    def snapshot(self) -> Mapping[str, AdapterRecord]:
        """An immutable name -> record mapping; safe to hold across awaits."""
        return self._snapshot

    def get(self, name: str) -> AdapterRecord:
        record = self._snapshot.get(name)
        if record is None:
            raise NotFound(f"adapter {name!r} is not registered", param="name", code="adapter_not_found")
        return record

    def _reload(self) -> None:
        with self._reading:
            rows = self._db.query(f"SELECT {_COLUMNS} FROM adapters ORDER BY name")
            self._snapshot = MappingProxyType({row["name"]: _row_to_record(row, self.store) for row in rows})

    async def refresh(self) -> None:
        """Re-read the rows (another gateway process or replica may have changed them)."""
        await asyncio.to_thread(self._reload)

    async def follow(self, on_change: Callable[[], Awaitable[None]], *, poll_s: float, resync_s: float) -> None:
        """Re-read whenever another process changes the registry, then call ``on_change``; runs until
        cancelled. A failed re-read is logged and the next change (or resync) tries again."""
        async for _ in self._db.changes(CHANNEL, poll_s=poll_s, resync_s=resync_s):
            try:
                await self.refresh()
                await on_change()
            except Exception:
                log.exception("re-reading the registry from %s failed", self._db.describe())

    # -- writers ---------------------------------------------------------------------------------
    async def add_from_path(self, name: str, source: Path, descriptors: Descriptors) -> Registration:
        """Register a server-side directory (must lie inside the import roots)."""
        return await asyncio.to_thread(self._add_from_path, name, source, descriptors)

    async def add_staged(self, name: str, staged: Path, descriptors: Descriptors,
                         label: str = "the upload") -> Registration:
        """Register files already written to a staging dir (uploads); the dir is consumed either way.

        ``label`` is what error messages call the files (the client never sees the staging dir).
        """
        return await asyncio.to_thread(self._add_staged, name, staged, descriptors, label)

    def _add_from_path(self, name: str, source: Path, descriptors: Descriptors) -> Registration:
        validate_name(name)
        files = self.store.check_source(source, self.limits.import_roots, self.limits.max_bytes)
        label = shown_path(source)
        return self._add_staged(name, self.store.stage_copy(files, label), descriptors, label)

    def _check_servable(self, spec: LoraSpec) -> None:
        """What a worker would refuse at load time, refused now with the reason (422)."""
        if spec.base_model not in self.limits.base_models:
            raise Unprocessable(
                f"adapter was trained for base model {spec.base_model!r}, but this gateway serves "
                f"{sorted(self.limits.base_models)}", param="base_model", code="base_model_mismatch")
        if spec.rank > self.limits.max_rank:
            raise Unprocessable(f"adapter rank {spec.rank} is above the workers' max LoRA rank "
                                f"{self.limits.max_rank}", param="rank", code="rank_too_high")
        if spec.unservable:
            raise Unprocessable(f"the workers (vLLM) cannot load this adapter: {'; '.join(spec.unservable)}",
                                param="path", code="unsupported_adapter")
        if self.limits.base_shapes is not None:
            self.limits.base_shapes.check(spec.module_dims)

    def _existing(self, name: str, sha256: str, descriptors: Descriptors) -> AdapterRecord | None:
        """The committed row of ``name`` if this registration repeats it; 409 naming what differs.

        Read from the database under the lock, so a row another process committed counts too.
        """
        rows = self._db.query(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,))
        if not rows:
            return None
        record = _row_to_record(rows[0], self.store)
        differences = []
        if record.sha256 != sha256:
            differences.append(f"different files (sha256 {record.sha256[:12]} registered, {sha256[:12]} sent)")
        if record.descriptors.description != descriptors.description:
            differences.append("a different description")
        if record.descriptors.examples != descriptors.examples:
            differences.append("different examples")
        if differences:
            raise Conflict(f"adapter {name!r} is already registered with {', '.join(differences)}: choose "
                           "another name, or delete it first", param="name", code="adapter_exists")
        return record

    def _add_staged(self, name: str, staged: Path, descriptors: Descriptors, label: str) -> Registration:
        created = False
        sha256 = ""
        try:
            validate_name(name)
            spec = inspect_dir(staged, label)
            self._check_servable(spec)
            sha256, size = self.store.content_hash(staged)
            with self._db.lock("registry", shared=True):
                existing = self._existing(name, sha256, descriptors)
                if existing is None:
                    path, created = self.store.commit(staged, sha256)
                    record = AdapterRecord(
                        name=name, base_model=spec.base_model, rank=spec.rank, alpha=spec.alpha,
                        target_modules=spec.target_modules, use_rslora=spec.use_rslora,
                        modules_to_save=spec.modules_to_save, sha256=sha256, path=path, size_bytes=size,
                        created_at=time.time(), descriptors=descriptors,
                    )
                    try:
                        self._insert(record)
                    except DuplicateRow:  # another replica committed this name meanwhile: a retry, or a 409
                        existing = self._existing(name, sha256, descriptors)
                        if existing is None:
                            raise
                        created = False  # its files are the other registration's now: keep them
                if existing is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                    if name not in self._snapshot:
                        self._reload()  # committed by another process since our last read
                    return Registration(existing, created=False)
                self._reload()
                return Registration(record, created=True)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            if created:
                self._drop_unreferenced(sha256)
            raise

    def _insert(self, r: AdapterRecord) -> None:
        self._db.execute(
            f"INSERT INTO adapters ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.name, r.base_model, r.rank, r.alpha, json.dumps(list(r.target_modules)), int(r.use_rslora),
             json.dumps(list(r.modules_to_save)), r.sha256, r.size_bytes,
             r.descriptors.description, json.dumps(list(r.descriptors.examples)), r.created_at),
        )

    def _drop_unreferenced(self, sha256: str) -> None:
        with self._db.lock("registry"):
            if not self._db.query("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)):
                self.store.remove(sha256)

    async def update_descriptors(self, name: str, descriptors: Descriptors) -> AdapterRecord:
        def run() -> AdapterRecord:
            changed = self._db.execute("UPDATE adapters SET description = ?, examples = ? WHERE name = ?",
                                       (descriptors.description, json.dumps(list(descriptors.examples)), name))
            self._reload()
            if changed == 0 or name not in self._snapshot:
                raise NotFound(f"adapter {name!r} is not registered", param="name", code="adapter_not_found")
            return self._snapshot[name]

        return await asyncio.to_thread(run)

    async def remove(self, name: str) -> AdapterRecord:
        """Delete the row, then the files if no other name shares them."""
        def run() -> AdapterRecord:
            rows = self._db.query(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,))
            if not rows or self._db.execute("DELETE FROM adapters WHERE name = ?", (name,)) == 0:
                self._reload()  # gone already (another replica): this one's view catches up
                raise NotFound(f"adapter {name!r} is not registered", param="name", code="adapter_not_found")
            self._reload()
            record = _row_to_record(rows[0], self.store)
            self._drop_unreferenced(record.sha256)
            return record

        return await asyncio.to_thread(run)
