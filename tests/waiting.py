"""Bounded waits for a condition, instead of fixed sleeps (a fixed sleep before an assert is a race on a
busy machine: a descheduled process resumes the test before the work it waits for has happened)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], bool], wait_s: float = 30.0) -> None:
    """Yield to the loop until ``condition`` holds; fail after ``wait_s``."""
    for _ in range(int(wait_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition still false after {wait_s:.0f} s")


def eventually(condition: Callable[[], bool], wait_s: float = 30.0) -> float:
    """Block (polling every 10 ms) until ``condition`` holds; returns the seconds it took, fails after ``wait_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > wait_s:
            raise AssertionError(f"condition still false after {wait_s:.0f} s")
        time.sleep(0.01)
    return time.monotonic() - started
