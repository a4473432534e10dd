"""Wiring the configured embedders into the router: one tier, the cascade, or none; mistakes stop startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from loragate.errors import ConfigError
from loragate.router.compositional import GapDetector, LearnedDetector
from loragate.router.search import CascadeSearcher, IndexSearcher
from loragate.server.app import build_router, build_searcher, check_config, embedder_tiers
from loragate.server.settings import Settings
from tests.unit.router.test_index import record


def settings(tmp_path: Path, **fields: object) -> Settings:
    return Settings(data_dir=tmp_path, workers=["http://127.0.0.1:9"], **fields)  # type: ignore[arg-type]


def test_the_default_is_the_static_then_minilm_cascade(tmp_path: Path) -> None:
    assert embedder_tiers(settings(tmp_path)) == ("static-256", "minilm-int8")
    assert embedder_tiers(settings(tmp_path, embedder="minilm")) == ("minilm",)
    assert embedder_tiers(settings(tmp_path, embedder="none")) == ()


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"cascade_fast": "static", "cascade_precise": "static"}, "cascade_precise", "two different embedders"),
    ({"cascade_fast": "word2vec"}, "embedder", "unknown embedder backend 'word2vec'"),
    ({"embedder": "static", "compositional_detector": "psychic"}, "compositional_detector", "unknown compositional"),
    ({"embedder_model_dir": "/models/mine"}, "embedder_model_dir", "cascade runs two"),
])
def test_configuration_mistakes_stop_startup_with_the_setting_named(tmp_path: Path, fields: dict[str, object],
                                                                   param: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        check_config(settings(tmp_path, **fields))
    assert caught.value.param == param


def test_out_of_range_cascade_thresholds_are_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cascade_margin"):
        settings(tmp_path, cascade_margin=-0.1)
    with pytest.raises(ValueError, match="cascade_floor"):
        settings(tmp_path, cascade_floor=1.5)


async def test_a_cascade_gets_two_tiers_each_with_its_own_index_and_detects_on_the_fast_one(tmp_path: Path) -> None:
    configured = settings(tmp_path, embedder="cascade", cascade_fast="static", cascade_precise="static-256",
                          cascade_margin=0.07, cascade_floor=0.2)
    searcher = build_searcher(configured)
    assert isinstance(searcher, CascadeSearcher)
    assert [t.name for t in searcher.tiers] == ["static", "static-256"]
    assert (searcher.escalation.margin, searcher.escalation.floor) == (0.07, 0.2)
    await searcher.close()
    router = build_router(configured)
    assert isinstance(router.detector, LearnedDetector) and router.detector.model.embedder == "static"
    assert router.searcher is not None
    await router.searcher.sync({"a": record("a", "cooking: recipes and baking", "How long do I bake bread?")})
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["static", "static-256"]
    assert router.searcher.tiers[0].size == router.searcher.tiers[1].size == 1  # one centroid per adapter
    await router.searcher.close()


async def test_one_embedder_is_one_tier_and_auto_detection_follows_its_cost(tmp_path: Path) -> None:
    router = build_router(settings(tmp_path, embedder="static"))
    assert isinstance(router.searcher, IndexSearcher) and isinstance(router.detector, LearnedDetector)
    await router.searcher.close()
    assert build_router(settings(tmp_path, embedder="none")).searcher is None
    from loragate.router.compositional import make_detector

    assert isinstance(make_detector("auto", "minilm"), GapDetector)  # learned would embed ~10 texts with MiniLM
