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

Several gateway processes may share one data dir. Whatever changes files and rows together (rename
plus insert, delete plus file removal, the collection at open) holds a file lock next to the
database, so one process never collects an entry another has renamed in but not yet committed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from loragate.adapters.base_shapes import BaseModelShapes
from loragate.adapters.peft_format import LoraSpec, inspect_dir
from loragate.adapters.store import AdapterStore, shown_path
from loragate.adapters.types import NAME_PATTERN, AdapterRecord, Descriptors
from loragate.errors import Conflict, InvalidRequest, NotFound, Unprocessable
from loragate.shared_db import connect_shared, lock_for

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    use_rslora INTEGER NOT NULL,
    modules_to_save TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    description TEXT NOT NULL,
    examples TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""
_COLUMNS = ("name, base_model, rank, alpha, target_modules, use_rslora, modules_to_save, sha256, path, "
            "size_bytes, description, examples, created_at")


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


def _row_to_record(row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(
        name=row["name"], base_model=row["base_model"], rank=row["rank"], alpha=row["alpha"],
        target_modules=tuple(json.loads(row["target_modules"])), use_rslora=bool(row["use_rslora"]),
        modules_to_save=tuple(json.loads(row["modules_to_save"])), sha256=row["sha256"],
        path=Path(row["path"]), size_bytes=row["size_bytes"], created_at=row["created_at"],
        descriptors=Descriptors(row["description"], tuple(json.loads(row["examples"]))),
    )


class AdapterRegistry:
    """Registered adapters: durable rows, immutable files, and an in-memory snapshot for readers."""

    def __init__(self, db_path: Path, store: AdapterStore, limits: RegistryLimits) -> None:
        self._db = connect_shared(db_path, _SCHEMA)
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()
        self._files_lock = lock_for(db_path)  # across the processes sharing the data dir
        self.store = store
        self.limits = limits
        self._snapshot: Mapping[str, AdapterRecord] = MappingProxyType({})
        self._data_version = 0
        self._reload()

    @classmethod
    def open(cls, data_dir: Path, limits: RegistryLimits) -> AdapterRegistry:
        """Open (or create) the registry in ``data_dir`` and collect what an interrupted registration left."""
        data_dir.mkdir(parents=True, exist_ok=True)
        registry = cls(data_dir / "registry.sqlite3", AdapterStore(data_dir / "adapters"), limits)
        registry.collect_garbage()
        return registry

    def collect_garbage(self) -> list[str]:
        """Remove store entries no row references and stale staging dirs; returns what went."""
        with self._writing():
            referenced = {row[0] for row in self._db.execute("SELECT sha256 FROM adapters")}
            return self.store.collect_garbage(referenced)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Exclusive against this process's threads and against other processes on the data dir."""
        with self._lock, self._files_lock:
            yield

    def close(self) -> None:
        with self._lock:
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
        # the data_version seen with these rows: a later change by another connection shows as a new one
        self._data_version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY name").fetchall()
        self._snapshot = MappingProxyType({row["name"]: _row_to_record(row) for row in rows})

    async def changed_elsewhere(self) -> bool:
        """True when another connection (a second gateway process) committed since the snapshot was read."""
        def run() -> bool:
            with self._lock:
                version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
            return version != self._data_version

        return await asyncio.to_thread(run)

    async def refresh(self) -> None:
        """Re-read rows written by another gateway process sharing the data dir."""
        def run() -> None:
            with self._lock:
                self._reload()

        await asyncio.to_thread(run)

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

        Read from the database under the write lock, so a row another process committed counts too.
        """
        row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        record = _row_to_record(row)
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
            with self._writing():
                existing = self._existing(name, sha256, descriptors)
                if existing is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                    if name not in self._snapshot:
                        self._reload()  # committed by another process since our last read
                    return Registration(existing, created=False)
                path, created = self.store.commit(staged, sha256)
                record = AdapterRecord(
                    name=name, base_model=spec.base_model, rank=spec.rank, alpha=spec.alpha,
                    target_modules=spec.target_modules, use_rslora=spec.use_rslora,
                    modules_to_save=spec.modules_to_save, sha256=sha256, path=path, size_bytes=size,
                    created_at=time.time(), descriptors=descriptors,
                )
                try:
                    self._insert(record)
                except sqlite3.IntegrityError as exc:
                    raise Conflict(f"adapter {name!r} is already registered", param="name",
                                   code="adapter_exists") from exc
                self._reload()
                return Registration(record, created=True)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            if created:
                self._drop_unreferenced(sha256)
            raise

    def _insert(self, r: AdapterRecord) -> None:
        self._db.execute(
            f"INSERT INTO adapters ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.name, r.base_model, r.rank, r.alpha, json.dumps(list(r.target_modules)), int(r.use_rslora),
             json.dumps(list(r.modules_to_save)), r.sha256, str(r.path), r.size_bytes,
             r.descriptors.description, json.dumps(list(r.descriptors.examples)), r.created_at),
        )

    def _drop_unreferenced(self, sha256: str) -> None:
        with self._writing():
            still = self._db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
            if still is None:
                self.store.remove(sha256)

    async def update_descriptors(self, name: str, descriptors: Descriptors) -> AdapterRecord:
        def run() -> AdapterRecord:
            with self._lock:
                cursor = self._db.execute(
                    "UPDATE adapters SET description = ?, examples = ? WHERE name = ?",
                    (descriptors.description, json.dumps(list(descriptors.examples)), name))
                if cursor.rowcount == 0:
                    raise NotFound(f"adapter {name!r} is not registered", param="name", code="adapter_not_found")
                self._reload()
                return self._snapshot[name]

        return await asyncio.to_thread(run)

    async def remove(self, name: str) -> AdapterRecord:
        """Delete the row, then the files if no other name shares them."""
        def run() -> AdapterRecord:
            with self._lock:
                record = self.get(name)
                self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
                self._reload()
            self._drop_unreferenced(record.sha256)
            return record

        return await asyncio.to_thread(run)
