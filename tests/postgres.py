"""A real PostgreSQL server for the tests: Debian's binaries, a throwaway cluster, a free port.

The binaries come from Debian's ``postgresql`` package, installed with apt-get where they are
missing (as the Prometheus test installs Prometheus); the test is skipped only where apt-get itself
does not exist. ``initdb`` and ``postgres`` refuse to run as root, so as root the cluster belongs to
an unprivileged user (Debian's ``postgres``, or one this module creates). ``fsync=off``: the tests
kill gateways, never the machine, so the server's own crash durability is not under test and a
database per test stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from loragate.workers.launch import free_port
from tests.debian import installed

_USER = "postgres"
_FALLBACK_USER = "loragate-test"


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def postgres_bin_dir() -> Path:
    """Where ``initdb``/``pg_ctl`` live, installing Debian's ``postgresql`` when they are missing."""
    installed("postgresql", _bin_dir)
    found = _bin_dir()
    assert found is not None
    return found


def _server_user() -> str | None:
    """The unprivileged user that owns the cluster when the tests run as root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in (_USER, _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", _FALLBACK_USER], check=True, capture_output=True)
    return _FALLBACK_USER


@dataclass
class PostgresServer:
    """One cluster on 127.0.0.1:``port``, superuser ``loragate`` with trust authentication."""

    bin_dir: Path
    root: Path
    port: int
    user: str | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://loragate@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stdout}\n{result.stderr}")

    def init(self) -> None:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "loragate", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started cluster in its own temp dir (not pytest's: the server's user must be able to reach it)."""
    root = Path(tempfile.mkdtemp(prefix="loragate-pg-"))
    server = PostgresServer(bin_dir=postgres_bin_dir(), root=root, port=free_port(), user=_server_user())
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
