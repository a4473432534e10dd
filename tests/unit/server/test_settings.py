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
