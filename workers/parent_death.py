"""Worker processes that die with their parent: no vLLM engine left behind holding GBs.

A vLLM worker is three processes: the API server, the engine core it starts, and the engine's
model worker. SIGKILL the API server (or ``loragate up`` above it) and, without help, the other
two keep running, reparented to init, with the model and KV cache in memory and no one to talk
to. Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) makes the kernel kill a process
when the thread that forked it ends, however it ends. The setting is cleared in a forked child
and kept across ``exec``, so:

- loragate starts the API server with :func:`die_with_parent` as ``preexec_fn`` (see
  ``launch.WorkerProcess``): it dies with the thread that started it;
- :func:`register`, a ``vllm.general_plugins`` entry point (vLLM runs those in each of its
  processes), sets it in every process vLLM forks or spawns, so each engine process dies with
  the vLLM process that started it. A ``loragate worker`` API server that a shell started is left
  alone: only processes whose parent is a vLLM process get it from the plugin.

Elsewhere than Linux these are no-ops (process groups still let ``loragate up`` stop the rest).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1
_forking_pid = 0
"""Pid of the process that last forked, recorded before each fork: a child compares its parent with it."""


def _prctl() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        prctl: Callable[..., Any] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    return None


_PRCTL = _prctl()  # looked up once: a preexec_fn runs between fork and exec, where loading a library is unsafe


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (the forking thread) ends; True if set.

    With ``parent`` given, a process whose parent already ended (between fork and this call)
    exits at once, since no signal would come.
    """
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(128 + sig)
    return True


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(parent=_forking_pid)


_installed = False


def register() -> None:
    """``vllm.general_plugins`` entry point: every process this vLLM process starts dies with it.

    Forked children get it from an at-fork hook (a fork copies this process, plugins included,
    and vLLM does not run the plugins again there); spawned children are fresh interpreters that
    run this plugin themselves, and know they are children from ``multiprocessing``.
    """
    global _installed
    if not _installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _installed = True
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent=parent.pid)
