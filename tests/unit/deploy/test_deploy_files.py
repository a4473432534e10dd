"""deploy/: compose services and GPU workers (single host and fleet), Prometheus jobs and rules, Grafana, as YAML.

The behaviour (promtool, a live Prometheus, `docker compose config`) is tested in
tests/integration/test_prometheus.py; these checks are the fast, structural half.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.debian import docker_compose_config
from tests.unit.deploy.test_dashboards import catalogued_series, metric_names
from tests.unit.deploy.test_kubernetes import settings_from

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
    for compose in ("docker-compose.yml", "docker-compose.fleet.yml"):
        services = load(compose)["services"]
        for service in ("prometheus", "grafana"):
            for volume in services[service]["volumes"]:
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (DEPLOY / source).exists(), f"{compose} {service}: {source} does not exist"


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


# -- the fleet compose file (deploy/docker-compose.fleet.yml): the Kubernetes topology in compose -------
FLEET = "docker-compose.fleet.yml"
FLEET_ENV = {"LORAGATE_ADMIN_TOKEN": "admin-0123", "LORAGATE_DELIVERY_TOKEN": "delivery-4567",
             "POSTGRES_PASSWORD": "0123abcd", "S3_SECRET_ACCESS_KEY": "s3-secret-89ab"}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$`` for ``$``."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value.replace("$$", "\0")).replace("\0", "$")


def fleet_env(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v), FLEET_ENV) for k, v in service["environment"].items()}


def test_interpolate_reads_compose_syntax() -> None:
    env = {"A": "1"}
    assert interpolate("${A}/${B:-two}/${B}/$$x/${A:?need A}", env) == "1/two//$x/1"
    with pytest.raises(AssertionError, match="need B"):
        interpolate("${B:?need B}", env)


def test_fleet_compose_has_two_gateways_postgres_minio_workers_and_prometheus(monkeypatch: pytest.MonkeyPatch) -> None:
    services = load(FLEET)["services"]
    assert set(services) == {"gateway-1", "gateway-2", "loragate-plugin", "worker-1", "worker-2", "postgres", "minio",
                             "minio-bucket", "prometheus", "grafana"}
    gateways = [services["gateway-1"], services["gateway-2"]]
    data = [next(v.split(":")[0] for v in g["volumes"] if v.endswith(":/data")) for g in gateways]
    assert len(set(data)) == 2, "each gateway has its own data volume: no shared disk"
    assert len({g["ports"][0].split(":")[0] for g in gateways}) == 2
    for gateway in gateways:
        assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]
        assert set(gateway["networks"]["default"]["aliases"]) == {"loragate", "loragate-metrics"}
        assert gateway["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                         "minio-bucket": {"condition": "service_completed_successfully"}}
    settings = settings_from(fleet_env(services["gateway-1"]), monkeypatch)
    assert fleet_env(services["gateway-2"]) == fleet_env(services["gateway-1"])
    assert settings.adapter_delivery == "resolver" and settings.workers == []
    assert settings.database_url is not None and settings.store_url and settings.s3_endpoint_url
    assert settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None
    # The state services are the ones the URLs name, with the same credentials.
    postgres = fleet_env(services["postgres"])
    assert settings.database_url.get_secret_value() == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/"
        f"{postgres['POSTGRES_DB']}")
    minio = fleet_env(services["minio"])
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        settings.s3_access_key_id.get_secret_value(), settings.s3_secret_access_key.get_secret_value())
    bucket = services["minio-bucket"]
    assert bucket["depends_on"] == {"minio": {"condition": "service_healthy"}}
    bucket_name = settings.store_url[len("s3://"):].split("/")[0]
    assert f"mc mb --ignore-existing store/{bucket_name}" in interpolate(" ".join(bucket["command"]), FLEET_ENV)
    # Workers: found by the gateways' DNS name, fetching adapters from any gateway with the delivery token.
    assert settings.workers_dns is not None
    dns_name, _, port = settings.workers_dns.rpartition(":")
    plugin = services["loragate-plugin"]
    assert plugin["image"] == gateways[0]["image"], "the plugin must be the gateway's own version"
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        env = fleet_env(worker)
        assert dns_name in worker["networks"]["default"]["aliases"]
        assert f"--port={port}" in worker["command"]
        assert env["LORAGATE_RESOLVER_URL"] == "http://loragate:8000"
        assert settings.delivery_token is not None
        assert env["LORAGATE_RESOLVER_TOKEN"] == settings.delivery_token.get_secret_value()
        assert env["VLLM_PLUGINS"] == "loragate_resolver"
        mounts = dict(reversed(v.split(":")[:2]) for v in worker["volumes"])
        assert mounts[env["PYTHONPATH"]] == plugin["volumes"][0].split(":")[0]
        assert worker["depends_on"] == {"loragate-plugin": {"condition": "service_completed_successfully"}}
        device = worker["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_fleet_prometheus_uses_the_fleet_config_whose_names_are_the_aliases() -> None:
    services = load(FLEET)["services"]
    prometheus = services["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"] if v.startswith("./")}
    directory = str(Path(config_file).parent)
    assert (DEPLOY / mounts[directory] / Path(config_file).name) == DEPLOY / "prometheus" / "fleet.yml"
    aliases = {service: set(services[service]["networks"]["default"]["aliases"])
               for service in ("gateway-1", "gateway-2", "worker-1", "worker-2")}
    members = {"loragate": ("gateway-1", "gateway-2"), "vllm": ("worker-1", "worker-2")}
    for job in load("prometheus/fleet.yml")["scrape_configs"]:
        (name,) = job["dns_sd_configs"][0]["names"]
        for service in members[job["job_name"]]:
            assert name in aliases[service], f"{service} does not answer to {name}"


def test_fleet_compose_file_validates(tmp_path: Path) -> None:
    """``docker compose config`` (client only) where the compose plugin exists, as for docker-compose.yml."""
    done = docker_compose_config(str(DEPLOY / FLEET), FLEET_ENV, str(tmp_path))
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {"gateway-1", "gateway-2", "postgres", "minio", "minio-bucket"} <= set(services)
    docker = str(shutil.which("docker"))  # there: docker_compose_config skips otherwise
    missing = subprocess.run([docker, "compose", "-f", str(DEPLOY / FLEET), "config"], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in os.environ.items() if k not in FLEET_ENV}, cwd=tmp_path)
    assert missing.returncode != 0 and "LORAGATE_ADMIN_TOKEN" in missing.stderr
