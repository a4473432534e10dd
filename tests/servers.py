"""Running an ASGI app in-process for a test: uvicorn on a background thread, stopped on exit."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


@contextlib.contextmanager
def serving(app: Any, port: int, startup_timeout: float = 30.0, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on ``host:port`` until the block exits; yields its base URL.

    The app's lifespan runs (startup before the block, shutdown after), as under ``loragate serve``.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
