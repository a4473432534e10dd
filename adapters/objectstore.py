"""Adapter files (and merges) in an S3-compatible object store, with a bounded local cache per replica.

Why: replicas on several hosts share no disk, so the content-addressed store moves to a bucket
(``store_url=s3://bucket/prefix``) and each replica keeps the files it serves in its local dir,
which becomes a cache (``store_cache_bytes``, least recently used by bytes). Layout::

    <prefix>/adapters/<sha256>/adapter_config.json        registered adapters, by content hash
    <prefix>/adapters/<sha256>/adapter_model.safetensors
    <prefix>/merges/<key>/...                             merged adapters (see merge_cache.py)

Integrity, both ways:

- upload: each object is PUT with ``ChecksumAlgorithm=SHA256``; the store computes the SHA-256 of
  the bytes it received and returns it, and :meth:`ObjectDirs.upload` compares that with the
  digest of the local file (a store that returns no checksum is verified by reading the object
  back). The hex digest is also kept as object metadata (``x-amz-meta-sha256``).
- download: every file is hashed while it streams to a private staging dir and compared with its
  recorded digest, and an adapter's dir with :meth:`AdapterStore.content_hash` against its
  sha256, before the dir is renamed into the cache: a corrupted or replaced object is an error
  naming its key, and nothing is cached.

boto3 is blocking: every call here runs in a thread (the registry's writer threads call commit,
remove and collect_garbage; :meth:`S3Store.materialize` hops to a thread itself). One boto3 client
is shared by those threads (clients are thread-safe; sessions are not).

Single PUTs carry up to 5 GiB per object (the adapter limit is 2 GiB by default); multipart upload
is not used, so every object's checksum is a plain SHA-256 of its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from loragate.adapters.staging import new_dir
from loragate.adapters.store import ADAPTER_FILES, AdapterStore, LruDirs, dir_size, has_files, remove_all, touch
from loragate.errors import ConfigError, UpstreamError

SCHEME = "s3://"
#: Objects no row references are deleted only once older than this: another replica may be between
#: its upload and its row insert.
GC_GRACE_S = 3600.0
#: The largest single PUT S3 accepts.
MAX_OBJECT_BYTES = 5 << 30
_CHUNK = 1 << 20
_META = "sha256"


class StoreError(UpstreamError):
    """The object store failed or holds something wrong (502): a dependency's failure, never the client's."""

    default_code = "object_store_error"


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class StoreSettings(Protocol):
    """What :func:`open_store` reads (the gateway's Settings has these fields)."""

    @property
    def store_url(self) -> str | None: ...

    @property
    def s3_endpoint_url(self) -> str | None: ...

    @property
    def s3_region(self) -> str | None: ...

    @property
    def s3_access_key_id(self) -> _Secret | None: ...

    @property
    def s3_secret_access_key(self) -> _Secret | None: ...

    @property
    def store_cache_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith(SCHEME) or not url[len(SCHEME):].split("/")[0]:
            raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, key: str = "") -> str:
        return f"{SCHEME}{self.bucket}/{key}"

    def child(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, self.key(*parts))


