"""Files that several processes read while one rewrites them: write a private temp file, then rename.

A reader (another gateway process, a restart, a scrape) then sees the old file or the new one,
never half of either; a private temp name in the same directory keeps two writers from renaming
each other's half-written file, and a failed write leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temp path next to ``path``; when the block succeeds it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
