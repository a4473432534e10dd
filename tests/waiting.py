"""Bounded waits for a condition, instead of fixed sleeps (a fixed sleep before an assert is a race on a
busy machine: a descheduled process resumes the test before the work it waits for has happened)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], wait_s: float = 30.0) -> None:
    """Yield to the loop until ``condition`` holds; fail after ``wait_s``."""
    for _ in range(int(wait_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition still false after {wait_s:.0f} s")
