"""SQLite files that every gateway process of a deployment opens at once.

With ``processes`` > 1 (or a restart overlapping the old process), several processes open the same
``registry.sqlite3`` and ``outcomes.sqlite3`` at the same moment. SQLite's busy timeout covers
ordinary reads and writes, but not switching a brand-new file to WAL: while one process is still
creating the file, another's ``PRAGMA journal_mode=WAL`` fails at once with "database is locked".
One gateway process failing its startup makes uvicorn stop them all, so the first open (journal
mode and schema) runs under a file lock next to the database; after it, WAL lets them share it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from filelock import FileLock

#: How long a write waits for another process's write to finish before "database is locked".
BUSY_TIMEOUT_S = 10.0


def lock_for(path: Path) -> FileLock:
    """The inter-process lock of the database at ``path`` (``registry.sqlite3`` -> ``registry.lock``)."""
    return FileLock(path.with_suffix(".lock"))


def connect_shared(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) a WAL database in autocommit mode, with rows as :class:`sqlite3.Row`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(path):
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(schema)
        except BaseException:
            db.close()
            raise
    return db
