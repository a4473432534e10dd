"""`loragate adapters add --upload` against a recording stand-in gateway: the upload is streamed
(memory stays flat for a large file), refused before sending when over the limit, and an empty dir
says so. The stand-in drains what it is sent, so no test depends on the gateway's own speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loragate.server.cli import app
from loragate.workers.launch import free_port


@dataclass
class Recorder:
    """What the stand-in gateway received."""

    limit: int | None = 1 << 40
    requests: list[tuple[str, str, dict[str, str], int]] = field(default_factory=list)  # method, path, headers, bytes


def _handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _answer(self, status: int, body: object) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            recorder.requests.append(("GET", self.path, dict(self.headers), 0))
            if recorder.limit is None:
                self._answer(404, {"error": {"message": "not found"}})
            else:
                self._answer(200, {"max_adapter_bytes": recorder.limit, "max_lora_rank": 16})

        def do_POST(self) -> None:
            left = int(self.headers.get("content-length") or 0)
            received = 0
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                received += len(chunk)
                left -= len(chunk)
            recorder.requests.append(("POST", self.path, dict(self.headers), received))
            self._answer(201, {"name": "big", "sha256": "0" * 64})

    return Handler


@pytest.fixture
def gateway() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(recorder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()


def _adapter_dir(directory: Path, weights_bytes: int) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with (directory / "adapter_model.safetensors").open("wb") as handle:
        handle.truncate(weights_bytes)  # sparse: no disk, no page cache until read
    return directory


def add(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["adapters", "add", *args, "--url", url, "--token", "t"], terminal_width=200)
    return result.exit_code, result.output


def test_an_empty_dir_says_so_and_sends_nothing(tmp_path: Path, gateway: tuple[str, Recorder]) -> None:
    url, recorder = gateway
    (tmp_path / "empty").mkdir()
    code, out = add(url, "x", str(tmp_path / "empty"), "--upload")
    assert code == 1 and f"no adapter files in {tmp_path / 'empty'}" in out
    code, out = add(url, "x", str(tmp_path / "missing"), "--upload")
    assert code == 1 and "is not a directory" in out
    assert recorder.requests == []


def test_an_adapter_over_the_gateways_limit_is_refused_before_sending(tmp_path: Path,
                                                                      gateway: tuple[str, Recorder]) -> None:
    url, recorder = gateway
    recorder.limit = 1000
    directory = _adapter_dir(tmp_path / "a", 4000)
    code, out = add(url, "a", str(directory), "--upload")
    assert code == 1 and "above the limit of 1000 bytes" in out and "nothing was sent" in out
    assert [(m, p) for m, p, _, _ in recorder.requests] == [("GET", "/admin/limits")]
    recorder.requests.clear()
    code, out = add(url, "a", str(directory), "--upload", "--max-bytes", "100")  # the user's own limit
    assert code == 1 and "above the limit of 100 bytes" in out and recorder.requests == []
    recorder.limit = None  # an older gateway without /admin/limits: the upload goes, the gateway decides
    code, out = add(url, "a", str(directory), "--upload")
    assert code == 0, out
    assert [(m, p) for m, p, _, _ in recorder.requests] == [("GET", "/admin/limits"), ("POST", "/admin/adapters")]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_a_large_upload_is_streamed_with_flat_memory(tmp_path: Path, gateway: tuple[str, Recorder]) -> None:
    """512 MiB of weights: read into memory (as before) the CLI's peak RSS is above 512 MiB; streamed it
    stays near the interpreter's own size."""
    url, recorder = gateway
    size = 512 << 20
    directory = _adapter_dir(tmp_path / "big", size)
    report = "import atexit, sys; atexit.register(lambda: sys.stderr.write(" \
             "[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]))"
    result = subprocess.run(
        [sys.executable, "-c", f"{report}\nfrom loragate.server.cli import main; main()", "adapters", "add", "big",
         str(directory), "--upload", "--url", url, "--token", "t"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.rsplit("VmHWM:", 1)[1].split()[0])
    posts = [r for r in recorder.requests if r[0] == "POST"]
    assert len(posts) == 1 and posts[0][3] >= size  # every byte arrived, in one multipart body
    assert posts[0][2]["Content-Type"].startswith("multipart/form-data")
    assert peak_kib < (size >> 10) // 2, f"peak RSS {peak_kib} KiB for a {size >> 20} MiB upload"
