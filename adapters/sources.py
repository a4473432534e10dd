"""Registration from a source URL: ``{"name", "source": "s3://bucket/key/"}``, as LoRAX and AIBrix users
register adapters that already sit in a bucket.

The two PEFT files under the prefix are copied into a fresh staging dir of the store and then
registered exactly like an upload (:meth:`AdapterRegistry.add_staged`: the same validation, the
same errors, the same content addressing), so a source is only ever read once and never trusted
in place. Before anything is downloaded, HEAD requests check that both files exist and that their
sizes fit ``max_adapter_bytes``; the download counts bytes again (an object replaced between HEAD
and GET cannot slip a larger file past the limit).

Only ``s3://`` for now (any S3-compatible endpoint: the store's endpoint and credentials, or boto3's
usual environment chain). Errors speak of the user's URL, never of the staging dir: a bad scheme
is a 400, missing files a 422 naming them, access denied a 403, too large a 413 — all on ``source``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loragate.adapters.objectstore import SCHEME, S3Location, StoreError, error_code
from loragate.adapters.store import ADAPTER_FILES, AdapterStore
from loragate.errors import Forbidden, InvalidRequest, LoragateError, PayloadTooLarge, Unprocessable

PARAM = "source"
_CHUNK = 1 << 20
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                     "AccountProblem", "InvalidToken", "ExpiredToken"})


def parse_source(url: object) -> S3Location:
    """The bucket and prefix of a source URL; a 400 on ``source`` for anything but ``s3://bucket/...``."""
    if not isinstance(url, str) or not url:
        raise InvalidRequest("source must be a URL string such as s3://bucket/path/to/adapter/", param=PARAM)
    if not url.startswith(SCHEME):
        scheme = url.split("://", 1)[0] + "://" if "://" in url else url[:40]
        raise InvalidRequest(f"source {url[:200]!r}: only s3:// URLs are supported for now (not {scheme!r}); "
                             "give the prefix that holds adapter_config.json and adapter_model.safetensors",
                             param=PARAM, code="unsupported_source")
    try:
        return S3Location.parse(url)
    except ValueError:
        raise InvalidRequest(f"source {url[:200]!r} names no bucket: use s3://bucket/path/to/adapter/",
                             param=PARAM, code="invalid_source") from None


class AdapterSources:
    """Copies an adapter's files from a source URL into a staging dir (blocking parts in a thread).

    ``client`` makes the boto3 client on first use, so a gateway that never registers from a URL
    never imports boto3.
    """

    def __init__(self, client: Callable[[], Any]) -> None:
        self._make_client = client
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    async def stage(self, url: object, store: AdapterStore, max_bytes: int) -> Path:
        """A new staging dir of ``store`` holding the source's PEFT files; the caller registers or removes it."""
        location = parse_source(url)
        assert isinstance(url, str)
        return await asyncio.to_thread(self._stage, url, location, store, max_bytes)

    def _stage(self, url: str, location: S3Location, store: AdapterStore, max_bytes: int) -> Path:
        sizes = self._sizes(url, location)
        total = sum(sizes.values())
        if total > max_bytes:
            raise PayloadTooLarge(f"adapter files under {url} are {total} bytes, above the limit of {max_bytes} "
                                  "bytes", param=PARAM)
        staged = store.new_staging_dir()
        try:
            written = 0
            for name in ADAPTER_FILES:
                written += self._download(url, location, name, staged / name, max_bytes - written)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def _sizes(self, url: str, location: S3Location) -> dict[str, int]:
        sizes: dict[str, int] = {}
        missing = []
        for name in ADAPTER_FILES:
            try:
                head = self._s3().head_object(Bucket=location.bucket, Key=location.key(name))
            except Exception as exc:
                if error_code(exc) in _MISSING:
                    missing.append(name)
                    continue
                raise self._error(url, location, exc) from exc
            sizes[name] = int(head["ContentLength"])
        if missing:
            if len(missing) == len(ADAPTER_FILES):
                self._check_bucket(url, location)
            raise Unprocessable(f"source {url} has no {' and no '.join(missing)} (looked for "
                                f"{', '.join(location.url(location.key(n)) for n in missing)})", param=PARAM,
                                code="source_files_missing")
        return sizes

    def _check_bucket(self, url: str, location: S3Location) -> None:
        """Name a missing bucket as such (HEAD of an object in it only says 404)."""
        try:
            self._s3().head_bucket(Bucket=location.bucket)
        except Exception as exc:
            if error_code(exc) in _MISSING | _NO_BUCKET:
                raise Unprocessable(f"source {url}: bucket {location.bucket!r} does not exist", param=PARAM,
                                    code="source_not_found") from exc
            raise self._error(url, location, exc) from exc

    def _download(self, url: str, location: S3Location, name: str, target: Path, budget: int) -> int:
        try:
            response = self._s3().get_object(Bucket=location.bucket, Key=location.key(name))
            written = 0
            with target.open("wb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > budget:
                        raise PayloadTooLarge(f"adapter files under {url} grew past the limit while downloading",
                                              param=PARAM)
                    out.write(chunk)
            return written
        except LoragateError:
            raise
        except OSError:
            raise  # writing the staging copy failed: the server's problem, not the client's
        except Exception as exc:
            if error_code(exc) in _MISSING:
                raise Unprocessable(f"source {url}: {name} disappeared while downloading", param=PARAM,
                                    code="source_files_missing") from exc
            raise self._error(url, location, exc) from exc

    @staticmethod
    def _error(url: str, location: S3Location, exc: BaseException) -> LoragateError:
        """What the store said, in the user's terms: the URL, never a temp path or a traceback."""
        code = error_code(exc)
        if code in _DENIED:
            return Forbidden(f"source {url}: access denied by the object store ({code}); the gateway's "
                             f"credentials cannot read s3://{location.bucket}", param=PARAM, code="source_forbidden")
        if code in _NO_BUCKET:
            return Unprocessable(f"source {url}: bucket {location.bucket!r} does not exist", param=PARAM,
                                 code="source_not_found")
        if code is not None:
            return Unprocessable(f"source {url}: the object store refused the request ({code})", param=PARAM,
                                 code="source_unreadable")
        return StoreError(f"source {url}: the object store cannot be reached: {exc}", param=PARAM)
