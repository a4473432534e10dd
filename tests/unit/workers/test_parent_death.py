"""Processes that die with their parent: the API server's preexec_fn and the vLLM plugin's at-fork hook.

Each test runs a stand-in parent (a small Python process), SIGKILLs it, and polls for its child to
be gone: what happens to a vLLM engine when its API server, or ``loragate up``, is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

PREEXEC = """
import subprocess, sys
from loragate.workers.parent_death import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=die_with_parent)
print(child.pid, flush=True)
sys.stdin.read()
"""

AT_FORK = """
import os, sys, time
from loragate.workers.parent_death import register
register()  # what vLLM does with its general plugins, in the process that then forks its engine
pid = os.fork()
if pid == 0:
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
sys.stdin.read()
"""

NO_HOOK = AT_FORK.replace("register()", "pass")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def child_of_killed_parent(script: str) -> int:
    """Start ``script`` as the parent, read its child's pid, SIGKILL the parent; the child's pid."""
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    return child


@pytest.mark.parametrize("script", [PREEXEC, AT_FORK], ids=["preexec_fn", "plugin-at-fork"])
def test_the_child_dies_when_its_parent_is_sigkilled(script: str) -> None:
    child = child_of_killed_parent(script)
    assert wait_gone(child), f"child {child} outlived its SIGKILLed parent"


def test_without_the_hook_a_forked_child_outlives_its_parent() -> None:
    """The control: what the engine processes did before (reparented to init, still running)."""
    child = child_of_killed_parent(NO_HOOK)
    try:
        assert alive(child) and not wait_gone(child, timeout=1.0)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    """The window between fork and prctl: die_with_parent(parent=...) checks the parent is still there."""
    code = "from loragate.workers.parent_death import die_with_parent; die_with_parent(parent=1); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGKILL and "alive" not in done.stdout
