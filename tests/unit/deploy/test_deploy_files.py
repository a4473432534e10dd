"""deploy/: compose services and GPU workers, Prometheus jobs and rules, Grafana provisioning, read as YAML.

The behaviour (promtool, a live Prometheus, `docker compose config`) is tested in
tests/integration/test_prometheus.py; these checks are the fast, structural half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.unit.deploy.test_dashboards import catalogued_series, metric_names

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def load(relative: str) -> Any:
    return yaml.safe_load((DEPLOY / relative).read_text())


def test_compose_has_gateway_two_gpu_vllm_workers_prometheus_and_grafana() -> None:
    services = load("docker-compose.yml")["services"]
    assert set(services) == {"gateway", "worker-1", "worker-2", "prometheus", "grafana"}
    assert services["gateway"]["build"]["dockerfile"] == "Dockerfile"
    gpus = set()
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["image"].startswith("vllm/vllm-openai:")
        flags = " ".join(worker["command"])
        for flag in ("--enable-lora", "--max-loras", "--max-lora-rank"):
            assert flag in flags, f"{name}: {flag} missing"
        assert worker["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        device = worker["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus.add(device["device_ids"][0])
    assert len(gpus) == 2, "each worker gets its own GPU"


def test_compose_mounts_exist() -> None:
    services = load("docker-compose.yml")["services"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{service}: {source} does not exist"


def test_prometheus_scrapes_gateway_and_workers_and_loads_the_rules() -> None:
    config = load("prometheus/prometheus.yml")
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {"loragate": ["gateway:8000"], "vllm": ["worker-1:8000", "worker-2:8000"]}
    assert config["rule_files"] == ["rules.yml"]


def test_alert_rules_cover_the_issue_and_use_catalogued_metrics() -> None:
    rules = [rule for group in load("prometheus/rules.yml")["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert names >= {"LoragateWorkerDown", "LoragateRoutingHitRateDrop", "LoragateCompositionalFailureRateHigh",
                     "LoragateAdapterLoadErrors"}
    known = catalogued_series()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not in server/metrics.py"


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    datasource = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    provider = load("grafana/provisioning/dashboards/loragate.yml")["providers"][0]
    grafana = load("docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
