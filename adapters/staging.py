"""Staging dirs that several gateway processes share: who owns each entry, and which are leftovers.

Registrations (path or upload) write into ``<root>/tmp/<entry>`` and rename the finished dir into
place. A process that dies midway (SIGKILL during a 3 GiB upload) leaves its entry behind, so every
process sweeps the staging dir when it starts. But gateway processes share the data dir
(``processes`` > 1, or a restart while another process runs), so an entry may also be another live
process's work in progress.

Ownership is therefore in the entry's name: ``owner~<host>~<pid>~<start>~<random>``, where
``host`` is the hostname and pid namespace and ``start`` the owner's start time
(``/proc/<pid>/stat``, so a reused pid is not mistaken for the owner). A sweep removes an entry of
this host at once when its owner is gone, and never one whose owner still runs. Entries without an
owner in their name (other writers, older versions) and entries of another host or container (a data
dir on shared storage) fall back to age: untouched for :data:`STALE_STAGING_S`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: Unowned staging leftovers older than this are a crashed writer's, not a concurrent process's.
STALE_STAGING_S = 3600.0
_PREFIX = "owner"
_SEP = "~"


@dataclass(frozen=True, slots=True)
class Owner:
    """A process on a host; ``start`` tells it from a later process that got the same pid."""

    host: str
    pid: int
    start: str

    def prefix(self) -> str:
        return _SEP.join((_PREFIX, self.host, str(self.pid), self.start, ""))

    @classmethod
    def of(cls, entry_name: str) -> Owner | None:
        parts = entry_name.split(_SEP)
        if len(parts) != 5 or parts[0] != _PREFIX or not parts[2].isdigit():
            return None
        return cls(parts[1], int(parts[2]), parts[3])


def _host() -> str:
    """This host and pid namespace: a pid means the same process only within both (two containers on
    one volume may share a hostname, never a pid namespace)."""
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = ""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() + (f".pidns{namespace}" if namespace else ""))


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot ("0" without /proc); None when it is not running.

    A zombie (exited, not yet reaped) counts as not running: it can no longer finish its work.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): liveness only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return fields[19]


def current_owner() -> Owner:
    """This process (looked up by pid, so a forked child is a new owner)."""
    return _owner_of(os.getpid())


@cache
def _owner_of(pid: int) -> Owner:
    return Owner(_host(), pid, process_start(pid) or "0")


def new_dir(staging: Path) -> Path:
    """A fresh private entry of ``staging`` owned by this process."""
    return Path(tempfile.mkdtemp(prefix=current_owner().prefix(), dir=staging))


def is_leftover(entry: Path, now: float, max_age_s: float = STALE_STAGING_S) -> bool:
    """True when nobody can still be writing ``entry``: its owner is gone, or (unowned) it is old."""
    owner = Owner.of(entry.name)
    if owner is not None and owner.host == _host():
        return process_start(owner.pid) != owner.start
    try:
        return now - entry.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_stale(staging: Path, max_age_s: float = STALE_STAGING_S) -> list[str]:
    """Delete the leftovers among the entries of ``staging`` (see :func:`is_leftover`); returns their names.

    Entries may vanish while this looks (their writer finished, or another process swept them):
    that is not an error, since a sweep at startup must never stop a process from starting.
    """
    removed = []
    now = time.time()
    for entry in staging.iterdir():
        if is_leftover(entry, now, max_age_s):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
