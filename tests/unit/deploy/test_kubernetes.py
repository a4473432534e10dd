"""deploy/kubernetes/: rendered by kustomize, every object validated against Kubernetes' OpenAPI schemas, then read.

Setup: ``kubectl`` (Debian's package, installed with apt-get when missing; skipped only where
apt-get itself is absent) renders a copy of deploy/kubernetes whose git-ignored env files are
written from their committed ``*.env.example`` templates, exactly as the README tells users to.
Every rendered object must pass PyPI ``kubernetes-validate`` in strict mode (unknown fields fail)
for :data:`KUBERNETES_VERSION`. The overlay with both external components and each component on
its own are rendered and checked the same way.

The reads then check what a schema cannot: pods non-root with read-only root filesystems, probes
on the routes and ports the gateway serves, the PDB selecting the gateway pods, every referenced
Secret/ConfigMap key existing, the gateway's environment naming only real settings *and* loading
into :class:`loragate.server.settings.Settings` once the references are resolved, the headless
worker Service matching ``LORAGATE_WORKERS_DNS``, and Prometheus discovering the pods.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loragate.server.settings import Settings
from loragate.workers.resolver_plugin import ENV_CACHE, ENV_TOKEN, ENV_URL
from tests.debian import debian_tools

ROOT = Path(__file__).resolve().parents[3]
KUBERNETES = ROOT / "deploy" / "kubernetes"
PROMETHEUS = ROOT / "deploy" / "prometheus"
KUBERNETES_VERSION = "1.32.0"  # the oldest Kubernetes these manifests are validated for
ENV_FILES = ("base/secrets.env", "overlays/external/external.env")
# Environment variables of the gateway container that are not loragate settings, and why.
NOT_SETTINGS = {
    "POSTGRES_PASSWORD": "spliced into LORAGATE_DATABASE_URL with $(POSTGRES_PASSWORD)",
    "XDG_CACHE_HOME": "library caches off the read-only root filesystem",
}
POD_KINDS = ("Deployment", "StatefulSet", "Job")

Obj = dict[str, Any]


# -- rendering ----------------------------------------------------------------------------------------
def kubectl() -> str:
    """Path of ``kubectl``, installing Debian's package when it is missing."""
    return debian_tools("kubectl", "kubectl")[0]


def filled_in(example: Path) -> str:
    """A template's text with each placeholder replaced by a distinct value (hex, as the README suggests)."""
    count = iter(range(1, 1000))
    return re.sub("CHANGE-ME", lambda _: f"{next(count):02d}" + "ab" * 12, example.read_text())


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)


