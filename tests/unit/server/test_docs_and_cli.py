"""The README and `--help` tell the truth about options, metrics and commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loragate.server.cli import app
from loragate.server.metrics import GatewayMetrics
from loragate.server.settings import Settings

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"^make (\w+)", README, flags=re.M)
    assert commands[:2] == ["demo", "test"]


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_option_is_documented(name: str) -> None:
    assert f"`LORAGATE_{name.upper()}`" in README
    assert Settings.model_fields[name].description


def test_every_metric_is_documented() -> None:
    names = {m.name for m in GatewayMetrics.catalogue().registry.collect()}
    assert names, "no metrics collected"
    missing = [n for n in names if f"`{n}" not in README]
    assert not missing


@pytest.mark.parametrize("command", [[], ["serve"], ["up"], ["worker"], ["adapters"], ["adapters", "add"],
                                     ["adapters", "ls"], ["adapters", "show"], ["adapters", "rm"],
                                     ["outcomes"], ["auto"], ["loadtest"], ["stub"], ["demo"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_serve_help_lists_every_option() -> None:
    output = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for name in Settings.model_fields:
        assert f"LORAGATE_{name.upper()}" in output


def test_set_rejects_unknown_options() -> None:
    result = CliRunner().invoke(app, ["serve", "--set", "colour=blue"])
    assert result.exit_code != 0
    assert "expected name=value" in result.output


def test_demo_runs_the_checkout_script_and_passes_options_on(tmp_path: Path) -> None:
    """`loragate demo` runs examples/demo.py of a checkout; without one it says where it looked."""
    result = CliRunner().invoke(app, ["demo", "--repo", str(tmp_path)])
    assert result.exit_code == 2 and "examples/demo.py not found" in result.output
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "demo.py").write_text("import sys; print('args', sys.argv[1:]); sys.exit(3)")
    done = subprocess.run([sys.executable, "-m", "loragate.server.cli", "demo", "--repo", str(tmp_path), "--",
                           "--per-cell", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "args ['--per-cell', '2']" in done.stdout
