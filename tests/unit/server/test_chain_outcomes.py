"""A chain request in the outcome log, the metrics and shadows: its steps are stored and read back, the
summary groups it under ``chain`` like any policy, ``X-Adapter-Policy-Shadow: chain`` runs it through the chain
executor and grades it, and the step histograms count what ran.

Two levels: the request path over the scripted dispatcher of test_chain.py (multi-step answers, a real outcome
log on SQLite and on PostgreSQL, the real shadow scheduler), and the real app in front of the loadtest stub
(the admin API and ``loragate outcomes`` reading what it stored).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loragate.database import PostgresDatabase
from loragate.errors import UpstreamError
from loragate.loadtest.stub import StubApp
from loragate.router.types import StepChoice
from loragate.server.app import create_app
from loragate.server.cli import app as cli
from loragate.server.metrics import GatewayMetrics
from loragate.server.outcomes import OutcomeLog, OutcomeRecord, format_summary, steps_json
from loragate.server.settings import Settings
from loragate.server.shadows import ShadowConfig, ShadowScheduler
from loragate.workers.dispatch import InFlight
from loragate.workers.launch import free_port
from tests.lora_files import write_lora
from tests.servers import serving
from tests.unit.server.fakes import MODEL, Stages, failed, request
from tests.unit.server.test_chain import (
    HOPS,
    PROMPT,
    ScriptedDispatcher,
    build_chain,
    chain_request,
    contrastive,
    two_hops,
)
from tests.waiting import eventually

Logged = tuple[Stages, ScriptedDispatcher, OutcomeLog]
TOKEN = "chain-outcomes-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def logged(tmp_path: Path, database_url: str | None) -> Iterator[Logged]:
    """The request path over the two-hop script, recording into a real outcome log (SQLite, then PostgreSQL)."""
    stages, dispatcher = build_chain(two_hops)
    log = OutcomeLog(PostgresDatabase(database_url) if database_url else tmp_path / "o.sqlite3")
    stages.service.recorder.outcomes = log  # the real log instead of the list of records
    yield stages, dispatcher, log


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- the outcome log --------------------------------------------------------------------------------
def approx(mean: float) -> Any:
    """The default (contrastive) score of a step whose tokens average ``mean``."""
    return pytest.approx(contrastive(mean))


async def test_a_chain_stores_its_steps_and_the_summary_groups_it_as_chain(logged: Logged) -> None:
    stages, _, log = logged
    await stages.service.complete(chain_request(expected="Rome"))
    await stages.service.complete(chain_request('chain;adapters="spouses";max_steps=1', expected="Rome"))
    await stages.service.complete(request({"model": MODEL, "prompt": PROMPT}, policy="base", expected="Rome"))
    rows = {r["policy_asked"]: r for r in await log.records()}
    two_step = json.loads(rows[f'chain;adapters="{" ".join(HOPS)}"']["steps"])
    assert [(s["step"], s["adapter"], s["tokens"]) for s in two_step] == [(1, "spouses", 6), (2, "birthplaces", 6)]
    assert two_step[0]["score"] == approx(-0.1) and two_step[1]["score"] == approx(-0.2)
    assert two_step[1]["candidates"] == [{"adapter": "spouses", "score": approx(-1.2)},
                                         {"adapter": "birthplaces", "score": approx(-0.2)}]
    assert all(s["seconds"] >= 0 for s in two_step) and "text" not in two_step[0]  # no generated text is kept
    assert rows["base"]["steps"] is None  # not a chain
    summary = await log.summary()
    groups = {g["policy"]: g for g in summary["groups"]}
    assert set(groups) == {"chain", "base"}
    assert (groups["chain"]["requests"], groups["chain"]["graded"], groups["chain"]["successes"]) == (2, 2, 1)
    assert groups["chain"]["compositional"] == "unknown"  # no routing: not flagged
    assert (groups["base"]["graded"], groups["base"]["successes"]) == (1, 0)
    assert any(line.startswith("chain ") for line in format_summary(summary).splitlines())
    await log.close()


async def test_a_chain_that_failed_keeps_the_steps_it_decided(logged: Logged) -> None:
    stages, dispatcher, log = logged
    dispatcher.script = lambda model, answer: (failed(UpstreamError("worker stream broke"))
                                               if answer and model == "birthplaces" else two_hops(model, answer))
    with pytest.raises(UpstreamError):
        await stages.service.complete(chain_request(expected="Rome"))
    (row,) = await log.records()
    assert row["status"] == 502 and row["result"] == "unknown"
    assert [s["adapter"] for s in json.loads(row["steps"])] == ["spouses"]
    await log.close()


def test_steps_json_names_the_base_as_null_and_turns_a_score_of_no_tokens_into_null() -> None:
    steps = (StepChoice(None, float("-inf"), 0, "", ((None, float("-inf")), ("spouses", -0.25)), 0.5),)
    assert steps_json(steps) == [{"step": 1, "adapter": None, "score": None, "tokens": 0, "seconds": 0.5,
                                  "candidates": [{"adapter": None, "score": None},
                                                 {"adapter": "spouses", "score": -0.25}]}]
    stored = json.loads(OutcomeRecord("o", "r", 0.0, "primary", None, "completions", "chain", "chain", (), (), None,
                                      None, False, None, 0, 0, 0, 0, None, 0, 200, steps=steps).fields()["steps"])
    assert stored == steps_json(steps)  # strict JSON: no -Infinity for a client to choke on


# -- metrics ----------------------------------------------------------------------------------------
async def test_chain_histograms_count_steps_candidates_and_step_time() -> None:
    stages, dispatcher = build_chain(two_hops)
    metrics = stages.metrics
    await stages.service.complete(chain_request())  # two steps of two candidates (the EOS round adds none)
    await stages.service.complete(chain_request('chain;adapters="spouses birthplaces";base=?1;max_steps=1'))
    likelihood = {"choose": "likelihood"}
    assert sample(metrics, "loragate_chain_steps_count", **likelihood) == 2
    assert sample(metrics, "loragate_chain_steps_sum", **likelihood) == 3
    assert sample(metrics, "loragate_chain_step_candidates_count", **likelihood) == 3
    assert sample(metrics, "loragate_chain_step_candidates_sum", **likelihood) == 2 + 2 + 3  # base competed once
    assert sample(metrics, "loragate_chain_step_seconds_count", **likelihood) == 3
    assert sample(metrics, "loragate_chain_step_seconds_sum", **likelihood) == pytest.approx(
        sum(s.decide_s for e in stages.events for s in e.steps))
    dispatcher.script = lambda model, answer: failed(UpstreamError("broke")) if answer else two_hops(model, answer)
    with pytest.raises(UpstreamError):
        await stages.service.complete(chain_request())
    assert sample(metrics, "loragate_chain_steps_count", **likelihood) == 2  # a failed chain's count is no answer's
    assert sample(metrics, "loragate_chain_step_seconds_count", **likelihood) == 4  # its decided step counts
    with pytest.raises(Exception, match="stop strings"):
        await stages.service.complete(chain_request(stop=["!"]))  # refused after the decision: no steps
    assert sample(metrics, "loragate_chain_step_seconds_count", **likelihood) == 4


async def test_non_chain_requests_observe_no_chain_histograms() -> None:
    stages, _ = build_chain(two_hops)
    await stages.service.complete(request({"model": MODEL, "prompt": PROMPT}, policy="base"))
    assert sample(stages.metrics, "loragate_chain_steps_count", choose="likelihood") == 0


# -- shadows ----------------------------------------------------------------------------------------
async def test_a_chain_shadow_asked_by_header_runs_the_chain_and_pairs_graded(logged: Logged) -> None:
    """``X-Adapter-Policy-Shadow: chain`` on a base request: the scheduler submits the shadow through the
    service's entry point, whose executor registry runs the chain; it is graded and pairs with the primary."""
    stages, _, log = logged
    shadows = ShadowScheduler(ShadowConfig(max_wait_s=5.0, idle_s=0.01), stages.service.run, InFlight(),
                              stages.metrics)
    stages.service.recorder.subscribe(shadows.on_event)
    primary = await stages.service.complete(request({"model": MODEL, "prompt": PROMPT, "max_tokens": 64},
                                                    policy="base", expected="Rome", shadow="chain"))
    assert primary.status == 200
    await shadows.close()
    assert sample(stages.metrics, "loragate_shadow_runs_total", result="done") == 1
    rows = {r["kind"]: r for r in await log.records()}
    shadow = rows["shadow"]
    assert shadow["shadow_of"] == rows["primary"]["outcome_id"] and shadow["policy_applied"] == "chain"
    assert shadow["result"] == "success" and shadow["graded_by"] == "expected"
    assert [s["adapter"] for s in json.loads(shadow["steps"])] == ["spouses", "birthplaces"]
    assert json.loads(shadow["adapters"]) == [["spouses", 1.0], ["birthplaces", 1.0]]
    (pair,) = (await log.summary())["shadow_pairs"]
    assert (pair["primary_policy"], pair["shadow_policy"], pair["pairs"], pair["only_shadow"]) == (
        "base", "chain", 1, 1)
    await log.close()


