"""Generate loragate's Grafana dashboards (``deploy/grafana/dashboards/*.json``) with grafana-foundation-sdk.

Why code and not hand-edited JSON: every panel's PromQL is written once here, from the metrics
catalogue (``server/metrics.py``, README "Metrics"), and the committed JSON is only its output.
``--check`` fails when the two drift (a unit test runs it), and the integration test evaluates
every panel expression against a real Prometheus scraping a gateway, so a renamed metric or a
typo in a label shows up in the tests rather than as an empty panel in production.

Conventions of the expressions:

- rates use Grafana's ``$__rate_interval``; "over the selected range" panels use ``$__range``;
- ratios are written so that a group with traffic but no matching events reads 0, not "no data"
  (``sum by (g) (rate(x{match}[w]) or rate(x[w]) * 0) / sum by (g) (rate(x[w]))``), because a
  hit rate that fell to zero must still be a line on the graph (and fire the alert);
- panels use the dashboard's ``datasource`` variable, so the JSON imports into any Grafana.

Usage::

    python -m deploy.dashboards.generate            # (re)write the JSON files
    python -m deploy.dashboards.generate --check    # exit 1 when the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, dashboard, heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

OUT_DIR = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
"""Where the dashboards are written (Grafana's provisioning reads this folder)."""

RATE = "$__rate_interval"
RANGE = "$__range"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["loragate"]

# -- PromQL helpers -----------------------------------------------------------------------------------


def selector(metric: str, match: str = "") -> str:
    """``metric{match}`` (or the bare name when there is nothing to match)."""
    return f"{metric}{{{match}}}" if match else metric


def rate(metric: str, match: str = "", window: str = RATE) -> str:
    """Per-second rate of a counter (or of a histogram's ``_bucket``/``_count`` series)."""
    return f"rate({selector(metric, match)}[{window}])"


def summed_rate(metric: str, by: str, match: str = "", window: str = RATE) -> str:
    """Rate summed by the labels ``by`` (comma separated)."""
    return f"sum by ({by}) ({rate(metric, match, window)})"


def share(metric: str, part: str, by: str = "", base: str = "", window: str = RATE) -> str:
    """The share of ``metric{base}``'s rate that also matches ``part``, per group of ``by``.

    A group with traffic but no matching events is 0 (not absent): ``or ... * 0`` adds the
    non-matching series at zero before summing.
    """
    grouping = f"sum by ({by}) " if by else "sum "
    whole = rate(metric, base, window)
    matched = rate(metric, f"{base}, {part}" if base else part, window)
    return f"{grouping}({matched} or {whole} * 0) / {grouping}({whole})"


def quantile(q: float, histogram: str, by: str, window: str = RATE) -> str:
    """The ``q`` quantile of a Prometheus histogram, per group of ``by``."""
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(histogram + '_bucket', window=window)}))"


# -- panel helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str
    instant: bool = False
    format: prometheus_models.PromQueryFormat | None = None  # None: Grafana's default (time series)


def _targets(queries: Sequence[Query]) -> list[prometheus.Dataquery]:
    targets = []
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
        target = target.instant() if query.instant else target.range()
        if query.format is not None:
            target = target.format(query.format)
        targets.append(target)
    return targets


def _legend() -> common.VizLegendOptions:
    return (common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.TABLE)
            .placement(common_models.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "lastNotNull"]))


