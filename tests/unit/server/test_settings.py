"""Settings precedence: overrides > env > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loragate.server.settings import CONFIG_ENV, load_settings


@pytest.fixture(autouse=True)
def _restore_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_settings(config_file)`` exports LORAGATE_CONFIG (child processes read it); undo that after
    each test. ``delenv`` on an absent variable records nothing to restore, so set it first."""
    monkeypatch.setenv(CONFIG_ENV, "unset-by-fixture")
    monkeypatch.delenv(CONFIG_ENV)


def test_toml_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "loragate.toml"
    config.write_text('port = 9001\nmodel = "from-file"\nworkers = ["http://w1:8100/", "http://w2:8100"]\n')
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("LORAGATE_MODEL", "from-env")
    settings = load_settings(config)
    assert settings.port == 9001
    assert settings.model == "from-env"
    assert settings.workers == ["http://w1:8100", "http://w2:8100"]
    assert load_settings(config, port=9002).port == 9002


def test_unknown_or_invalid_options_fail_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    config = tmp_path / "bad.toml"
    config.write_text("colour = 'blue'\n")
    with pytest.raises(ValidationError, match="colour"):
        load_settings(config)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(ValidationError, match="port"):
        load_settings(port=0)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_settings_survive_the_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loragate.server.settings import to_environment

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    original = load_settings(port=9100, workers=["http://a:1", "http://b:2"], admin_token="s3cret",
                             import_roots=[str(tmp_path)], processes=2, shadow_rate=0.25)
    env = to_environment(original)
    assert env["LORAGATE_ADMIN_TOKEN"] == "s3cret"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == original


@pytest.mark.parametrize(("setting", "fragment"), [
    ('workers=["ftp://w:1"]', "must start with http://"),
    ("scheduling=bogus", "unknown scheduling strategy 'bogus'"),
    ('scheduling_weights={"load": -1}', "scheduling weight of 'load'"),
    ("adapter_delivery=carrier", "unknown adapter delivery"),
    ("embedder=bogus", "unknown embedder backend 'bogus'"),
    ("compositional_detector=zzz", "unknown compositional detector"),
    ("index_aggregate=mean", "unknown index aggregate"),
    ("default_policy=pin;;", "default_policy: cannot parse"),
    ("default_policy=nearest", "default_policy: unsupported adapter policy 'nearest'"),
    ("default_policy=base;k=2", "default_policy: policy 'base' does not take ['k']"),
    ("default_policy=select", "default_policy: policy 'select' needs semantic routing"),  # with embedder=none
    ("shadow_policy=average;bogus=1", "shadow_policy: policy 'average' does not take ['bogus']"),
    ('workers=["http://w:1", "http://w:1/"]', "duplicate worker URLs"),
    ("port=notanint", "port: Input should be a valid integer"),
])
def test_a_configuration_mistake_stops_the_gateway_with_one_line(tmp_path: Path, setting: str, fragment: str) -> None:
    """Before anything starts (no worker, no model load): exit 2, one line naming the mistake, no traceback."""
    from typer.testing import CliRunner

    from loragate.server.cli import app

    extra = ["--set", "embedder=none"] if setting == "default_policy=select" else []
    result = CliRunner().invoke(app, ["serve", "--set", f"data_dir={tmp_path}", "--set", setting, *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loragate: configuration error: "), result.output
    assert fragment in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "registry.sqlite3").exists()  # stopped before wiring anything


def test_create_app_raises_config_error_not_invalid_request(tmp_path: Path) -> None:
    from loragate.errors import ConfigError, InvalidRequest
    from loragate.server.app import create_app
    from loragate.server.settings import Settings

    with pytest.raises(ConfigError, match="unknown scheduling strategy") as info:
        create_app(Settings(data_dir=tmp_path, scheduling="bogus"))
    assert not isinstance(info.value, InvalidRequest) and info.value.status == 500
