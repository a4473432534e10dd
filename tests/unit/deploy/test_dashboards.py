"""The generated Grafana dashboards: no drift from the generator, and only catalogued metrics in the PromQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from deploy.dashboards import generate
from loragate.server.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[3]
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
PROMQL_WORDS = {"sum", "by", "rate", "increase", "or", "and", "unless", "histogram_quantile", "max", "le", "bool",
                "on", "ignoring"}


def catalogued_series() -> set[str]:
    """Every series name the gateway exports (histograms with their suffixes), plus Prometheus' ``up``."""
    names = {"up"}
    for family in GatewayMetrics.catalogue().registry.collect():
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Identifiers in ``expr`` that name series (not functions, keywords, labels or durations)."""
    without_matchers = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    without_grouping = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", without_matchers)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_grouping))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", n)}


def all_targets() -> list[tuple[str, str]]:
    out = []
    for path in sorted(generate.OUT_DIR.glob("*.json")):
        def walk(panels: list[dict[str, object]]) -> None:
            for panel in panels:
                for target in panel.get("targets") or []:  # type: ignore[attr-defined]
                    out.append((str(panel["title"]), str(target["expr"])))
                walk(panel.get("panels") or [])  # type: ignore[arg-type]
        walk(json.loads(path.read_text())["panels"])
    return out


def test_committed_json_matches_the_generator() -> None:
    """The drift test: regenerate with `python -m deploy.dashboards.generate` when this fails."""
    done = subprocess.run([sys.executable, "-m", "deploy.dashboards.generate", "--check"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout


def test_check_fails_on_drift_and_passes_after_writing(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    first = sorted(tmp_path.glob("*.json"))[0]
    first.write_text(first.read_text().replace("Routing", "Rooting").replace("Traffic", "Trafic"))
    (tmp_path / "stray.json").write_text("{}")
    assert generate.stale(tmp_path) == [first.name, "stray.json (not generated)"]
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


def test_help_works() -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.dashboards.generate", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "--check" in done.stdout


def test_panels_use_only_catalogued_metrics() -> None:
    known = catalogued_series()
    targets = all_targets()
    assert len(targets) >= 20
    for title, expr in targets:
        unknown = metric_names(expr) - known
        assert not unknown, f"{title}: {sorted(unknown)} not in server/metrics.py"


def test_every_requested_metric_has_a_panel() -> None:
    used = set().union(*(metric_names(expr) for _, expr in all_targets()))
    for metric in ("loragate_routing_decisions_total", "loragate_adapter_selections_total",
                   "loragate_route_top_score_bucket", "loragate_compositional_queries_total",
                   "loragate_outcomes_total", "loragate_merge_build_seconds_bucket", "loragate_merge_cache_total",
                   "loragate_adapter_loads_total", "loragate_adapter_load_seconds_bucket",
                   "loragate_worker_loaded_adapters", "loragate_gateway_overhead_seconds_bucket",
                   "loragate_upstream_latency_seconds_bucket", "loragate_requests_total",
                   "loragate_auto_choices_total", "loragate_auto_choice", "loragate_auto_arm_success",
                   "loragate_auto_arm_success_low", "loragate_auto_arm_success_high", "loragate_auto_success",
                   "loragate_auto_regret"):
        assert metric in used, f"no panel reads {metric}"


def test_dashboards_are_importable_grafana_json() -> None:
    for path in sorted(generate.OUT_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and "loragate" in board["tags"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_metric_names_finds_series_not_functions_labels_or_windows() -> None:
    expr = ('histogram_quantile(0.5, sum by (le, policy) (rate(loragate_x_bucket{a="b c"}[5m]))) '
            '/ on (policy) up > bool 0.5 unless typo_metric')
    assert metric_names(expr) == {"loragate_x_bucket", "up", "typo_metric"}