def graph(title: str, description: str, unit: str, queries: Sequence[Query], *, width: int = 12,
          stacked: bool = False, ratio: bool = False) -> timeseries.Panel:
    """A time series panel; ``ratio`` pins the axis to 0..1, ``stacked`` stacks the series."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(8).legend(_legend()).line_width(1).fill_opacity(10))
    if ratio:
        panel = panel.min(0).max(1)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(common_models.StackingMode.NORMAL)).fill_opacity(40)
    for target in _targets(queries):
        panel = panel.with_target(target)
    return panel


def bars(title: str, description: str, unit: str, queries: Sequence[Query], *, width: int = 12,
         ratio: bool = False) -> bargauge.Panel:
    """A horizontal bar gauge over instant queries (one bar per series)."""
    panel = (bargauge.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(8).orientation(common_models.VizOrientation.HORIZONTAL)
             .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
             .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if ratio:
        panel = panel.min(0).max(1)
    for target in _targets(queries):
        panel = panel.with_target(target)
    return panel


def single(title: str, description: str, unit: str, query: Query, *, width: int = 6) -> stat.Panel:
    """A single-value stat panel."""
    panel = (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(4).reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"])))
    for target in _targets([query]):
        panel = panel.with_target(target)
    return panel


def score_heatmap(title: str, description: str, query: Query, *, width: int = 12) -> heatmap.Panel:
    """A heatmap of pre-bucketed histogram data (``format=heatmap``, Grafana does not re-bucket)."""
    panel = (heatmap.Panel().title(title).description(description).datasource(DATASOURCE).span(width).height(8)
             .calculate(False).mode(common_models.TooltipDisplayMode.SINGLE).show_legend()
             .rows_frame(heatmap.RowsHeatmapOptions().layout(common_models.HeatmapCellLayout.LE))
             .color(heatmap.HeatmapColorOptions().scheme("Oranges").steps(64)))
    for target in _targets([query]):
        panel = panel.with_target(target)
    return panel


def listing(title: str, description: str, unit: str, queries: Sequence[str], *, sort: str,
            renames: Mapping[str, str] | None = None, hidden: Sequence[str] = ("Time",), width: int = 12,
            height: int = 8, overrides: Mapping[str, Sequence[tuple[str, object]]] | None = None) -> table.Panel:
    """A table of instant queries, one row per label set, sorted by the column ``sort``.

    Grafana's ``merge`` joins the queries on their labels (each value column is ``Value #<ref>``, or
    ``Value`` with one query); ``organize`` renames columns by ``renames`` and drops the ``hidden`` ones.
    ``overrides``: column (as renamed) -> (field property, value) pairs.
    """
    targets = [Query(expr, "", instant=True, format=prometheus_models.PromQueryFormat.TABLE) for expr in queries]
    panel = (table.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).sort_by([common.TableSortByFieldState().display_name(sort)])
             .with_transformation(dashboard_models.DataTransformerConfig(id_val="merge", options={}))
             .with_transformation(dashboard_models.DataTransformerConfig(
                 id_val="organize", options={"excludeByName": dict.fromkeys(hidden, True),
                                             "renameByName": dict(renames or {})})))
    for name, properties in (overrides or {}).items():
        panel = panel.override_by_name(name, [dashboard_models.DynamicConfigValue(id_val=key, value=value)
                                              for key, value in properties])
    for target in _targets(targets):
        panel = panel.with_target(target)
    return panel


def _base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    datasource = (dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
                  .current(dashboard_models.VariableOption(selected=True, text="Prometheus", value="prometheus")))
    link = (dashboard.DashboardLink("loragate").type(dashboard_models.DashboardLinkType.DASHBOARDS).tags(TAGS)
            .as_dropdown(True).include_vars(True).keep_time(True))
    return (dashboard.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .time("now-6h", "now").refresh("30s").timezone("browser")
            .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR).with_variable(datasource).link(link))


def _numbered(builder: dashboard.Dashboard) -> dashboard.Dashboard:
    """Panel ids 1..n in layout order (Grafana needs them unique within a dashboard)."""
    built = builder.build()
    next_id = 1
    for panel in built.panels or []:
        panel.id_val = next_id
        next_id += 1
        for child in getattr(panel, "panels", None) or []:
            child.id_val = next_id
            next_id += 1
    return builder


# -- the dashboards -----------------------------------------------------------------------------------

AUTO_ARM = "loragate_auto_arm_success"
DECISIONS = "loragate_routing_decisions_total"
OUTCOMES = "loragate_outcomes_total"
REQUESTS = "loragate_requests_total"


def routing_dashboard() -> dashboard.Dashboard:
    """Where adapter reuse works: routing, compositional queries, graded outcomes, shadows, merges."""
    d = _base("loragate-routing", "loragate / routing and reuse",
              "Routing hit rates, compositional share and success by policy: where adapter reuse works on live "
              "traffic and where it fails (see DESIGN.md, 'Compositional queries and outcomes').")
    d = (d.with_row(dashboard.Row("Routing"))
         .with_panel(graph(
             "Routing hit rate by policy",
             "hit / (hit + fallback) of searching policies (select, average): the share of routed requests that "
             "found an adapter scoring at least min_score.", "percentunit",
             [Query(share(DECISIONS, 'result="hit"', "policy"), "{{policy}}")], ratio=True))
         .with_panel(graph(
             "Fallback-to-base rate by policy",
             "Share of routed requests answered by the base model because no adapter scored high enough.",
             "percentunit", [Query(share(DECISIONS, 'result="fallback"', "policy"), "{{policy}}")], ratio=True))
         .with_panel(graph(
             "Selections per adapter",
             "Adapters chosen by decisions per second (pins, selections and merge inputs; names beyond the "
             "first 200 are counted as 'other').", "reqps",
             [Query(summed_rate("loragate_adapter_selections_total", "adapter"), "{{adapter}}")], stacked=True))
         .with_panel(score_heatmap(
             "Similarity score of the nearest adapter",
             "Distribution of the top candidate's similarity per routed request (loragate_route_top_score). "
             "Mass below the policies' min_score is traffic no adapter covers.",
             Query(f"sum by (le) ({rate('loragate_route_top_score_bucket')})", "{{le}}",
                   format=prometheus_models.PromQueryFormat.HEATMAP)))
         .with_panel(graph(
             "Nearest-adapter score p10 / p50 by policy", "Quantiles of the top candidate's similarity.", "none",
             [Query(quantile(0.1, "loragate_route_top_score", "policy"), "p10 {{policy}}"),
              Query(quantile(0.5, "loragate_route_top_score", "policy"), "p50 {{policy}}")]))
         .with_panel(graph(
             "Routing time p50 / p99 by policy", "Embed + search + decide, per searching request.", "s",
             [Query(quantile(0.5, "loragate_route_seconds", "policy"), "p50 {{policy}}"),
              Query(quantile(0.99, "loragate_route_seconds", "policy"), "p99 {{policy}}")])))
    d = (d.with_row(dashboard.Row("Compositional queries and outcomes"))
         .with_panel(graph(
             "Compositional share by policy",
             "Share of routed requests flagged compositional (content spanning more than one adapter's domain), "
             "where data-agnostic reuse is known to fail most.", "percentunit",
             [Query(share("loragate_compositional_queries_total", 'compositional="true"', "policy"), "{{policy}}")],
             ratio=True))
         .with_panel(graph(
             "Success rate by policy x compositional",
             "Share of graded primary requests that succeeded (graded against X-Expected-Answer or by "
             "POST /v1/feedback), per applied policy and compositional flag.",
             "percentunit",
             [Query(share(OUTCOMES, 'result="success"', "policy, compositional", 'kind="primary"'),
                    "{{policy}} compositional={{compositional}}")], ratio=True))
         .with_panel(bars(
             "Success rate by policy x compositional (selected range)",
             "The same ratio over the whole selected time range: steadier for sparse evaluation traffic.",
             "percentunit",
             [Query(share(OUTCOMES, 'result="success"', "policy, compositional", 'kind="primary"', RANGE),
                    "{{policy}} compositional={{compositional}}", instant=True)], ratio=True))
         .with_panel(graph(
             "Shadow comparison: success rate, primary vs shadow",
             "Success of the client's policy (kind=primary) and of the shadow policy run on the same requests "
             "(kind=shadow), by applied policy.", "percentunit",
             [Query(share(OUTCOMES, 'result="success"', "kind, policy"), "{{kind}} {{policy}}")], ratio=True))
         .with_panel(graph(
             "Graded requests by kind and result", "Volume behind the success rates.", "reqps",
             [Query(summed_rate(OUTCOMES, "kind, result"), "{{kind}} {{result}}")], stacked=True))
         .with_panel(graph(
             "Shadow runs by result", "Shadow runs done, failed, or dropped because too many were in flight.",
             "reqps", [Query(summed_rate("loragate_shadow_runs_total", "result"), "{{result}}")], stacked=True)))
    d = (d.with_row(dashboard.Row("Learned auto"))
         .with_panel(graph(
             "Auto choices by context and arm",
             "Client requests the learned auto routed per second, by context (nearest adapter / compositional "
             "flag by default) and the arm (policy) it chose for them.", "reqps",
             [Query(summed_rate("loragate_auto_choices_total", "context, arm"), "{{context}} {{arm}}")],
             width=16, stacked=True))
         .with_panel(listing(
             "Current choice per context",
             "The arm auto serves each context with now: the cheapest arm whose posterior mean reaches the best "
             "arm's lower 95% bound, or the default policy while a context has no graded outcomes (an arm "
             "any replica chooses is listed).", "none",
             ["max by (context, arm) (loragate_auto_choice) == 1"],
             sort="context", hidden=("Time", "Value"), width=8))
         .with_panel(listing(
             "Posterior success per arm and context (95% interval)",
             "Beta posterior of each arm's success in each context, from graded outcomes of primaries and "
             "exploring shadows, decayed by auto_half_life_s; 'graded' is the decayed evidence behind it.",
             "percentunit",
             [f"max by (context, arm) ({AUTO_ARM})", f"max by (context, arm) ({AUTO_ARM}_low)",
              f"max by (context, arm) ({AUTO_ARM}_high)", "max by (context, arm) (loragate_auto_arm_observations)"],
             sort="context", renames={"Value #A": "mean", "Value #B": "low 95%", "Value #C": "high 95%",
                                      "Value #D": "graded"},
             overrides={"graded": [("unit", "none"), ("decimals", 1)]}, width=24, height=10))
         .with_panel(graph(
             "Auto vs the best arm per context",
             "Success of auto's own client-path choices (series=auto) beside the best arm's posterior mean "
             "(series=best_arm), per context.", "percentunit",
             [Query("max by (context, series) (loragate_auto_success)", "{{context}} {{series}}")], ratio=True))
         .with_panel(graph(
             "Auto regret per context",
             "Best arm's posterior mean minus the success auto's choices had: what clients lost to the arms "
             "auto served them while it learned (negative: auto did better than the best arm's estimate).",
             "percentunit", [Query("max by (context) (loragate_auto_regret)", "{{context}}")])))
    d = (d.with_row(dashboard.Row("Chain (an adapter per step)"))
         .with_panel(graph(
             "Chain steps per request p50 / p90",
             "Steps of the chain answers completed (shadows included), by how steps are chosen: how far the "
             "answers go before EOS, max_tokens or max_steps.", "none",
             [Query(quantile(0.5, "loragate_chain_steps", "choose"), "p50 {{choose}}"),
              Query(quantile(0.9, "loragate_chain_steps", "choose"), "p90 {{choose}}")], width=8))
         .with_panel(graph(
             "Chain candidate generations per step",
             "Mean generations per step (the candidates, plus the base with base=?1): the work one step costs "
             "the workers.", "none",
             [Query(f"{summed_rate('loragate_chain_step_candidates_sum', 'choose')} / "
                    f"{summed_rate('loragate_chain_step_candidates_count', 'choose')}", "{{choose}}")], width=8))
         .with_panel(graph(
             "Chain step decision time p50 / p99",
             "Time to decide one step: every candidate's generation, in parallel, until the last finishes.", "s",
             [Query(quantile(0.5, "loragate_chain_step_seconds", "choose"), "p50 {{choose}}"),
              Query(quantile(0.99, "loragate_chain_step_seconds", "choose"), "p99 {{choose}}")], width=8)))
    d = (d.with_row(dashboard.Row("Merges (average)"))
         .with_panel(graph(
             "Merge build time p50 / p99 by method", "Time to build one merged adapter (cache misses only).", "s",
             [Query(quantile(0.5, "loragate_merge_build_seconds", "method"), "p50 {{method}}"),
              Query(quantile(0.99, "loragate_merge_build_seconds", "method"), "p99 {{method}}")]))
         .with_panel(graph(
             "Merge cache hit rate", "Merged-adapter lookups answered from the cache.", "percentunit",
             [Query(share("loragate_merge_cache_total", 'result="hit"'), "hit rate")], ratio=True))
         .with_panel(single(
             "Registered adapters", "Adapters in the registry.", "none",
             Query("max(loragate_registered_adapters)", "adapters", instant=True))))
    return _numbered(d)


def serving_dashboard() -> dashboard.Dashboard:
    """How the gateway and its workers serve: traffic, errors, latency, adapter loads per worker."""
    d = _base("loragate-serving", "loragate / serving",
              "Traffic, errors and latency of the gateway, and adapter loading on each vLLM worker.")
    d = (d.with_row(dashboard.Row("Traffic and errors"))
         .with_panel(graph(
             "Requests by route and policy", "Completion requests per second by applied policy "
             "('rejected': refused before a decision).", "reqps",
             [Query(summed_rate(REQUESTS, "route, policy"), "{{route}} {{policy}}")], stacked=True))
         .with_panel(graph(
             "Errors by status", "4xx are client mistakes (bad policy, unknown adapter); 502/503/504 are worker "
             "failures, no worker, timeouts.", "reqps",
             [Query(summed_rate(REQUESTS, "status", 'status=~"[45].."'), "{{status}}")], stacked=True))
         .with_panel(graph(
             "Error ratio", "Share of requests answered 4xx or 5xx.", "percentunit",
             [Query(share(REQUESTS, 'status=~"4.."'), "4xx"), Query(share(REQUESTS, 'status=~"5.."'), "5xx")],
             ratio=True)))
    d = (d.with_row(dashboard.Row("Latency"))
         .with_panel(graph(
             "Gateway overhead p50 / p99", "What the gateway itself adds: total minus upstream and adapter "
             "loading (parsing, routing, merge lookup, proxying).", "s",
             [Query(quantile(0.5, "loragate_gateway_overhead_seconds", "route"), "p50 {{route}}"),
              Query(quantile(0.99, "loragate_gateway_overhead_seconds", "route"), "p99 {{route}}")]))
         .with_panel(graph(
             "Upstream latency p50 / p99", "From sending to the worker until its full response.", "s",
             [Query(quantile(0.5, "loragate_upstream_latency_seconds", "route"), "p50 {{route}}"),
              Query(quantile(0.99, "loragate_upstream_latency_seconds", "route"), "p99 {{route}}")])))
    d = (d.with_row(dashboard.Row("Workers"))
         .with_panel(graph(
             "Adapter loads per worker", "Adapter loads by result; concurrent first requests share one load.",
             "reqps", [Query(summed_rate("loragate_adapter_loads_total", "worker, result"), "{{worker}} {{result}}")],
             stacked=True))
         .with_panel(graph(
             "Adapter load latency p50 / p99 per worker", "Latency of one adapter load on a worker.", "s",
             [Query(quantile(0.5, "loragate_adapter_load_seconds", "worker"), "p50 {{worker}}"),
              Query(quantile(0.99, "loragate_adapter_load_seconds", "worker"), "p99 {{worker}}")]))
         .with_panel(graph(
             "Loaded adapters per worker", "Adapters loaded on each worker, as the gateway knows it.", "none",
             [Query("max by (worker) (loragate_worker_loaded_adapters)", "{{worker}}")]))
         .with_panel(graph(
             "In-flight requests per worker", "Requests the gateway has in flight on each worker.", "none",
             [Query("max by (worker) (loragate_worker_inflight_requests)", "{{worker}}")]))
         .with_panel(graph(
             "Workers in rotation", "1 while a worker passes the gateway's health probes (0: out of rotation).",
             "none", [Query("max by (worker) (loragate_worker_healthy)", "{{worker}}")]))
         .with_panel(graph(
             "Worker scrape health", "Prometheus' own view: 1 when a worker's /metrics answered the last scrape.",
             "none", [Query('up{job="vllm"}', "{{instance}}")])))
    return _numbered(d)


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "loragate-routing": routing_dashboard,
    "loragate-serving": serving_dashboard,
}
"""File stem -> builder of each generated dashboard."""


def render(builder: dashboard.Dashboard) -> str:
    """Stable JSON text of one dashboard (sorted keys, two-space indent, trailing newline)."""
    return json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{stem}.json": render(build()) for stem, build in DASHBOARDS.items()}


def stale(out_dir: Path) -> list[str]:
    """Files in ``out_dir`` that differ from the generator's output, are missing, or are not generated."""
    expected = rendered()
    problems = [name for name, text in expected.items()
                if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]
    extra = sorted(p.name for p in out_dir.glob("*.json") if p.name not in expected) if out_dir.is_dir() else []
    return sorted(problems) + [f"{name} (not generated)" for name in extra]


def write(out_dir: Path) -> list[Path]:
    """Write every dashboard into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rendered().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.dashboards.generate",
        description="Generate loragate's Grafana dashboards (JSON) from code with grafana-foundation-sdk.")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the files in --out differ from the generator's output")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.out)
        if problems:
            print(f"dashboards out of date in {args.out}: {', '.join(problems)}\n"
                  "run: python -m deploy.dashboards.generate", file=sys.stderr)
            return 1
        print(f"dashboards up to date ({len(DASHBOARDS)} in {args.out})")
        return 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
