"""The one interface through which the worker pool reports events (metrics live in the server layer).

A base class whose methods all do nothing, rather than a protocol checked with ``isinstance``:
an observer overrides the events it cares about and inherits the rest. The optional-protocol
design it replaces failed silently: an observer missing one method (``panic_routed``, added
later) no longer matched the protocol, so the pool sent it *no* fleet events at all, and the
scheduling benchmark reported 0 evictions. Now a new event is a new no-op method here, every
existing observer keeps receiving everything it implements, and mypy checks that what the pool
is given is an observer.
"""

from __future__ import annotations

__all__ = ["PoolObserver"]


class PoolObserver:
    """Receives the pool's events; every method is a no-op unless overridden."""

    def adapter_loaded(self, worker: str, adapter: str, seconds: float, ok: bool) -> None:
        """A load of ``adapter`` on ``worker`` ended (``ok`` False: it failed) after ``seconds``."""

    def adapters_on_worker(self, worker: str, count: int) -> None:
        """The pool now counts ``count`` adapters loaded on ``worker``."""

    def worker_health(self, worker: str, healthy: bool) -> None:
        """``worker`` left (False) or re-entered (True) rotation."""

    def adapter_evicted(self, worker: str, adapter: str) -> None:
        """``adapter`` was unloaded from ``worker`` to stay under its cap."""

    def adapter_load_failed(self, worker: str, adapter: str, message: str) -> None:
        """``worker`` refused to load ``adapter``: the pair is backed off."""

    def panic_routed(self, worker: str) -> None:
        """A request went to ``worker`` although it is out of rotation (none was in rotation)."""

    def worker_removed(self, worker: str) -> None:
        """``worker`` left the pool (discovery stopped listing it) and its last request ended: nothing
        more will be reported about it unless it joins again."""
