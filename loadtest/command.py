"""What ``loragate loadtest`` does once its options are parsed: run, show progress, summarize, save.

Kept apart from the typer command so the CLI stays a thin translation of flags into a
:class:`~loragate.loadtest.loadgen.LoadSpec`, and so the benchmarks reuse the same JSON format.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loragate.loadtest.loadgen import LoadResult, LoadSpec, planned_requests, run_load
from loragate.loadtest.stats import RequestRecord, Summary, summarize
from loragate.loadtest.workloads import WorkItem


def results_json(result: LoadResult, summary: Summary) -> dict[str, Any]:
    """The ``--json`` document: the spec (without headers, which may hold keys), summary and records."""
    spec = {k: v for k, v in asdict(result.spec).items() if k != "headers"}
    spec["extra_body"] = dict(result.spec.extra_body)
    return {"spec": spec, "summary": summary.to_json(),
            "records": [_record_json(r) for r in result.records]}


def _record_json(record: RequestRecord) -> dict[str, Any]:
    out = asdict(record)
    out["inter_token"] = list(record.inter_token)
    return out


def run_with_progress(spec: LoadSpec, workload: Sequence[WorkItem], show: bool = True) -> LoadResult:
    """Run the load with a tqdm bar on stderr (errors counted in its postfix)."""
    with tqdm(total=planned_requests(spec), desc="loadtest", unit="req", disable=not show, dynamic_ncols=True) as bar:
        errors = 0

        def tick(record: RequestRecord) -> None:
            nonlocal errors
            if not record.ok:
                errors += 1
                bar.set_postfix(errors=errors, refresh=False)
            bar.update(1)

        return asyncio.run(run_load(spec, workload, tick))


def execute(spec: LoadSpec, workload: Sequence[WorkItem], json_out: Path | None = None, plot_dir: Path | None = None,
            show_progress: bool = True) -> tuple[Summary, str]:
    """Run, then write ``json_out`` and ``plot_dir`` if given; returns the summary and its table."""
    from loragate.loadtest.stats import format_summary

    result = run_with_progress(spec, workload, show_progress)
    summary = summarize(result.records, result.elapsed_s)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results_json(result, summary), indent=1) + "\n")
    if plot_dir is not None:
        from loragate.loadtest.plots import write_all

        write_all(result.records, summary, plot_dir)
    return summary, format_summary(summary)
