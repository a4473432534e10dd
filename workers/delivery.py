"""Adapter delivery without a shared filesystem: the gateway side of the file protocol.

Workers on other machines cannot read the gateway's adapter store, so the gateway serves the
files read-only and the worker's resolver plugin (:mod:`loragate.workers.resolver_plugin`)
fetches them. Two GET routes, both behind a bearer token:

- ``/adapters-files/by-name/<name>``: the manifest ``{"name", "sha256", "files": [{"name", "size"}]}``
  of a registered adapter or a cached merge;
- ``/adapters-files/<sha256>/<file>``: one file, addressed by the adapter's content hash.

Why content addressing: the plugin caches by sha256, so a re-registered name with new weights
can never be served from a stale cache, and it verifies the hash
(:meth:`loragate.adapters.store.AdapterStore.content_hash`) before handing files to vLLM, so a
file corrupted or tampered with anywhere on the way is refused.

With an object store (``store_url``) the replica answering may not hold the files on its disk:
the manifest and file requests materialize them first (downloaded and verified once, then served
from the replica's cache); with the local store that is the store dir itself, at once.

This module holds the framework-free logic (token check, manifest, path resolution that cannot
escape the adapter directory); the server's route is a thin wrapper around :class:`AdapterFiles`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loragate.adapters.objectstore import StoreError
from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.adapters.types import AdapterRecord
from loragate.auth import BearerAuth
from loragate.errors import NotFound

FILES_PREFIX = "/adapters-files"
SHA256 = re.compile(r"[0-9a-f]{64}")
_MERGE_NAME = re.compile(r"merge-([0-9a-f]{16})")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a worker needs to fetch one adapter: its content hash and file names and sizes."""

    name: str
    sha256: str
    files: tuple[tuple[str, int], ...]

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.sha256,
                "files": [{"name": n, "size": s} for n, s in self.files]}


def adapter_dir_lookup(snapshot: Callable[[], Mapping[str, AdapterRecord]],
                       merges_root: Path | None = None) -> Callable[[str], Path | None]:
    """Name -> directory: a registered adapter's store dir, or a cached merge's (``merge-<key16>``)."""

    def lookup(name: str) -> Path | None:
        record = snapshot().get(name)
        if record is not None:
            return record.path
        match = _MERGE_NAME.fullmatch(name)
        if match is None or merges_root is None:
            return None
        found = sorted(p for p in merges_root.glob(f"{match.group(1)}*") if SHA256.fullmatch(p.name) and p.is_dir())
        return found[0] if found else None

    return lookup


class AdapterFiles:
    """Serves adapter manifests and files read-only to workers holding the delivery token."""

    def __init__(self, token: str | None, lookup: Callable[[str], Path | None], store_root: Path | None = None,
                 store: AdapterStore | None = None) -> None:
        """``store_root``: the content-addressed store, whose entries are found by hash alone (so a
        file request served by another gateway process than the manifest still resolves). ``store``:
        that store itself (its root is then ``store_root``), whose entries are materialized before
        they are described or served (an object store's replica downloads what it lacks)."""
        self._auth = BearerAuth(token, what="delivery", disabled_code="delivery_disabled",
                                disabled="adapter file delivery is disabled: set the delivery token on the gateway")
        self._lookup = lookup
        self._store = store
        self._store_root = store.root if store is not None and store_root is None else store_root
        self._dirs: dict[str, Path] = {}  # sha256 -> directory, learned from manifests
        self._hashes: dict[tuple[Path, int, int], str] = {}  # (dir, mtime_ns, size) -> sha256

    def authorize(self, authorization: str | None) -> None:
        """Constant-time bearer check; without a configured token the routes are off (403)."""
        self._auth.check(authorization)

    async def manifest(self, name: str) -> Manifest:
        """The manifest of ``name``; hashing runs in a thread and is cached per directory version."""
        directory = self._lookup(name)
        if (directory is not None and self._store is not None and directory.parent == self._store.root
                and SHA256.fullmatch(directory.name)):
            directory = await self._materialize(directory.name)
        if directory is None or not directory.is_dir():
            raise NotFound(f"no adapter named {name!r}", code="adapter_not_found")
        sha256, files = await asyncio.to_thread(self._describe, directory)
        self._dirs[sha256] = directory
        return Manifest(name, sha256, files)

    def _describe(self, directory: Path) -> tuple[str, tuple[tuple[str, int], ...]]:
        sizes = tuple((n, (directory / n).stat().st_size) for n in ADAPTER_FILES)
        stamp = (directory, max((directory / n).stat().st_mtime_ns for n in ADAPTER_FILES), sum(s for _, s in sizes))
        sha256 = self._hashes.get(stamp)
        if sha256 is None:
            sha256, _ = AdapterStore.content_hash(directory)
            self._hashes[stamp] = sha256
        return sha256, sizes

    async def _materialize(self, sha256: str) -> Path | None:
        """The store's local dir of ``sha256``; None when the store does not hold it (a 404, not a 502)."""
        assert self._store is not None
        try:
            return await self._store.materialize(sha256)
        except StoreError as exc:
            if exc.code == "object_missing":
                return None
            raise

    async def fetch(self, sha256: str, filename: str) -> Path:
        """:meth:`file`, after materializing the store's entry when this process does not hold it on
        disk (another replica registered it, or the cache evicted it since the manifest)."""
        self._check_name(sha256, filename)
        directory = self._dirs.get(sha256)
        if self._store is not None and (directory is None or not (directory / filename).is_file()):
            materialized = await self._materialize(sha256)
            if materialized is not None:
                self._dirs[sha256] = materialized
        return self.file(sha256, filename)

    @staticmethod
    def _check_name(sha256: str, filename: str) -> None:
        if not SHA256.fullmatch(sha256) or filename not in ADAPTER_FILES:
            raise NotFound(f"no adapter file {sha256}/{filename}", code="adapter_file_not_found")

    def file(self, sha256: str, filename: str) -> Path:
        """The path of one adapter file already on this disk; only the known PEFT file names, only hashes
        seen in a manifest or in the store (use :meth:`fetch` where the store may have to download it)."""
        self._check_name(sha256, filename)
        directory = self._dirs.get(sha256)
        if directory is None and self._store_root is not None and (self._store_root / sha256).is_dir():
            directory = self._store_root / sha256
        if directory is None or not (directory / filename).is_file():
            raise NotFound(f"no adapter file {sha256}/{filename} (fetch the manifest first)",
                           code="adapter_file_not_found")
        return directory / filename
