"""Content-addressed adapter store with crash-safe staging.

Registration copies the adapter's files into a staging dir ``<root>/tmp/owner~...`` named after the
process that owns it (see :mod:`loragate.adapters.staging`), validates the *copy* (so a source
edited mid-registration cannot slip past validation), then renames the staging dir to
``<root>/<sha256>``. Renames are atomic on one filesystem, so a crash leaves either a complete store
entry or a staging dir; :meth:`AdapterStore.collect_garbage` removes the staging dirs of processes
that are gone and entries no registry row references. Identical content registered under two names
is stored once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.staging import new_dir, remove_stale
from loragate.errors import Forbidden, InvalidRequest, PayloadTooLarge, Unprocessable

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_CHUNK = 1 << 20


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _lexical(path: Path) -> Path:
    """Absolute, with ``..`` and ``.`` applied to the path as written (no symlink is followed)."""
    return Path(os.path.normpath(path.absolute()))


def shown_path(path: Path | str, limit: int = 200) -> str:
    """A client's path as messages quote it: control characters escaped, at most ``limit`` characters."""
    text = repr(str(path))[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(path))} characters)"


def path_error(source: Path, exc: OSError | ValueError) -> InvalidRequest | Unprocessable:
    """What the OS said about a client's path, as a 4xx naming the ``path`` field (never a 500)."""
    if isinstance(exc, ValueError) or exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
        reason = str(exc) if isinstance(exc, ValueError) else (exc.strerror or str(exc))
        return InvalidRequest(f"path {shown_path(source)} is not a usable path: {reason}", param="path",
                              code="invalid_path")
    if exc.errno == errno.ENOENT:
        return Unprocessable(f"{shown_path(source)} does not exist", param="path", code="path_not_found")
    return Unprocessable(f"{shown_path(source)} cannot be read: {exc.strerror or exc}", param="path",
                         code="unreadable_path")


class AdapterStore:
    """Files of registered adapters, addressed by the sha256 of their content."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "tmp"
        self.staging.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256

    def new_staging_dir(self) -> Path:
        """A fresh private directory on the store's filesystem (so the final rename is atomic), owned by
        this process: a restart collects it at once if this process dies, and no other process touches it."""
        return new_dir(self.staging)

    @staticmethod
    def check_source(source: Path, import_roots: Iterable[Path], max_bytes: int) -> list[Path]:
        """Resolve a server-side source dir; refuse paths outside the import roots and oversized files.

        ``..`` is judged on the path as written (``roots/../x`` is outside); the resolved path then
        tells whether a symlink leads out. Each file is resolved too: a symlink inside an allowed dir
        that points elsewhere is refused. What the OS refuses (a NUL byte, a name too long) is a 4xx.
        """
        import_roots = list(import_roots)
        if not import_roots:
            raise Forbidden("registration from server paths is disabled: no import roots are configured "
                            "(set LORAGATE_IMPORT_ROOTS)", param="path", code="path_forbidden")
        try:
            return AdapterStore._source_files(source, import_roots, max_bytes)
        except (OSError, ValueError) as exc:
            raise path_error(source, exc) from exc

    @staticmethod
    def _source_files(source: Path, import_roots: list[Path], max_bytes: int) -> list[Path]:
        roots = [r.resolve() for r in import_roots]
        if "\0" in str(source):
            raise ValueError("it contains a NUL byte")
        written = _lexical(source)
        resolved = source.absolute().resolve()
        shown = shown_path(source)
        if not _within(written, roots) and not _within(written, [_lexical(r) for r in import_roots]):
            raise Forbidden(f"{shown} is outside the import roots {[str(r) for r in roots]}", param="path",
                            code="path_forbidden")
        if not _within(resolved, roots):
            raise Forbidden(f"{shown} is reached through a symlink that leaves the import roots "
                            f"{[str(r) for r in roots]}", param="path", code="path_forbidden")
        if not resolved.is_dir():
            if not resolved.exists():
                resolved.stat()  # the OS's reason: missing, too long, ...
            raise Unprocessable(f"{shown} is not a directory", param="path", code="not_a_directory")
        files = []
        total = 0
        for name in ADAPTER_FILES:
            file = resolved / name
            if not file.exists():
                continue  # peft_format reports missing files with its own message
            real = file.resolve()
            if not _within(real, roots):
                raise Forbidden(f"{shown_path(source / name)} is a symlink that leaves the import roots",
                                param="path", code="path_forbidden")
            total += real.stat().st_size
            files.append(real)
        if total > max_bytes:
            raise PayloadTooLarge(f"adapter files in {shown} are {total} bytes, above the limit of {max_bytes} "
                                  "bytes", param="path")
        return files

    def stage_copy(self, files: Iterable[Path], label: str = "") -> Path:
        """Copy files into a new staging dir; the caller validates and then :meth:`commit` s or discards it.

        A file that cannot be read is a 422 naming ``label`` (the user's path), not the staging dir.
        """
        staged = self.new_staging_dir()
        try:
            for file in files:
                try:
                    shutil.copyfile(file, staged / file.name)
                except OSError as exc:
                    if exc.filename != str(file):
                        raise  # writing the staging copy failed: the server's problem, not the client's
                    raise Unprocessable(f"{label or file.parent}: cannot read {file.name}: {exc.strerror or exc}",
                                        param="path", code="unreadable_path") from exc
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
