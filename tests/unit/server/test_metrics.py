"""Counters the embedder and the merge cache keep themselves reach /metrics (read at scrape time)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loragate.adapters.merge_cache import MergeCacheStats
from loragate.router.embedder import EmbedderStats
from loragate.router.search import TierStats
from loragate.server.metrics import GatewayMetrics
from tests.unit.server.test_app import make_client


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_component_counters_are_exported_from_their_snapshots() -> None:
    embedder = [TierStats({"static": EmbedderStats(batches=3, encoded_texts=7, cache_hits=2, coalesced=1)},
                          {"static": 4})]
    merges = MergeCacheStats(hits=4, builds=2, joins=1, evictions=1, failures=0, last_build_seconds=0.1,
                             entries=1, bytes=2048)
    metrics = GatewayMetrics()
    metrics.watch_components(lambda: embedder[-1], lambda: merges)
    first = samples(metrics.render().decode())
    assert first["loragate_embed_batches_total"] == 3 and first["loragate_embed_texts_total"] == 7
    assert first["loragate_embed_cache_hits_total"] == 2 and first["loragate_embed_coalesced_total"] == 1
    assert first["loragate_merge_cache_joins_total"] == 1 and first["loragate_merge_cache_evictions_total"] == 1
    assert first["loragate_merge_cache_entries"] == 1 and first["loragate_merge_cache_bytes"] == 2048
    assert first["loragate_route_tier_total"] == 4
    # a cascade: totals over both embedders, and requests counted by the embedder that decided them
    embedder.append(TierStats({"static": EmbedderStats(batches=5, encoded_texts=9, cache_hits=2, coalesced=1),
                               "minilm": EmbedderStats(batches=2, encoded_texts=2, cache_hits=0, coalesced=0)},
                              {"static": 6, "minilm": 2}))
    text = metrics.render().decode()
    assert samples(text)["loragate_embed_batches_total"] == 7  # read anew at every scrape
    tiers = {s.labels["embedder"]: s.value for family in text_string_to_metric_families(text)
             for s in family.samples if s.name == "loragate_route_tier_total"}
    assert tiers == {"static": 6, "minilm": 2}


def test_the_gateway_exports_its_merge_cache_and_no_embedder_counters_without_routing(tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    with make_client(tmp_path, imports) as client:
        scraped = samples(client.get("/metrics").text)
    assert scraped["loragate_merge_cache_entries"] == 0 and scraped["loragate_merge_cache_bytes"] == 0
    assert not any(name.startswith("loragate_embed_") for name in scraped)  # embedder=none: nothing to count
