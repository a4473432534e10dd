"""An S3-protocol server for the tests: moto's server in its own process, one per test session.

Why moto: MinIO does not install on these machines (neither Debian nor PyPI has it); PyPI
``moto[server]`` runs a real HTTP server speaking the S3 REST protocol, so the code under test goes
through boto3, botocore's signing, retries and HTTP exactly as against a real store. It runs as a
separate process (``python -m moto.server``), so its Flask threads never share the GIL or the event
loop with the code under test, and it is stopped at the end of the session.

What moto does not cover compared with real S3 (or MinIO): it keeps everything in memory (no
durability, no crash behaviour); by default it accepts any credentials and enforces no bucket policies or IAM
(the ``locked_s3_server`` fixture turns its IAM check on, so that every request with the test
credentials is refused with 403, which is all "access denied" tests need; policies themselves are
not exercised); it ignores a client-supplied ``ChecksumSHA256`` that does not match the body (real S3
answers BadDigest) but does compute and return the SHA-256 of what it received when asked with
``ChecksumAlgorithm`` (which is what :class:`loragate.adapters.objectstore.ObjectDirs` checks); it
has no real consistency model or latency, no request-rate limits, and LastModified is its own
clock (the garbage-collection tests backdate it by moving the store's grace period instead).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from loragate.adapters.objectstore import s3_client
from loragate.workers.launch import free_port

REGION = "us-east-1"
KEY_ID = "testing"
SECRET = "testing"  # moto accepts any credentials


@dataclass(frozen=True)
class S3Server:
    """A running moto server: its endpoint and a client factory with the test credentials."""

    endpoint: str

    def client(self) -> Any:
        return s3_client(self.endpoint, REGION, KEY_ID, SECRET)

    def new_bucket(self) -> str:
        """A fresh empty bucket (tests share the server, never a bucket)."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _wait_up(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[S3Server]:
    """moto's server in its own process on a free port, stopped when the block exits."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_up(endpoint, proc)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def locked_s3_server() -> Iterator[S3Server]:
    """A moto server that checks credentials: the test credentials exist in no IAM user, so every request
    is refused (403 AccessDenied / InvalidAccessKeyId), as a real store answers a gateway without rights."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as server:
        yield server