def render(directory: Path) -> list[Obj]:
    done = kustomize(directory)
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@dataclass(frozen=True)
class Rendered:
    """The objects of one kustomization, with lookups by kind and name (generated names end in -<hash>)."""

    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> list[Obj]:
        """Objects called ``name``, or for generated kinds ``name-<hash>`` (the name before kustomize's suffix)."""
        generated = kind in ("Secret", "ConfigMap")
        return [o for o in self.all(kind) if o["metadata"]["name"] == name
                or (generated and re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", o["metadata"]["name"]))]

    def get(self, kind: str, name: str) -> Obj:
        found = self.named(kind, name)
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return bool(self.named(kind, name))

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A Secret's or ConfigMap's data, decoded."""
        obj = self.get(kind, name)
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return dict(obj.get("data", {}))

    def pods(self) -> list[tuple[str, Obj]]:
        """(kind/name, pod spec) of every workload."""
        return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
                for kind in POD_KINDS for o in self.all(kind)]

    def container(self, kind: str, name: str, container: str) -> Obj:
        spec = self.get(kind, name)["spec"]["template"]["spec"]
        return next(c for c in spec["containers"] if c["name"] == container)

    def gateway(self) -> Obj:
        return self.container("Deployment", "loragate", "gateway")

    def worker(self) -> Obj:
        return self.container("Deployment", "vllm-worker", "vllm")

    def resolve_env(self, container: Obj) -> dict[str, str]:
        """The container's environment as the kubelet builds it: references read, $(VAR) expanded in order."""
        env: dict[str, str] = {}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
                continue
            ref = var["valueFrom"]
            kind, selector = ("Secret", ref["secretKeyRef"]) if "secretKeyRef" in ref else \
                ("ConfigMap", ref["configMapKeyRef"])
            data = self.data(kind, selector["name"])
            if selector["key"] in data:
                env[var["name"]] = data[selector["key"]]
            else:
                assert selector.get("optional"), f"{var['name']}: {kind} {selector['name']} has no {selector['key']}"
        return env

    def resolve_args(self, container: Obj) -> list[str]:
        env = self.resolve_env(container)
        return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container.get("args", [])]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(rendered: Rendered, kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = rendered.get(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's target port as a number (named ports looked up in the container)."""
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/kubernetes with the env files written from the templates, plus one overlay per component."""
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns(*[Path(f).name for f in ENV_FILES]))
    for relative in ENV_FILES:
        (copy / relative).write_text(filled_in(copy / f"{relative}.example"))
    external = copy / "overlays" / "external"
    for component in ("external-database", "external-store"):
        alone = copy / "overlays" / f"only-{component}"
        alone.mkdir()
        shutil.copy(external / "external.env", alone / "external.env")
        overlay = yaml.safe_load((external / "kustomization.yaml").read_text())
        overlay["components"] = [c for c in overlay["components"] if c.endswith(component)]
        assert len(overlay["components"]) == 1
        (alone / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return copy


@pytest.fixture(scope="module")
def base(tree: Path) -> Rendered:
    return Rendered(render(tree / "base"))


@pytest.fixture(scope="module")
def external(tree: Path) -> Rendered:
    return Rendered(render(tree / "overlays" / "external"))


VARIANTS = ("base", "overlays/external", "overlays/only-external-database", "overlays/only-external-store")


@pytest.fixture(scope="module")
def variants(tree: Path, base: Rendered, external: Rendered) -> dict[str, Rendered]:
    out = {"base": base, "overlays/external": external}
    out.update({v: Rendered(render(tree / v)) for v in VARIANTS if v not in out})
    return out


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The gateway's Settings from a container environment: unknown LORAGATE_* names fail, values must validate."""
    unknown = sorted(n for n in env if n.startswith("LORAGATE_") and n[len("LORAGATE_"):].lower()
                     not in Settings.model_fields)
    assert not unknown, f"not settings of loragate.server.settings.Settings: {unknown}"
    for name in list(os.environ):  # nothing of this process (nor a LORAGATE_CONFIG file) leaks in
        if name.startswith("LORAGATE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("LORAGATE_"):
            monkeypatch.setenv(name, value)
    return Settings()


# -- validation ---------------------------------------------------------------------------------------
def test_every_rendered_object_passes_the_kubernetes_schemas(variants: dict[str, Rendered]) -> None:
    for variant, rendered in variants.items():
        assert len(rendered.objects) >= 9, variant
        for obj in rendered.objects:
            where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")


def test_the_validator_rejects_a_misspelt_field(base: Rendered) -> None:
    """The strict schemas really fail unknown fields, so the test above could fail."""
    deployment = yaml.safe_load(yaml.safe_dump(base.get("Deployment", "loragate")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_self_contained_install_has_the_whole_topology(base: Rendered) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in base.objects if o["kind"] not in ("Secret", "ConfigMap")}
    assert kinds == {
        ("Deployment", "loragate"), ("Service", "loragate"), ("Service", "loragate-metrics"),
        ("PodDisruptionBudget", "loragate"),
        ("Deployment", "vllm-worker"), ("Service", "vllm-workers"), ("Service", "vllm-workers-metrics"),
        ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("StatefulSet", "minio"), ("Service", "minio"), ("Job", "minio-bucket"),
    }


def test_secrets_come_only_from_git_ignored_files(tree: Path, tmp_path: Path) -> None:
    ignored = subprocess.run(["git", "check-ignore", *[f"deploy/kubernetes/{f}" for f in ENV_FILES]], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert ignored.stdout.split() == [f"deploy/kubernetes/{f}" for f in ENV_FILES], ignored.stderr
    kept = subprocess.run(["git", "check-ignore", *[f"deploy/kubernetes/{f}.example" for f in ENV_FILES]],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert kept.returncode == 1 and not kept.stdout, "the templates must be committed"
    for relative in ENV_FILES:
        values = dict(re.findall(r"^([\w-]+)=(.*)$", (KUBERNETES / f"{relative}.example").read_text(), re.M))
        secret = {k: v for k, v in values.items() if re.search(r"token|password|secret|key-id|database-url", k)}
        assert secret and all("CHANGE-ME" in v for v in secret.values()), f"{relative}.example: {secret}"
    # Without secrets.env nothing renders: a fresh clone cannot apply placeholder tokens by accident.
    bare = tmp_path / "kubernetes"
    shutil.copytree(tree, bare)
    (bare / "base" / "secrets.env").unlink()
    done = kustomize(bare / "base")
    assert done.returncode != 0 and "secrets.env" in done.stderr


# -- pods -------------------------------------------------------------------------------------------
def test_every_container_is_non_root_with_a_read_only_root_filesystem(variants: dict[str, Rendered]) -> None:
    for variant, rendered in variants.items():
        for workload, spec in rendered.pods():
            pod = spec.get("securityContext", {})
            assert spec.get("automountServiceAccountToken") is False, f"{variant} {workload}: API token mounted"
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                where = f"{variant} {workload}/{container['name']}"
                own = container.get("securityContext", {})
                assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
                assert own.get("runAsUser", pod.get("runAsUser", 0)) != 0, where
                assert own.get("readOnlyRootFilesystem") is True, where
                assert own.get("allowPrivilegeEscalation") is False, where
                assert own.get("capabilities", {}).get("drop") == ["ALL"], where
                assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], where
                volumes = {v["name"] for v in spec.get("volumes", [])} | {
                    t["metadata"]["name"] for t in rendered.get(*workload.split("/")).get("spec", {}).get(
                        "volumeClaimTemplates", [])}
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where}: mounts undeclared volume {mount['name']}"
                assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])} or \
                    container["name"] == "loragate-plugin", f"{where}: no writable /tmp"


def test_gateway_replicas_probes_and_writable_dirs(base: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = base.get("Deployment", "loragate")
    assert deployment["spec"]["replicas"] == 3
    gateway = base.gateway()
    settings = settings_from(base.resolve_env(gateway), monkeypatch)
    port = settings.port  # the image's LORAGATE_PORT is the default (8000)
    probes = {kind: gateway[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    assert {container_port(gateway, probe["port"]) for probe in probes.values()} == {port}
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert str(settings.data_dir) in mounts and "/tmp" in mounts
    for path in (str(settings.data_dir), "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], f"{path}: not an emptyDir"
    data_limit = volumes[mounts[str(settings.data_dir)]]["emptyDir"]["sizeLimit"]
    assert data_limit.endswith("Gi")
    assert settings.store_cache_bytes + settings.merge_cache_bytes < int(data_limit[:-2]) << 30, \
        "the caches must fit the data emptyDir, or the kubelet evicts the pod"


def test_pdb_selects_the_gateway_pods_only(base: Rendered) -> None:
    pdb = base.get("PodDisruptionBudget", "loragate")["spec"]
    selector = pdb["selector"]["matchLabels"]
    assert selects(selector, pod_labels(base, "Deployment", "loragate"))
    for kind, name in (("Deployment", "vllm-worker"), ("StatefulSet", "postgres"), ("StatefulSet", "minio")):
        assert not selects(selector, pod_labels(base, kind, name)), f"the PDB also selects {kind}/{name}"
    assert "maxUnavailable" not in pdb, "the API server refuses a PDB with both minAvailable and maxUnavailable"
    assert 0 < pdb["minAvailable"] < base.get("Deployment", "loragate")["spec"]["replicas"]


def test_every_referenced_secret_and_config_key_exists(variants: dict[str, Rendered]) -> None:
    for variant, rendered in variants.items():
        for workload, spec in rendered.pods():
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {})
                    for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                        if field in ref:
                            name, key = ref[field]["name"], ref[field]["key"]
                            where = f"{variant} {workload}/{container['name']} {var['name']}"
                            assert rendered.has(kind, name), f"{where}: no {kind} {name}"
                            assert key in rendered.data(kind, name) or ref[field].get("optional"), \
                                f"{where}: {kind} {name} has no key {key}"


def test_gateway_env_names_only_settings_and_loads(base: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    env = base.resolve_env(base.gateway())
    others = {n for n in env if not n.startswith("LORAGATE_")}
    assert others <= set(NOT_SETTINGS), f"unexplained non-setting variables: {sorted(others - set(NOT_SETTINGS))}"
    settings = settings_from(env, monkeypatch)
    secrets = base.data("Secret", "loragate-secrets")
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == \
        f"postgresql://loragate:{secrets['postgres-password']}@postgres:5432/loragate"
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == secrets["admin-token"]
    assert settings.adapter_delivery == "resolver" and settings.delivery_token is not None
    assert settings.store_url and settings.store_url.startswith("s3://")
    assert settings.workers == [], "workers come from workers_dns only"


def test_settings_from_refuses_a_name_that_is_no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match="LORAGATE_DATABASE_URI"):
        settings_from({"LORAGATE_DATABASE_URI": "postgresql://x@y/z"}, monkeypatch)


# -- wiring ------------------------------------------------------------------------------------------
def test_worker_headless_service_is_what_workers_dns_names(base: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(base.resolve_env(base.gateway()), monkeypatch)
    assert settings.workers_dns is not None
    name, _, port = settings.workers_dns.rpartition(":")
    service = base.get("Service", name)["spec"]
    assert service["clusterIP"] == "None", "a ClusterIP Service would resolve to one virtual IP, not every worker"
    assert not service.get("publishNotReadyAddresses"), "the gateway should only see ready workers"
    assert selects(service["selector"], pod_labels(base, "Deployment", "vllm-worker"))
    assert not selects(service["selector"], pod_labels(base, "Deployment", "loragate"))
    (service_port,) = [p for p in service["ports"] if p["port"] == int(port)]
    worker = base.worker()
    assert container_port(worker, service_port["targetPort"]) == int(port)
    assert f"--port={port}" in base.resolve_args(worker)


def test_workers_fetch_adapters_from_the_gateway_service(base: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_env, worker = base.resolve_env(base.gateway()), base.worker()
    env = base.resolve_env(worker)
    match = re.fullmatch(r"http://([\w-]+):(\d+)", env[ENV_URL])
    assert match, env[ENV_URL]
    service = base.get("Service", match.group(1))["spec"]
    assert service.get("clusterIP") != "None", "the resolver should reach any replica through one virtual IP"
    assert selects(service["selector"], pod_labels(base, "Deployment", "loragate"))
    (port,) = [p for p in service["ports"] if p["port"] == int(match.group(2))]
    assert container_port(base.gateway(), port["targetPort"]) == settings_from(gateway_env, monkeypatch).port
    assert env[ENV_TOKEN] == gateway_env["LORAGATE_DELIVERY_TOKEN"]
    assert env[ENV_CACHE] in {m["mountPath"] for m in worker["volumeMounts"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # The plugin: VLLM_PLUGINS names loragate's entry point, and the init container fills PYTHONPATH with it.
    plugins = {ep.name for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("loragate.")}
    assert env["VLLM_PLUGINS"] in plugins and env["VLLM_PLUGINS"] == "loragate_resolver"
    spec = base.get("Deployment", "vllm-worker")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["image"] == base.gateway()["image"], "the plugin must be the gateway's own version"
    volume = next(m["name"] for m in worker["volumeMounts"] if m["mountPath"] == env["PYTHONPATH"])
    target = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == volume)
    script = " ".join(init["command"])
    assert "loragate-*.dist-info" in script and f"{target}/" in script


def test_gateway_and_workers_agree_on_the_model_and_lora_limits(base: Rendered,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(base.resolve_env(base.gateway()), monkeypatch)
    worker = base.worker()
    assert worker["image"].startswith("vllm/vllm-openai:")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    flags = dict(a.split("=", 1) for a in base.resolve_args(worker) if "=" in a)
    assert "--enable-lora" in worker["args"]
    assert flags["--served-model-name"] == settings.model
    assert flags["--model"] in settings.model_aliases
    assert int(flags["--max-lora-rank"]) == settings.max_lora_rank
    assert int(flags["--max-loras"]) == settings.worker_max_loras


def test_state_services_match_the_urls(base: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(base.resolve_env(base.gateway()), monkeypatch)
    assert settings.database_url is not None and settings.s3_endpoint_url and settings.store_url
    db = re.fullmatch(r"postgresql://(\w+):[^@]+@([\w-]+):(\d+)/(\w+)", settings.database_url.get_secret_value())
    s3 = re.fullmatch(r"http://([\w-]+):(\d+)", settings.s3_endpoint_url)
    assert db and s3
    for (host, port), workload in (((db.group(2), db.group(3)), "postgres"), ((s3.group(1), s3.group(2)), "minio")):
        service = base.get("Service", host)["spec"]
        assert selects(service["selector"], pod_labels(base, "StatefulSet", workload))
        assert int(port) in {p["port"] for p in service["ports"]}
        assert base.get("StatefulSet", workload)["spec"]["serviceName"] == host
    postgres = base.resolve_env(base.container("StatefulSet", "postgres", "postgres"))
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]) == (db.group(1), db.group(4))
    assert settings.database_url.get_secret_value().startswith(
        f"postgresql://{db.group(1)}:{postgres['POSTGRES_PASSWORD']}@")
    minio = base.resolve_env(base.container("StatefulSet", "minio", "minio"))
    assert settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None
    assert minio["MINIO_ROOT_USER"] == settings.s3_access_key_id.get_secret_value()
    assert minio["MINIO_ROOT_PASSWORD"] == settings.s3_secret_access_key.get_secret_value()
    bucket = settings.store_url[len("s3://"):].split("/")[0]
    job = base.container("Job", "minio-bucket", "mc")
    assert f"mc mb --ignore-existing store/{bucket}" in " ".join(job["command"])
    assert f"http://{s3.group(1)}:{s3.group(2)}" in " ".join(job["command"])


def test_external_components_replace_the_in_cluster_state(variants: dict[str, Rendered], tree: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    given = dict(re.findall(r"^([\w-]+)=(.*)$", (tree / "overlays/external/external.env").read_text(), re.M))
    in_cluster = {"database": {("StatefulSet", "postgres"), ("Service", "postgres")},
                  "store": {("StatefulSet", "minio"), ("Service", "minio"), ("Job", "minio-bucket")}}
    for variant, external in (("overlays/external", {"database", "store"}),
                              ("overlays/only-external-database", {"database"}),
                              ("overlays/only-external-store", {"store"})):
        rendered = variants[variant]
        for part, objects in in_cluster.items():
            for kind, name in objects:
                assert rendered.has(kind, name) == (part not in external), f"{variant}: {kind}/{name}"
        env = rendered.resolve_env(rendered.gateway())
        settings = settings_from(env, monkeypatch)
        assert settings.database_url is not None and settings.store_url
        database_url = settings.database_url.get_secret_value()
        if "database" in external:
            assert database_url == given["database-url"] and "POSTGRES_PASSWORD" not in env, variant
        else:
            assert "@postgres:5432/" in database_url, variant
        if "store" in external:
            assert (settings.store_url, settings.s3_endpoint_url, settings.s3_region) == \
                (given["store-url"], given["s3-endpoint-url"], given["s3-region"]), variant
            assert settings.s3_secret_access_key is not None
            assert settings.s3_secret_access_key.get_secret_value() == given["s3-secret-access-key"], variant
        else:
            assert settings.s3_endpoint_url == "http://minio:9000", variant


def test_store_endpoint_and_region_may_be_left_out_for_aws(tree: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(tree, copy)
    env_file = copy / "overlays" / "external" / "external.env"
    env_file.write_text("".join(line for line in env_file.read_text().splitlines(keepends=True)
                                if not line.startswith(("s3-endpoint-url=", "s3-region="))))
    rendered = Rendered(render(copy / "overlays" / "external"))
    settings = settings_from(rendered.resolve_env(rendered.gateway()), monkeypatch)
    assert settings.s3_endpoint_url is None and settings.s3_region is None and settings.store_url


# -- Prometheus --------------------------------------------------------------------------------------
def test_prometheus_fleet_config_discovers_every_pod_under_the_rules_job_names(base: Rendered) -> None:
    fleet = yaml.safe_load((PROMETHEUS / "fleet.yml").read_text())
    single = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert {j["job_name"] for j in fleet["scrape_configs"]} == {j["job_name"] for j in single["scrape_configs"]}, \
        "rules.yml reads these job names"
    assert fleet["rule_files"] == single["rule_files"] == ["rules.yml"]
    workloads = {"loragate": ("loragate", "gateway"), "vllm": ("vllm-worker", "vllm")}
    for job in fleet["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        (name,) = sd["names"]
        deployment, container_name = workloads[job["job_name"]]
        service = base.get("Service", name)["spec"]
        assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True, name
        assert selects(service["selector"], pod_labels(base, "Deployment", deployment)), name
        container = base.container("Deployment", deployment, container_name)
        (port,) = [p for p in service["ports"] if p["port"] == sd["port"]]
        assert container_port(container, port["targetPort"]) == sd["port"]
        annotations = base.get("Deployment", deployment)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == sd["port"]
        assert annotations["prometheus.io/path"] == job["metrics_path"] == "/metrics"


def test_promtool_checks_the_fleet_config() -> None:
    from tests.integration.test_prometheus import _tools  # installs Debian's prometheus where missing

    _, promtool = _tools()
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS / "fleet.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
