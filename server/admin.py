"""Admin operations on adapters: register (server path, upload or source URL), list, show, patch, delete.

Uploads are streamed into a staging dir of the store with the size limit enforced while writing
(each chunk written in a thread, off the event loop), and a source URL (``s3://bucket/key/``) is
copied into one (:mod:`loragate.adapters.sources`); both are then registered exactly like a
server-side path, so every way shares every validation rule. Errors name the client's path, URL or
uploaded file names, never the staging dir.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import BinaryIO

from loragate.adapters.objectstore import s3_client
from loragate.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loragate.adapters.registry import AdapterRegistry, Registration, validate_descriptors, validate_name
from loragate.adapters.sources import AdapterSources
from loragate.adapters.types import AdapterRecord
from loragate.auth import BearerAuth
from loragate.errors import InvalidRequest, PayloadTooLarge
from loragate.router.search import Searcher
from loragate.workers.pool import WorkerPool

UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def _write(out: BinaryIO, chunk: bytes) -> None:
    """One chunk (up to 1 MiB) of an upload, written in a worker thread: an upload of up to
    ``max_adapter_bytes`` (2 GiB) must not stall every other request on the event loop."""
    out.write(chunk)


class AdminAuth(BearerAuth):
    """The admin API's bearer token; no token means admin is off unless unauthenticated use is allowed."""

    def __init__(self, token: str | None, allow_unauthenticated: bool) -> None:
        super().__init__(token, what="admin", disabled_code="admin_disabled",
                         disabled="the admin API is disabled: set LORAGATE_ADMIN_TOKEN (or, for local use only, "
                                  "LORAGATE_ALLOW_UNAUTHENTICATED_ADMIN=true)",
                         allow_unauthenticated=allow_unauthenticated)


class AdminService:
    """What the /admin routes and the `loragate adapters` CLI do."""

    def __init__(self, registry: AdapterRegistry, pool: WorkerPool, max_bytes: int,
                 searcher: Searcher | None = None, sources: AdapterSources | None = None) -> None:
        """``sources``: where source URLs are read from (default: S3 through boto3's environment chain)."""
        self.registry = registry
        self.pool = pool
        self.max_bytes = max_bytes
        self.searcher = searcher
        self.sources = sources or AdapterSources(s3_client)

    async def _changed(self, record: AdapterRecord) -> AdapterRecord:
        """Registry changes reach routing at once: the descriptor indexes re-sync (only what changed)."""
        if self.searcher is not None:
            await self.searcher.sync(self.registry.snapshot())
        return record

    def limits(self) -> dict[str, object]:
        """What a client may check before sending an upload (the CLI does, so a 3 GiB upload is not
        sent only to be refused)."""
        return {"max_adapter_bytes": self.max_bytes, "max_lora_rank": self.registry.limits.max_rank}

    async def _registered(self, registration: Registration) -> Registration:
        if registration.created:
            await self._changed(registration.record)
        return registration

    async def register_json(self, name: str, path: object, source: object, description: object = "",
                            examples: Iterable[str] = ()) -> Registration:
        """A JSON registration: exactly one of ``path`` (server-side directory) and ``source`` (URL)."""
        if path is not None and source is not None:
            raise InvalidRequest("give either path (a server-side directory) or source (an s3:// URL), not both",
                                 param="source")
        if source is not None:
            return await self.register_source(name, source, description, examples)
        return await self.register_path(name, "" if path is None else path, description, examples)

    async def register_path(self, name: str, path: object, description: object = "",
                            examples: Iterable[str] = ()) -> Registration:
        descriptors = validate_descriptors(description, list(examples))
        if not isinstance(path, str) or not path:
            raise InvalidRequest("path is required (a server-side directory, as a string) unless files are "
                                 "uploaded or a source URL is given", param="path")
        return await self._registered(await self.registry.add_from_path(name, Path(path), descriptors))

    async def register_source(self, name: str, source: object, description: object = "",
                              examples: Iterable[str] = ()) -> Registration:
        """Copy the adapter under a source URL into the store, then register it like an upload."""
        validate_name(name)  # before any download
        descriptors = validate_descriptors(description, list(examples))
        staged = await self.sources.stage(source, self.registry.store, self.max_bytes)
        assert isinstance(source, str)  # stage() refused anything else
        return await self._registered(await self.registry.add_staged(name, staged, descriptors, label=source))

    async def register_upload(self, name: str, files: dict[str, AsyncIterator[bytes]], description: str,
                              examples: list[str]) -> Registration:
        """``files`` maps file names to byte streams; only the PEFT files are accepted."""
        validate_name(name)
        descriptors = validate_descriptors(description, examples)
        unexpected = sorted(set(files) - set(UPLOAD_FILES))
        if unexpected:
            raise InvalidRequest(f"unexpected upload files {unexpected}; send {list(UPLOAD_FILES)}", param="files")
        staged = await asyncio.to_thread(self.registry.store.new_staging_dir)
        total = 0
        try:
            for filename, chunks in files.items():
                out = await asyncio.to_thread((staged / filename).open, "wb")
                try:
                    async for chunk in chunks:
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes",
                                                  param="files")
                        await asyncio.to_thread(_write, out, chunk)
                finally:
                    await asyncio.to_thread(out.close)
        except BaseException:  # rmtree inline: an await here could itself be cancelled and leave the dir
            shutil.rmtree(staged, ignore_errors=True)
            raise
        label = f"the upload ({', '.join(sorted(files))})"
        return await self._registered(await self.registry.add_staged(name, staged, descriptors, label))

    async def patch(self, name: str, description: str | None, examples: list[str] | None) -> AdapterRecord:
        current = self.registry.get(name).descriptors
        descriptors = validate_descriptors(
            current.description if description is None else description,
            list(current.examples) if examples is None else examples,
        )
        return await self._changed(await self.registry.update_descriptors(name, descriptors))

    async def delete(self, name: str) -> AdapterRecord:
        record = await self.registry.remove(name)
        await self.pool.forget(name)
        return await self._changed(record)

    def adapters(self) -> list[AdapterRecord]:
        return list(self.registry.snapshot().values())

    def show(self, name: str) -> AdapterRecord:
        return self.registry.get(name)

