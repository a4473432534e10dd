"""Content-addressed adapter store with crash-safe staging.

Registration copies the adapter's files into a staging dir ``<root>/tmp/owner~...`` named after the
process that owns it (see :mod:`loragate.adapters.staging`), validates the *copy* (so a source
edited mid-registration cannot slip past validation), then renames the staging dir to
``<root>/<sha256>``. Renames are atomic on one filesystem, so a crash leaves either a complete store
entry or a staging dir; :meth:`AdapterStore.collect_garbage` removes the staging dirs of processes
that are gone and entries no registry row references. Identical content registered under two names
is stored once.

Every store (this local one, :class:`loragate.adapters.objectstore.S3Store`) has one interface:
``path_for`` (where the files are, or will be, on this replica's disk), ``commit`` (durable when it
returns), ``materialize`` (await before reading files: an object store may have to download them),
``remove`` and ``collect_garbage``. :class:`LruDirs` is the bounded directory cache that the object
store's local copies and the merge cache share.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.staging import current_owner, new_dir, remove_stale
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

    async def materialize(self, sha256: str) -> Path:
        """The local directory with the complete files of ``sha256``; await it before reading them.

        Here the store *is* the local disk, so this is :meth:`path_for` at once (no thread hop on the
        request path); an object store downloads and verifies on a miss.
        """
        return self.path_for(sha256)

    def held(self, sha256s: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        """Keep these entries from being evicted while the block reads them (a merge build reading its
        inputs); nothing is ever evicted here."""
        return contextlib.nullcontext()

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


def dir_size(path: Path) -> int:
    """Bytes of the plain files directly in ``path``."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def has_files(path: Path, names: Iterable[str] = ADAPTER_FILES) -> bool:
    return all((path / name).is_file() for name in names)


def touch(path: Path, names: Iterable[str] = ADAPTER_FILES) -> bool:
    """Mark a cached dir as used now (its mtime is the LRU clock across restarts); False if it is gone."""
    if not has_files(path, names):
        return False
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


class LruDirs:
    """Which directories under ``root`` a bounded cache holds, least recently used first, by bytes.

    Shared by the merge cache and the object store's local copies. Thread-safe: the object store
    updates it from the registry's threads (commit, remove) and from the event loop (materialize).
    An evicted dir is renamed into ``trash`` (one metadata syscall, under the lock, so no lookup sees
    a half-deleted dir) and returned for the caller to delete, off the event loop. Never evicted:
    the entry being returned (``protect``) and entries with a lease (a hit between lookup and
    return, a merge build reading its inputs).
    """

    def __init__(self, root: Path, trash: Path, max_bytes: int) -> None:
        self.root = root
        self.trash = trash
        self.max_bytes = max_bytes
        self.evictions = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._leases: Counter[str] = Counter()
        self._lock = threading.Lock()

    def scan(self, keep: Callable[[Path], bool]) -> None:
        """Index the dirs already under ``root`` that ``keep`` accepts, oldest mtime first (blocking)."""
        found = []
        for entry in self.root.iterdir():
            if entry == self.trash or not entry.is_dir():
                continue
            try:
                if keep(entry):
                    found.append((entry.stat().st_mtime, entry.name, dir_size(entry)))
            except FileNotFoundError:  # another process sharing the dir removed it meanwhile
                continue
        with self._lock:
            for _, key, size in sorted(found):
                self._sizes[key] = size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    @property
    def entries(self) -> int:
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def size(self, key: str) -> int:
        return self._sizes.get(key, 0)

    def add(self, key: str, size: int) -> None:
        """Record ``key`` as present and most recently used."""
        with self._lock:
            self._sizes[key] = size
            self._sizes.move_to_end(key)

    def used(self, key: str) -> bool:
        """Move ``key`` to the most recently used end; False when it is no longer indexed."""
        with self._lock:
            if key not in self._sizes:
                return False
            self._sizes.move_to_end(key)
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._sizes.pop(key, None)

    @contextlib.contextmanager
    def leased(self, keys: Iterable[str]) -> Iterator[None]:
        """No eviction of ``keys`` inside the block."""
        keys = list(keys)
        with self._lock:
            self._leases.update(keys)
        try:
            yield
        finally:
            with self._lock:
                self._leases.subtract(keys)
                for key in keys:
                    if self._leases[key] <= 0:
                        del self._leases[key]

    def evict(self, protect: str | None = None) -> list[Path]:
        """Drop least recently used entries until under budget; returns their renamed dirs to delete."""
        victims = []
        with self._lock:
            total = sum(self._sizes.values())
            for key in list(self._sizes):
                if total <= self.max_bytes:
                    break
                if key == protect or self._leases[key]:
                    continue
                total -= self._sizes.pop(key)
                trash = self.trash / f"{current_owner().prefix()}evicted-{key[:16]}-{uuid.uuid4().hex[:8]}"
                try:
                    (self.root / key).rename(trash)
                except FileNotFoundError:
                    continue
                victims.append(trash)
                self.evictions += 1
        return victims


def remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