def s3_client(endpoint_url: str | None = None, region: str | None = None, access_key_id: str | None = None,
              secret_access_key: str | None = None) -> Any:
    """A boto3 S3 client; what is None comes from boto3's usual chain (AWS_ENDPOINT_URL, AWS_REGION,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, credential files, an instance role). Imported here, so
    the embedded default never pays for importing boto3."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                    region_name=region)
    return session.client("s3", endpoint_url=endpoint_url, config=Config(
        retries={"mode": "standard", "max_attempts": 4}, max_pool_connections=32, connect_timeout=10,
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))


def client_from(settings: StoreSettings) -> Any:
    def secret(value: _Secret | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    return s3_client(settings.s3_endpoint_url, settings.s3_region, secret(settings.s3_access_key_id),
                     secret(settings.s3_secret_access_key))


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ("404", "NoSuchKey", "AccessDenied", ...), else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


class ObjectDirs:
    """Directories of objects under one location: ``<location>/<name>/<file>`` (blocking calls)."""

    def __init__(self, client: Any, location: S3Location) -> None:
        self.client = client
        self.location = location

    def key(self, name: str, file: str = "") -> str:
        return self.location.key(name, file)

    def url(self, name: str, file: str = "") -> str:
        return self.location.url(self.key(name, file)) + ("" if file else "/")

    def _fail(self, what: str, key: str, exc: BaseException) -> StoreError:
        return StoreError(f"object store: cannot {what} {self.location.url(key)}: {exc}")

    def upload(self, directory: Path, name: str, files: Iterable[str]) -> bool:
        """Upload ``files`` of ``directory`` under ``name``, each verified; returns whether anything was
        sent (False: every object was already there with the same SHA-256)."""
        sent = False
        for file in files:
            path = directory / file
            size = path.stat().st_size
            if size > MAX_OBJECT_BYTES:
                raise StoreError(f"{file} is {size} bytes, above the object store's single-upload limit of "
                                 f"{MAX_OBJECT_BYTES} bytes")
            digest = file_digest(path)
            key = self.key(name, file)
            if self._has(key, digest, size):
                continue
            try:
                with path.open("rb") as body:
                    response = self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body,
                                                      ContentLength=size, ChecksumAlgorithm="SHA256",
                                                      Metadata={_META: digest.hex()})
            except Exception as exc:
                raise self._fail("upload", key, exc) from exc
            stored = response.get("ChecksumSHA256")
            if stored is None:  # a store without flexible checksums: read it back
                stored = _b64(self._read_digest(key))
            if stored != _b64(digest):
                raise StoreError(f"object store: {self.location.url(key)} was stored with SHA-256 {stored}, "
                                 f"but the file sent has {_b64(digest)}")
            sent = True
        return sent

    def _has(self, key: str, digest: bytes, size: int) -> bool:
        """Whether ``key`` already holds these bytes (content-addressed: a second registration of the
        same files, or a merge another replica uploaded)."""
        try:
            head = self.client.head_object(Bucket=self.location.bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as exc:
            if error_code(exc) in _MISSING:
                return False
            raise self._fail("look up", key, exc) from exc
        recorded = head.get("Metadata", {}).get(_META)
        return bool(head.get("ContentLength") == size and recorded == digest.hex()
                    and head.get("ChecksumSHA256", _b64(digest)) == _b64(digest))

    def _read_digest(self, key: str) -> bytes:
        digest = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
        except Exception as exc:
            raise self._fail("read back", key, exc) from exc
        return digest.digest()

    def exists(self, name: str, file: str) -> bool:
        key = self.key(name, file)
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in _MISSING:
                return False
            raise self._fail("look up", key, exc) from exc
        return True

    def download(self, name: str, files: Iterable[str], into: Path) -> None:
        """Stream ``files`` into ``into``, each hashed on the way and compared with its recorded SHA-256,
        and fsynced (the caller renames ``into`` into a cache that is trusted after a crash)."""
        for file in files:
            key = self.key(name, file)
            digest = hashlib.sha256()
            try:
                response = self.client.get_object(Bucket=self.location.bucket, Key=key)
                with (into / file).open("wb") as out:
                    for chunk in response["Body"].iter_chunks(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except Exception as exc:
                if error_code(exc) in _MISSING:
                    raise StoreError(f"object store: {self.location.url(key)} is missing",
                                     code="object_missing") from exc
                raise self._fail("download", key, exc) from exc
            recorded = response.get("Metadata", {}).get(_META)
            if recorded != digest.hexdigest():
                raise StoreError(f"object store: {self.location.url(key)} is corrupt: its bytes hash to "
                                 f"{digest.hexdigest()}, but {recorded or 'no sha256'} was recorded at upload; "
                                 "refused, nothing cached", code="object_corrupt")

    def delete(self, name: str) -> int:
        """Delete every object under ``name``; returns how many went."""
        keys = [key for key, _ in self._list(self.key(name) + "/")]
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            try:
                self.client.delete_objects(Bucket=self.location.bucket,
                                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except Exception as exc:
                raise self._fail("delete", self.key(name), exc) from exc
        return len(keys)

    def _list(self, prefix: str) -> list[tuple[str, datetime]]:
        found: list[tuple[str, datetime]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                             Prefix=prefix):
                found.extend((item["Key"], item["LastModified"]) for item in page.get("Contents", ()))
        except Exception as exc:
            raise self._fail("list", prefix, exc) from exc
        return found

    def names(self) -> dict[str, float]:
        """Every dir name under the location -> the newest LastModified of its objects (POSIX seconds)."""
        base = self.location.key() + "/" if self.location.prefix else ""
        newest: dict[str, float] = {}
        for key, modified in self._list(base):
            name = key[len(base):].split("/", 1)[0]
            newest[name] = max(newest.get(name, 0.0), modified.timestamp())
        return newest


class S3Store(AdapterStore):
    """The content-addressed store in a bucket; ``root`` (this replica's disk) holds a bounded cache.

    Staging, validation and the content hash are the local store's; :meth:`commit` uploads before
    the staged dir becomes the cache entry, so a registry row is only ever written for content that
    is durable in the bucket, and any replica can :meth:`materialize` it.
    """

    def __init__(self, root: Path, client: Any, location: S3Location, *, cache_bytes: int,
                 grace_s: float = GC_GRACE_S) -> None:
        super().__init__(root)
        self.location = location
        self.objects = ObjectDirs(client, location.child("adapters"))
        self.grace_s = grace_s
        self.cache = LruDirs(root, self.staging, cache_bytes)
        self.downloads = 0  # completed downloads since construction (the test of shared downloads reads it)
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self.cache.scan(lambda entry: has_files(entry))
        remove_all(self.cache.evict())

    def merges(self) -> ObjectDirs:
        """Where merged adapters are shared between replicas (``<prefix>/merges/<key>/``)."""
        return ObjectDirs(self.objects.client, self.location.child("merges"))

    # -- writing (the registry's threads) ----------------------------------------------------------
    def commit(self, staged: Path, sha256: str) -> tuple[Path, bool]:
        """Upload (verified), then keep the staged dir as this replica's cache entry. ``created``: objects
        were sent (False: the bucket held this content already, e.g. registered on another replica)."""
        created = self.objects.upload(staged, sha256, ADAPTER_FILES)
        size = dir_size(staged)
        target, _ = super().commit(staged, sha256)
        self.cache.add(sha256, size)
        remove_all(self.cache.evict(protect=sha256))
        return target, created

    def remove(self, sha256: str) -> None:
        """Delete the objects, then this replica's copy (another replica's copy goes with its next
        collection, or when a request finds the row gone)."""
        self.objects.delete(sha256)
        self.cache.discard(sha256)
        super().remove(sha256)

    def collect_garbage(self, referenced: set[str]) -> list[str]:
        """The local collection, plus objects under adapters/ no row references that are older than
        the grace period (younger ones may belong to a registration still between upload and row)."""
        removed = super().collect_garbage(referenced)
        for name in removed:
            self.cache.discard(name)
        cutoff = time.time() - self.grace_s
        for name, modified in self.objects.names().items():
            if name not in referenced and modified < cutoff:
                self.objects.delete(name)
                removed.append(self.objects.url(name))
        return removed

    # -- reading (the event loop) --------------------------------------------------------------------
    def held(self, sha256s: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        return self.cache.leased(sha256s)

    async def materialize(self, sha256: str) -> Path:
        """The local dir of ``sha256``, downloaded and verified on a miss; concurrent callers share one
        download (a task awaited through ``shield``: one caller's cancellation does not cancel it)."""
        target = self.path_for(sha256)
        if sha256 in self.cache:
            with self.cache.leased([sha256]):
                present = await asyncio.to_thread(touch, target)
            if present and self.cache.used(sha256):
                return target
            self.cache.discard(sha256)  # removed behind our back: fetch it again
        task = self._inflight.get(sha256)
        if task is None:
            task = asyncio.create_task(self._fetch(sha256))
            self._inflight[sha256] = task
            task.add_done_callback(functools.partial(self._forget, sha256))
        return await asyncio.shield(task)

    def _forget(self, sha256: str, task: asyncio.Task[Path]) -> None:
        self._inflight.pop(sha256, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaits any more is no asyncio warning

    async def _fetch(self, sha256: str) -> Path:
        size = await asyncio.to_thread(self._download, sha256)
        self.cache.add(sha256, size)
        victims = self.cache.evict(protect=sha256)
        if victims:
            await asyncio.to_thread(remove_all, victims)
        return self.path_for(sha256)

    def _download(self, sha256: str) -> int:
        target = self.path_for(sha256)
        if has_files(target):  # renamed in by another process sharing this dir (it verified it)
            return dir_size(target)
        staged = new_dir(self.staging)
        try:
            self.objects.download(sha256, ADAPTER_FILES, staged)
            actual, size = self.content_hash(staged)
            if actual != sha256:
                raise StoreError(f"object store: {self.objects.url(sha256)} holds content with sha256 {actual}, "
                                 "not its address; refused, nothing cached", code="object_corrupt")
            try:
                staged.rename(target)
            except OSError:
                if not has_files(target):
                    raise
                shutil.rmtree(staged, ignore_errors=True)
            self.downloads += 1
            return size
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


def open_store(data_dir: Path, settings: StoreSettings, *, grace_s: float = GC_GRACE_S) -> AdapterStore:
    """The adapter store the settings ask for: ``data_dir/adapters`` alone (store_url unset), or the
    bucket with ``data_dir/adapters`` as this replica's cache. Checks the bucket is reachable now
    (blocking, at startup), so a wrong URL or credentials stop the gateway with one line."""
    root = data_dir / "adapters"
    if settings.store_url is None:
        return AdapterStore(root)
    location = S3Location.parse(settings.store_url)
    client = client_from(settings)
    try:
        client.head_bucket(Bucket=location.bucket)
    except Exception as exc:
        raise ConfigError(f"store_url {settings.store_url}: the bucket cannot be reached: {exc}",
                          param="store_url") from exc
    return S3Store(root, client, location, cache_bytes=settings.store_cache_bytes, grace_s=grace_s)
