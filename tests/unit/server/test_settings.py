"""Settings precedence: overrides > env > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loragate.server.settings import CONFIG_ENV, load_settings


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