# -- the real app -----------------------------------------------------------------------------------
@pytest.fixture
def gateway(tmp_path: Path, database_url: str | None) -> Iterator[str]:
    """The app (SQLite, then PostgreSQL) in front of the stub worker, with the two hops registered."""
    imports = tmp_path / "imports"
    for seed, name in enumerate(HOPS):
        write_lora(imports / name, seed=seed)
    with ExitStack() as stack:
        worker = stack.enter_context(serving(StubApp(), free_port()))
        settings = Settings(data_dir=tmp_path / "data", workers=[worker], embedder="none", port=free_port(),
                            admin_token=TOKEN, import_roots=[imports], database_url=database_url,  # type: ignore[arg-type]
                            probe_interval_s=0.05, outcomes_flush_interval_s=0.05)
        url = stack.enter_context(serving(create_app(settings), settings.port))
        for name in HOPS:
            body = {"name": name, "path": str(imports / name), "description": f"{name} facts", "examples": ["q"]}
            assert httpx.post(f"{url}/admin/adapters", json=body, headers=AUTH).status_code == 201
        yield url


def test_the_admin_api_and_the_cli_show_a_chain_like_any_policy(gateway: str) -> None:
    policy = f'chain;adapters="{" ".join(HOPS)}"'
    answer = httpx.post(f"{gateway}/v1/completions", json={"model": MODEL, "prompt": "hi"},
                        headers={"x-adapter-policy": policy, "x-expected-answer": "cat",
                                 "x-adapter-policy-shadow": "chain"}, timeout=30)
    assert answer.status_code == 200, answer.text
    chain = answer.json()["chain"]

    def records() -> dict[str, dict[str, Any]]:
        data = httpx.get(f"{gateway}/admin/outcomes", headers=AUTH).json()["data"]
        return {r["kind"]: r for r in data}

    eventually(lambda: "shadow" in records())  # the shadow runs once the primary is done and the gateway idle
    rows = records()
    primary, shadow = rows["primary"], rows["shadow"]
    assert primary["outcome_id"] == answer.headers["x-outcome-id"] and primary["result"] == "success"
    stored = json.loads(primary["steps"])
    assert [s["adapter"] for s in stored] == [s["adapter"] for s in chain["steps"]]
    # the stub sends no logprobs: every step scores -inf, which both the body and the record give as null
    assert [c["adapter"] for c in stored[0]["candidates"]] == list(HOPS) and stored[0]["score"] is None
    assert shadow["policy_applied"] == "chain" and json.loads(shadow["steps"]) and shadow["result"] == "success"
    summary = httpx.get(f"{gateway}/admin/outcomes/summary", headers=AUTH).json()
    assert [(g["policy"], g["requests"], g["successes"]) for g in summary["groups"]] == [("chain", 1, 1)]
    printed = CliRunner().invoke(cli, ["outcomes", "--url", gateway, "--token", TOKEN])
    assert printed.exit_code == 0, printed.output
    assert any(line.split()[:2] == ["chain", "unknown"] for line in printed.output.splitlines())
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'loragate_chain_steps_count{choose="likelihood"} 2.0' in metrics  # the primary and the shadow
