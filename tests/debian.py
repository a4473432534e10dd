"""Real tools from Debian's packages for the tests: found on PATH, else installed with apt-get.

The project installs what it needs by its own files, never by hand: a test that needs Prometheus,
PostgreSQL or kubectl installs the package where it is missing, and is skipped only where apt-get
itself does not exist (another distribution: the message says what to install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def installed(package: str, found: Callable[[], object]) -> None:
    """Make sure ``found()`` is truthy, installing Debian's ``package`` first if it is not."""
    if found():
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"{package} is not installed and apt-get is unavailable to install it (install Debian's "
                    f"`{package}` package)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update"], check=True, timeout=300, env=env, capture_output=True)
    subprocess.run([apt, "install", "-y", "--no-install-recommends", package], check=True, timeout=600, env=env,
                   capture_output=True)
    assert found(), f"apt-get installed {package} but what the test needs is still missing"


def debian_tools(package: str, *names: str) -> list[str]:
    """Paths of the executables ``names`` on PATH, from Debian's ``package`` when any is missing."""
    installed(package, lambda: all(shutil.which(name) for name in names))
    return [str(shutil.which(name)) for name in names]


def docker_compose_config(compose_file: str, env: dict[str, str], cwd: str) -> subprocess.CompletedProcess[str]:
    """``docker compose -f FILE config`` (client only; no engine runs here), skipped without the compose plugin."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here: cannot run `docker compose config`")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        pytest.skip(f"the docker compose plugin is missing: {version.stderr.strip() or version.stdout.strip()}")
    return subprocess.run([docker, "compose", "-f", compose_file, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=cwd)
