"""What a test can see of live processes through /proc (Linux)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def process_group(pgid: int) -> dict[int, str]:
    """The live (not zombie) members of process group ``pgid``: pid -> command name (cut at 15 characters)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members[int(entry.name)] = (entry / "comm").read_text().strip()
    return members
