"""`loragate loadtest`/`stub` help and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loragate.server.cli import app


@pytest.mark.parametrize("command", ["loadtest", "stub"])
def test_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_loadtest_refuses_a_remote_target_before_sending() -> None:
    result = CliRunner().invoke(app, ["loadtest", "--url", "http://192.0.2.1:8000", "-n", "1", "--no-progress"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output


def test_loadtest_rejects_bad_headers_and_workloads(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["loadtest", "--header", "no-colon"])
    assert result.exit_code != 0
    bad = tmp_path / "w.jsonl"
    bad.write_text("{oops\n")
    result = CliRunner().invoke(app, ["loadtest", "--workload", str(bad)])
    assert result.exit_code == 2
    assert "w.jsonl:1" in result.output
