"""Content-addressed adapter store with crash-safe staging.

Registration copies the adapter's files into ``<root>/tmp/<random>`` while hashing them, validates
the *copy* (so a source edited mid-registration cannot slip past validation), then renames the
staging dir to ``<root>/<sha256>``. Renames are atomic on one filesystem, so a crash leaves either
a complete store entry or a staging dir; :meth:`AdapterStore.collect_garbage` removes stale staging
dirs and entries no registry row references. Identical content registered under two names is stored once.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.staging import remove_stale
from loragate.errors import Forbidden, PayloadTooLarge, Unprocessable

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_CHUNK = 1 << 20


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


class AdapterStore:
    """Files of registered adapters, addressed by the sha256 of their content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "tmp"
        self.staging.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256

    def new_staging_dir(self) -> Path:
        """A fresh private directory on the store's filesystem (so the final rename is atomic)."""
        return Path(tempfile.mkdtemp(dir=self.staging))

    @staticmethod
    def check_source(source: Path, import_roots: Iterable[Path], max_bytes: int) -> list[Path]:
        """Resolve a server-side source dir; refuse paths outside the import roots and oversized files.

        Each file is resolved too: a symlink inside an allowed dir that points elsewhere is refused.
        """
        roots = [r.resolve() for r in import_roots]
        if not roots:
            raise Forbidden("registration from server paths is disabled: no import roots are configured "
                            "(set LORAGATE_IMPORT_ROOTS)", param="path", code="path_forbidden")
        absolute = source.absolute()
        resolved = absolute.resolve()
        for candidate in (absolute, resolved):
            if not _within(candidate, roots):
                how = "reached through a symlink that leaves" if candidate is resolved else "outside"
                raise Forbidden(f"{source} is {how} the import roots {[str(r) for r in roots]}",
                                param="path", code="path_forbidden")
        if not resolved.is_dir():
            raise Unprocessable(f"{source} is not a directory", param="path", code="not_a_directory")
        files = []
        total = 0
        for name in ADAPTER_FILES:
            file = resolved / name
            if not file.exists():
                continue  # peft_format reports missing files with its own message
            real = file.resolve()
            if not _within(real, roots):
                raise Forbidden(f"{file} is a symlink that leaves the import roots", param="path",
                                code="path_forbidden")
            total += real.stat().st_size
            files.append(real)
        if total > max_bytes:
            raise PayloadTooLarge(f"adapter files are {total} bytes, above the limit of {max_bytes} bytes",
                                  param="path")
        return files

    def stage_copy(self, files: Iterable[Path]) -> Path:
        """Copy files into a new staging dir; the caller validates and then :meth:`commit` s or discards it."""
        staged = self.new_staging_dir()
        try:
            for file in files:
                shutil.copyfile(file, staged / file.name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    @staticmethod
    def content_hash(directory: Path) -> tuple[str, int]:
        """sha256 over (name, length, bytes) of the adapter files, and their total size."""
        digest = hashlib.sha256()
        total = 0
        for name in ADAPTER_FILES:
            file = directory / name
            size = file.stat().st_size
            total += size
            digest.update(f"{name}\0{size}\0".encode())
            with file.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest(), total

    def commit(self, staged: Path, sha256: str) -> tuple[Path, bool]:
        """Move a validated staging dir to its content address; returns (path, newly_created)."""
        target = self.path_for(sha256)
        if target.exists():
            shutil.rmtree(staged, ignore_errors=True)
            return target, False
        staged.rename(target)
        return target, True

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.path_for(sha256), ignore_errors=True)

    def collect_garbage(self, referenced: set[str]) -> list[str]:
        """Delete stale staging leftovers and entries no row references (what a crash mid-registration
        leaves). The caller holds the registry's write lock, so no entry is between rename and row."""
        removed = [f"tmp/{name}" for name in remove_stale(self.staging)]
        for entry in self.root.iterdir():
            if entry != self.staging and entry.is_dir() and entry.name not in referenced:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed
