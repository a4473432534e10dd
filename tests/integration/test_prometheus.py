"""The deploy/ monitoring files against a real Prometheus scraping a real gateway that served graded traffic.

Setup (once per module, every step bounded by a timeout, every process stopped at the end):

1. Debian's ``prometheus`` package is installed with apt-get when ``prometheus``/``promtool`` are
   missing (skipped only where apt-get itself does not exist).
2. The loadtest stub (:class:`loragate.loadtest.stub.StubApp`) serves as the worker, in a thread,
   with one change: loading the adapter ``gamma`` fails the way vLLM fails a bad path (404), so
   adapter-load errors are real events of the gateway's worker pool.
3. ``loragate serve`` runs as a subprocess with three registered adapters (``write_lora``), the
   default embedder (the static -> MiniLM cascade) and the ``hybrid`` compositional detector.
4. Prometheus starts with the deploy config's jobs pointed at the gateway and the stub, a 1 s scrape
   and rule-evaluation interval, and ``deploy/prometheus/rules.yml`` loaded.
5. The same traffic is sent twice, a few scrapes apart (pins, select hits and fallbacks, a
   compositional prompt under select and average, merges built and reused, graded successes and
   failures, shadows, the learned auto asked for and by default (graded, so its posteriors, choices
   and regret exist, with the shadows that explore), streaming, 400/404/502 errors), so every
   counter both exists and increases inside the rate windows.

Then every PromQL expression of every generated dashboard panel, read from the committed JSON, is
evaluated through ``/api/v1/query`` with Grafana's ``$__rate_interval``/``$__range`` substituted:
each must parse and return at least one series with a finite value. Alert expressions are
conditions (``A > 0.5 and B >= 10``), empty whenever nothing is wrong; each is evaluated whole (it
must parse) and then split at its top-level comparison and set operators (``and``/``or``/``unless``)
into operands, every non-literal operand of which must return data: that proves the selectors
match real series, which is what a typo would break. Finally ``/api/v1/rules`` must report every
rule healthy, i.e. Prometheus itself evaluated them without error.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loragate.loadtest.stub import StubApp, answer_words, read_body
from loragate.workers.launch import free_port, wait_healthy
from tests.debian import debian_tools, docker_compose_config
from tests.lora_files import write_lora

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
COMPOSE = DEPLOY / "docker-compose.yml"

MODEL = "tiny-llama"
TOKEN = "prometheus-test-token"
BROKEN = "gamma"  # the worker refuses to load this adapter
DESCRIPTORS = {
    "alpha": ("Cooking: recipes, baking and kitchen techniques.",
              ["How long should I bake a loaf of bread?", "What can I cook with leftover rice?"]),
    "beta": ("Astronomy: planets, stars, galaxies and telescopes.",
             ["How far is Mars from the Sun?", "Why do stars twinkle at night?"]),
    BROKEN: ("Gardening: soil, seeds, pruning and watering plants.", ["When should I prune roses?"]),
}
COOKING = "How long should I bake a loaf of sourdough bread?"
UNRELATED = "Please summarise the quarterly insurance invoice."
TWO_DOMAINS = "How long should I bake bread, and how far is Mars from the Sun?"
WINDOWS = {"$__rate_interval": "1m", "$__range": "10m"}  # Grafana's variables, as this test substitutes them
RIGHT = answer_words(6, 16)[1]  # a word the stub's answer contains ("cat"): graded as success
WRONG = "zebra-never-said"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


# -- processes ----------------------------------------------------------------------------------------
def _tools() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``, installing Debian's package when they are missing."""
    prometheus, promtool = debian_tools("prometheus", "prometheus", "promtool")
    return prometheus, promtool


class RejectingLoads:
    """ASGI wrapper: the stub, except that loading ``reject`` fails like vLLM's bad path (404 JSON)."""

    def __init__(self, app: StubApp, reject: str) -> None:
        self.app = app
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/load_lora_adapter":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if json.loads(body or b"{}").get("lora_name") == self.reject:
            error = {"error": {"message": f"No adapter found for {self.reject}", "type": "NotFoundError",
                               "param": None, "code": 404}}
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(error).encode()})
            return

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass(frozen=True)
class Observed:
    """What the tests query: Prometheus' base URL and the tools."""

    prometheus: str
    promtool: str
    gateway: str


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _prometheus_config(gateway: str, worker: str) -> dict[str, Any]:
    """The deploy config with its jobs pointed at this test's processes and a 1 s rhythm."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {"loragate": gateway, "vllm": worker}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"deploy/prometheus/prometheus.yml jobs changed: {jobs}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(RULES)]
    return config


# -- traffic ------------------------------------------------------------------------------------------
def _send(client: httpx.Client, policy: str | None, prompt: str, *, expected: str | None = None,
          shadow: str | None = None, stream: bool = False, route: str = "completions") -> httpx.Response:
    """One completion request; ``policy`` None sends no X-Adapter-Policy (the gateway's default: auto)."""
    headers = {} if policy is None else {"x-adapter-policy": policy}
    if expected is not None:
        headers["x-expected-answer"] = expected
    if shadow is not None:
        headers["x-adapter-policy-shadow"] = shadow
    body: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 6, "stream": stream}
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if not stream:
        return client.post(f"/v1/{route}", json=body, headers=headers)
    with client.stream("POST", f"/v1/{route}", json=body, headers=headers) as response:
        response.read()
        return response


def _traffic(client: httpx.Client, phase: int) -> tuple[int, dict[str, str]]:
    """One round of traffic touching every dashboard metric; returns (shadow runs expected, headers seen).

    Graded requests under the learned auto (the default auto_arms, nothing asked for) each get an
    exploring shadow of another arm (auto_shadow_rate 1): counted with the shadows asked for.
    """
    # New merges every phase (weights differ), built under both methods: build-time series increase in
    # phase 2 too (a series first seen in phase 2 would have no rate yet).
    weights = "0.5 0.5" if phase == 1 else "0.3 0.7"
    expect: list[tuple[str | None, str, dict[str, Any], int]] = [  # (policy, prompt, keyword arguments, status)
        ('pin;adapter="alpha"', COOKING, {"expected": RIGHT}, 200),
        ('pin;adapter="alpha"', COOKING, {"expected": WRONG, "shadow": "select"}, 200),
        ('pin;adapter="beta"', TWO_DOMAINS, {"expected": RIGHT, "stream": True}, 200),
        ("select", COOKING, {"expected": RIGHT, "shadow": "base"}, 200),
        ("select;min_score=0.99", UNRELATED, {"expected": WRONG}, 200),  # fallback to the base
        ("select", TWO_DOMAINS, {"expected": RIGHT}, 200),
        ("select", TWO_DOMAINS, {"expected": WRONG}, 200),
        ("average;k=2;min_score=0.05", TWO_DOMAINS, {"expected": RIGHT}, 200),
        ("average;k=2;min_score=0.05", TWO_DOMAINS, {"expected": WRONG, "shadow": 'pin;adapter="beta"'}, 200),
        *[(f'average;adapters="alpha beta";weights="{weights}";method={method}', TWO_DOMAINS, kwargs, 200)
          for method in ("cat", "linear") for kwargs in ({"expected": RIGHT}, {})],  # built, then a cache hit
        ('chain;adapters="alpha beta"', TWO_DOMAINS, {"expected": RIGHT}, 200),  # the chain step histograms
        # the learned auto, asked for and by default (no header): graded, so its posteriors, choice,
        # success and regret series exist in two contexts (alpha/single, a nearest adapter/compositional)
        ("auto", COOKING, {"expected": RIGHT}, 200),
        (None, COOKING, {"expected": WRONG}, 200),
        ("auto", TWO_DOMAINS, {"expected": RIGHT}, 200),
        (None, TWO_DOMAINS, {"expected": WRONG, "stream": True}, 200),
        ("auto", UNRELATED, {}, 200),  # ungraded: chosen (counted), never explored
        ("base", UNRELATED, {"route": "chat/completions"}, 200),
        (f'pin;adapter="{BROKEN}"', COOKING, {}, 502),  # the worker refuses the load
        ('pin;adapter="no-such-adapter"', COOKING, {}, 404),
        ("pin;adapter=", COOKING, {}, 400),  # unparsable policy
    ]
    seen: dict[str, str] = {}
    shadows = 0
    for policy, prompt, kwargs, status in expect:
        response = _send(client, policy, prompt, **kwargs)
        assert response.status_code == status, (policy, response.status_code, response.text[:300])
        asked = policy or "auto"
        shadows += "shadow" in kwargs or (asked == "auto" and "expected" in kwargs)
        if asked == "auto":
            assert response.headers.get("x-auto-choice"), f"auto request ({policy}) without X-Auto-Choice"
        if asked.startswith("select") and prompt == TWO_DOMAINS:
            seen["compositional"] = response.headers.get("x-compositional", "")
        if asked.startswith("average;k"):
            seen["merge"] = response.headers.get("x-adapter-merge", "")
    return shadows, seen


def _gateway_counter(gateway: str, family: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    return sum(sample.value for fam in text_string_to_metric_families(text) if fam.name == family
               for sample in fam.samples if sample.name == family + "_total")


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.25)


def query(prometheus: str, expr: str) -> dict[str, Any]:
    """``/api/v1/query`` at the current time; the decoded JSON body."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=20)
    body: dict[str, Any] = response.json()
    return body


def _prometheus_total(prometheus: str, metric: str) -> float:
    result = query(prometheus, f"sum({metric})")["data"]["result"]
    return float(result[0]["value"][1]) if result else -1.0


def _settle(gateway: str, prometheus: str, shadows: int) -> None:
    """Wait until the shadow runs are done and Prometheus has scraped everything, then a few scrapes more."""
    _until(lambda: _gateway_counter(gateway, "loragate_shadow_runs") >= shadows, 30, "the shadow runs")
    total = _gateway_counter(gateway, "loragate_requests")
    _until(lambda: _prometheus_total(prometheus, "loragate_requests_total") == total
           and _prometheus_total(prometheus, "loragate_shadow_runs_total") >= shadows,
           30, "Prometheus to scrape the traffic")
    # two more scrapes (and rule evaluations, on the same 1 s interval) after the round: counted, not slept for
    scrapes = _prometheus_total(prometheus, 'count_over_time(up{job="loragate"}[1h])')
    _until(lambda: _prometheus_total(prometheus, 'count_over_time(up{job="loragate"}[1h])') >= scrapes + 2,
           30, "two more scrapes")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    prometheus_bin, promtool = _tools()
    work = tmp_path_factory.mktemp("prometheus-e2e")
    adapters = work / "adapters"
    for seed, name in enumerate(DESCRIPTORS):
        write_lora(adapters / name, rank=8, seed=seed, base=MODEL)

    worker_port = free_port()
    stub = uvicorn.Server(uvicorn.Config(RejectingLoads(StubApp(MODEL), BROKEN), host="127.0.0.1",
                                         port=worker_port, log_level="warning", lifespan="off"))
    stub_thread = threading.Thread(target=stub.run, daemon=True)
    stub_thread.start()
    procs: list[subprocess.Popen[bytes]] = []
    gateway_log = work / "gateway.log"
    try:
        _until(lambda: stub.started, 30, "the stub worker")
        worker = f"127.0.0.1:{worker_port}"
        port = free_port()
        gateway = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LORAGATE_DATA_DIR": str(work / "data"), "LORAGATE_PORT": str(port),
               "LORAGATE_MODEL": MODEL, "LORAGATE_WORKERS": json.dumps([f"http://{worker}"]),
               "LORAGATE_ADMIN_TOKEN": TOKEN, "LORAGATE_IMPORT_ROOTS": json.dumps([str(adapters)]),
               "LORAGATE_COMPOSITIONAL_DETECTOR": "hybrid", "LORAGATE_SHADOW_MAX_CONCURRENCY": "16",
               "LORAGATE_OUTCOMES_FLUSH_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"}
        with gateway_log.open("wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "loragate.server.cli", "serve"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=work))
        try:
            wait_healthy(f"{gateway}/health", procs[-1], 180, name="gateway")
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"gateway did not start: {exc}\n{_log_tail(gateway_log)}")
        with httpx.Client(base_url=gateway, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as admin:
            for name, (description, examples) in DESCRIPTORS.items():
                response = admin.post("/admin/adapters", json={"name": name, "path": str(adapters / name),
                                                               "description": description, "examples": examples})
                assert response.status_code == 201, response.text

        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(f"127.0.0.1:{port}", worker)))
        prom_port = free_port()
        prometheus = f"http://127.0.0.1:{prom_port}"
        prom_log = work / "prometheus.log"
        with prom_log.open("wb") as log:
            procs.append(subprocess.Popen(
                [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=work))
        try:
            wait_healthy(f"{prometheus}/-/ready", procs[-1], 60, name="prometheus")
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"prometheus did not start: {exc}\n{_log_tail(prom_log)}")
        _until(lambda: _prometheus_total(prometheus, 'up{job="loragate"}') == 1, 30, "the first gateway scrape")

        with httpx.Client(base_url=gateway, timeout=60) as client:
            shadows_sent = 0
            for phase in (1, 2):
                shadows, seen = _traffic(client, phase)
                shadows_sent += shadows
                assert seen["compositional"] == "?1", f"the two-domain prompt was not flagged compositional: {seen}"
                assert seen["merge"], "average;k=2 did not merge two adapters"
                _settle(gateway, prometheus, shadows_sent)
        yield Observed(prometheus=prometheus, promtool=promtool, gateway=gateway)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        stub.should_exit = True
        stub_thread.join(timeout=15)


# -- expressions --------------------------------------------------------------------------------------
def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target of every panel (rows included)."""
    found = []

    def walk(panels: list[dict[str, Any]], file: str) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                found.append((file, panel["title"], target["expr"]))
            walk(panel.get("panels") or [], file)

    for path in sorted(DASHBOARDS.glob("*.json")):
        walk(json.loads(path.read_text())["panels"], path.name)
    return found


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expr) of every alerting rule in rules.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"] if "alert" in rule]


_SET_OPERATOR = re.compile(r"(and|or|unless)(?![\w:])")
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool(?![\w:]))?")
_MODIFIER = re.compile(r"^\s*(?:(?:on|ignoring|group_left|group_right)\s*(?:\([^)]*\))?\s*)+")
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def operands(expr: str) -> list[str]:
    """The operands of ``expr``'s top-level comparison and set operators (literals dropped).

    Brackets, braces and strings are skipped over, so ``{status=~"5.."}`` and ``[5m]`` never split;
    vector-matching modifiers after an operator (``and on (policy)``) are removed from the operand.
    """
    parts: list[str] = []
    depth, start, i, quote = 0, 0, 0, ""
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            word_start = i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")
            match = (_SET_OPERATOR.match(expr, i) if word_start else None) or _COMPARISON.match(expr, i)
            if match:
                parts.append(expr[start:i])
                start = i = match.end()
                continue
        i += 1
    parts.append(expr[start:])
    cleaned = [_MODIFIER.sub("", part).strip() for part in parts]
    return [part for part in cleaned if part and not _NUMBER.match(part)]


def _check_returns_data(prometheus: str, expr: str, where: str) -> None:
    body = query(prometheus, expr)
    assert body.get("status") == "success", f"{where}: {expr}\n-> {body.get('error')}"
    data = body["data"]
    result = data["result"]
    assert result, f"{where}: empty result for\n{expr}"
    values = [float(result[1])] if data["resultType"] == "scalar" else [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{where}: no finite value ({values}) for\n{expr}"


# -- tests --------------------------------------------------------------------------------------------
def test_operands_split_conditions_at_top_level() -> None:
    expr = 'sum by (p) (rate(x{s=~"5..|<>"}[5m])) / sum(y) > 0.5 and on (p) increase(z[1m]) >= 10 or w'
    assert operands(expr) == ['sum by (p) (rate(x{s=~"5..|<>"}[5m])) / sum(y)', "increase(z[1m])", "w"]
    assert operands("a < 0.7 * (b)") == ["a", "0.7 * (b)"]
    assert operands("up == bool 0") == ["up"]


def test_promtool_checks_config_and_rules() -> None:
    _, promtool = _tools()
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_auto_regret_alert_fires_only_with_evidence_and_per_process(tmp_path: Path) -> None:
    """promtool's rule unit test: 30 minutes of regret 0.3 fires where the context has 25 graded outcomes
    on that process, not where it has 5 (one lucky arm), and never after only 20 minutes."""
    def series(metric: str, instance: str, value: float, arm: str | None = None) -> dict[str, str]:
        labels = f'job="loragate", instance="{instance}", context="alpha/single"' + (f', arm="{arm}"' if arm else "")
        return {"series": f"{metric}{{{labels}}}", "values": f"{value}x40"}

    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "LoragateAutoRegretHigh")
    annotations: dict[str, str] = rule["annotations"]

    def render(text: str) -> str:  # the three template fields these annotations use
        return (text.replace("{{ $labels.context }}", "alpha/single").replace("{{ $labels.instance }}", "a:8000")
                .replace("{{ $value | humanizePercentage }}", "30%"))

    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [series("loragate_auto_regret", "a:8000", 0.3), series("loragate_auto_regret", "b:8000", 0.3),
                         series("loragate_auto_arm_observations", "a:8000", 15, "base"),
                         series("loragate_auto_arm_observations", "a:8000", 10, "select"),
                         series("loragate_auto_arm_observations", "b:8000", 5, "select"),
                         series("up", "a:8000", 1), series("up", "b:8000", 1)],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "LoragateAutoRegretHigh", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "LoragateAutoRegretHigh", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "job": "loragate", "instance": "a:8000",
                               "context": "alpha/single"},
                "exp_annotations": {key: render(text) for key, text in annotations.items()}}]},
        ]}]}
    path = tmp_path / "auto_regret_test.yml"
    path.write_text(yaml.safe_dump(tests))
    _, promtool = _tools()
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool test rules:\n{done.stdout}\n{done.stderr}"


def test_every_dashboard_expression_returns_data(observed: Observed) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20, "fewer panel expressions than the dashboards define"
    for file, title, expr in expressions:
        for variable, value in WINDOWS.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{file} / {title}: a Grafana variable this test does not substitute: {expr}"
        _check_returns_data(observed.prometheus, expr, f"{file} / {title}")


def test_every_alert_expression_parses_and_its_operands_return_data(observed: Observed) -> None:
    alerts = alert_expressions()
    assert {name for name, _ in alerts} >= {"LoragateWorkerDown", "LoragateRoutingHitRateDrop",
                                            "LoragateCompositionalFailureRateHigh", "LoragateAdapterLoadErrors",
                                            "LoragateAutoRegretHigh"}
    for name, expr in alerts:
        body = query(observed.prometheus, expr)
        assert body.get("status") == "success", f"{name}: {body.get('error')}"
        parts = operands(expr)
        assert parts, f"{name}: no operands found in {expr}"
        for part in parts:
            _check_returns_data(observed.prometheus, part, f"alert {name}")


def test_prometheus_evaluates_every_rule_healthy(observed: Observed) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{observed.prometheus}/api/v1/rules", timeout=20).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    rules = evaluated()
    assert {r["name"] for r in rules} == {name for name, _ in alert_expressions()}
    _until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in evaluated()), 20, "rule evaluations")
    bad = [(r["name"], r.get("lastError")) for r in evaluated() if r["health"] != "ok"]
    assert not bad, bad


def test_worker_down_and_load_error_alerts_see_the_events(observed: Observed) -> None:
    """The stub has no /metrics (up == 0) and refuses one adapter: both alert conditions hold."""
    assert query(observed.prometheus, 'up{job="vllm"} == 0')["data"]["result"]
    errors = query(observed.prometheus, dict(alert_expressions())["LoragateAdapterLoadErrors"])["data"]["result"]
    assert errors and errors[0]["metric"]["worker"].startswith("http://127.0.0.1:")


def test_compose_file_validates(tmp_path: Path) -> None:
    done = docker_compose_config(str(COMPOSE), {"LORAGATE_ADMIN_TOKEN": "compose-check"}, str(tmp_path))
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {"gateway", "worker-1", "worker-2", "prometheus", "grafana"}
    for name in ("worker-1", "worker-2"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
