"""Staging dirs that several gateway processes share: which entries are a crash's leftovers.

Registrations and merge builds write into ``<root>/tmp/<random>`` and rename the finished dir into
place. A process that dies midway leaves its staging dir behind, so every process sweeps the
staging dir when it starts. But gateway processes share the data dir (``processes`` > 1, or a
restart while another process runs), and a young staging dir may be another process's work in
progress: only entries untouched for :data:`STALE_STAGING_S` are a crash's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

#: Staging leftovers older than this are a crashed writer's, not a concurrent process's.
STALE_STAGING_S = 3600.0


def remove_stale(staging: Path, max_age_s: float = STALE_STAGING_S) -> list[str]:
    """Delete the entries of ``staging`` older than ``max_age_s``; returns their names.

    Entries may vanish while this looks (their writer finished, or another process swept them):
    that is not an error, since a sweep at startup must never stop a process from starting.
    """
    removed = []
    now = time.time()
    for entry in staging.iterdir():
        try:
            stale = now - entry.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
