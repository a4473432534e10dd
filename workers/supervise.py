"""Supervising local workers (``loragate up``): a worker whose process exits is restarted, with backoff.

A vLLM worker exits when its engine dies (its API server shuts down after an ``EngineDeadError``),
when it is killed, or when it runs out of memory. ``loragate up`` started it, so ``up`` restarts
it: after a delay that doubles with each restart that follows a short run (a worker that crashes
at once is not restarted in a tight loop), reset once a run lasted ``healthy_after_s``. The
gateway's pool needs no news of it: the worker left rotation when its probes failed and rejoins
when they pass again, with its adapter state reset.

Each restart is a log line (logger ``loragate.workers.supervise``) and a count per worker URL in a
small JSON file in the data dir (:class:`RestartCounts`), which every gateway process exports as
``loragate_worker_restarts_total{worker}``: with ``processes > 1`` the gateway processes are
uvicorn's forks and share no memory with the supervisor, so a file is the one place they all read.

Threads: the supervisor restarts workers from its own thread, and a worker dies with the thread
that started it (``parent_death``), so that thread also stops every worker before it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from loragate.files import replaced_atomically
from loragate.workers.launch import DEFAULT_START_TIMEOUT_S, WorkerLaunch

log = logging.getLogger(__name__)

RESTARTS_FILE = "worker-restarts.json"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart number ``n`` of a run of quick failures: ``first_s * 2**(n-1)``, at most ``max_s``."""

    first_s: float = 1.0
    max_s: float = 60.0
    healthy_after_s: float = 300.0  # a run at least this long starts the next failure's delay at first_s

    def delay(self, consecutive: int) -> float:
        return float(min(self.max_s, self.first_s * 2 ** max(0, consecutive - 1)))


class RestartCounts:
    """Restarts per worker URL, in ``<data dir>/worker-restarts.json`` (written whole, atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> RestartCounts:
        return cls(data_dir / RESTARTS_FILE)

    def read(self) -> dict[str, int]:
        """The counts; empty without a supervisor (``loragate serve``) or while the file is unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(url): int(n) for url, n in data.items() if isinstance(n, int)}

    def write(self, counts: Mapping[str, int]) -> None:
        with replaced_atomically(self.path) as tmp:
            tmp.write_text(json.dumps(dict(counts)))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def describe_exit(code: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``1`` -> ``"exited with 1"`` (Popen's return codes)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


class Supervised(Protocol):
    """What the supervisor needs of a worker process (``launch.WorkerProcess``)."""

    @property
    def launch(self) -> WorkerLaunch: ...

    @property
    def pid(self) -> int | None: ...

    def exited(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self, grace: float = ...) -> None: ...

    def kill(self) -> None: ...


@dataclass
class _Watch:
    """The supervisor's view of one worker."""

    process: Supervised
    started: float
    consecutive: int = 0  # restarts since the last run that lasted healthy_after_s
    restart_at: float | None = None  # set while an exited worker waits for its restart
    ready: bool = True  # the first start was awaited by the fleet; restarts are awaited here

    @property
    def url(self) -> str:
        return self.process.launch.url


class Supervisor:
    """Watches local worker processes from one thread; restarts exited ones; stops them all at :meth:`stop`."""

    def __init__(self, processes: Sequence[Supervised], counts: RestartCounts, backoff: Backoff = Backoff(),
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S, poll_s: float = 0.5) -> None:
        now = time.monotonic()
        self._watches = [_Watch(p, now) for p in processes]
        self.counts, self.backoff, self.start_timeout_s, self.poll_s = counts, backoff, start_timeout_s, poll_s
        self._restarts = {w.url: 0 for w in self._watches}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loragate-supervisor", daemon=True)

    def start(self) -> None:
        self.counts.write(self._restarts)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop restarting, stop every worker (from the supervisor's thread), and wait for that."""
        self._stopping.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self.poll_s):
                for watch in self._watches:
                    self._check(watch, time.monotonic())
        except Exception:  # pragma: no cover - a supervisor bug must not leave workers unattended and unstopped
            log.exception("worker supervisor failed; no further restarts")
            self._stopping.wait()
        finally:
            for watch in self._watches:
                watch.process.stop()
            self.counts.remove()

    def _check(self, watch: _Watch, now: float) -> None:
        code = watch.process.exited()
        if code is None:
            if not watch.ready:
                self._await_ready(watch, now)
            return
        if watch.restart_at is None:  # just noticed
            ran = now - watch.started
            watch.consecutive = 1 if ran >= self.backoff.healthy_after_s else watch.consecutive + 1
            delay = self.backoff.delay(watch.consecutive)
            watch.restart_at = now + delay
            log.warning("worker %s %s after %.0f s; restarting it in %.1f s", watch.url, describe_exit(code), ran,
                        delay)
        if now >= watch.restart_at:
            watch.process.stop()  # whatever is left of its process group
            watch.process.start()
            watch.started, watch.restart_at, watch.ready = time.monotonic(), None, False
            self._restarts[watch.url] += 1
            self.counts.write(self._restarts)
            log.info("worker %s restarted (pid %s, restart %d)", watch.url, watch.process.pid,
                        self._restarts[watch.url])

    def _await_ready(self, watch: _Watch, now: float) -> None:
        """Log when a restarted worker answers ``/health``; kill it (to be restarted) past the start timeout."""
        try:
            ready = httpx.get(f"{watch.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            watch.ready = True
            log.info("worker %s ready again after %.0f s", watch.url, now - watch.started)
        elif now - watch.started > self.start_timeout_s:
            log.warning("worker %s not ready %.0f s after its restart; killing it", watch.url, self.start_timeout_s)
            watch.process.kill()
