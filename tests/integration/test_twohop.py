"""The two-hop kit end to end: the shipped artifacts through the gateway on a real vLLM-CPU worker,
and a reduced-size build that passes its controls and lands near its recorded numbers."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from examples import demo
from examples.twohop import build
from examples.twohop import world as w

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "examples" / "twohop" / "reference-small.json"


def test_shipped_kit_through_the_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hop LoRAs answer their own questions, the oracle composes, and the table is the outcome log's."""
    report = demo.verify_kit(demo.KIT)  # every shipped file matches the manifest
    assert report["plan"] == "full" and all(c["ok"] for c in report["controls"].values())
    code = demo.main(["--data-dir", str(tmp_path), "--per-cell", "24"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    result = json.loads((tmp_path / "reuse.json").read_text())
    cells = {(c["policy"], c["kind"]): c for c in result["cells"]}
    assert result["failed"] == 0 and len(cells) == len(demo.POLICIES) * len(demo.KINDS)
    assert all(c["n"] == 24 for c in cells.values())
    # the controls, measured live through loragate (not just at build time)
    assert cells["pin spouses", "hop1"]["rate"] >= 0.9
    assert cells["pin birthplaces", "hop2"]["rate"] >= 0.9
    assert cells["pin oracle", "twohop-steps"]["rate"] >= 0.8
    assert cells["base", "hop1"]["rate"] <= 0.3  # the base never saw this world: the adapters carry it
    # an independent recount straight from the gateway's SQLite outcome log
    with sqlite3.connect(tmp_path / "gateway" / "outcomes.sqlite3") as db:
        rows = db.execute("SELECT request_id, result FROM outcomes WHERE kind = 'primary' AND request_id LIKE ?",
                          (f"{result['prefix']}-%",)).fetchall()
    plan = demo.plan_traffic(demo.KIT, 24, 0)
    recount = demo.tabulate([(*demo.planned(rid, plan)[:2], res == "success") for rid, res in rows])
    assert {k: (c.n, c.ok) for k, c in recount.items()} == {k: (c["n"], c["ok"]) for k, c in cells.items()}
    assert (tmp_path / "reuse.png").stat().st_size > 10_000
    assert "agrees with the table" in printed and "loragate_outcomes_total{" in printed


def binomial_tolerance(rate: float, n: int, sigmas: float = 3.0) -> float:
    """How far a rate measured on ``n`` fixed questions may move when the model is retrained elsewhere.

    Another CPU model rounds float reductions differently, and a few hundred optimizer steps turn
    that into a slightly different model: each question's answer can flip. Treating the ``n``
    answers as Bernoulli draws at the recorded rate gives the spread ``sqrt(p(1-p)/n)``; ``p`` is
    kept one question away from 0 and 1, so a saturated cell may still lose (or gain) about
    ``sigmas`` questions. Measured: an Intel Xeon rebuild of the AMD EPYC reference moved 5 of 29
    cells, by at most 3 of 48 questions (oracle twohop-direct 0.0625 -> 0.0, tolerance 0.105),
    all of them chance-level cells of models that never saw those facts.
    """
    p = min(max(rate, 1 / n), 1 - 1 / n)
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_binomial_tolerance_keeps_saturated_cells_tight_and_chance_cells_honest() -> None:
    assert 2 / 48 < binomial_tolerance(1.0, 48) < 4 / 48  # about three of 48 questions
    assert binomial_tolerance(1.0, 288) < 0.011
    assert binomial_tolerance(0.0, 48) == pytest.approx(binomial_tolerance(1.0, 48))
    assert binomial_tolerance(0.125, 48) > 0.125 - 0.104  # the Xeon-vs-EPYC difference the exact test failed on


def test_small_build_lands_near_its_recorded_numbers(tmp_path: Path) -> None:
    """CI rebuilds the reduced kit: every control holds, every result is near the recorded one.

    "Same seed, same numbers" holds only on one machine (README); elsewhere the numbers are
    compared with the binomial tolerance of their question count.
    """
    out = tmp_path / "kit"
    proc = subprocess.run([sys.executable, "examples/twohop/build.py", "--size", "small", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    built = json.loads((out / "controls.json").read_text())
    reference = json.loads(REFERENCE.read_text())
    assert all(c["ok"] for c in built["controls"].values()), built["controls"]
    assert {k: c["threshold"] for k, c in built["controls"].items()} == \
        {k: c["threshold"] for k, c in reference["controls"].items()}
    assert built["results"].keys() == reference["results"].keys()
    far = {}
    for model, recorded in reference["results"].items():
        assert built["results"][model].keys() == recorded.keys()
        for metric, rate in recorded.items():
            n = built["counts"][model][metric]
            if abs(built["results"][model][metric] - rate) > binomial_tolerance(rate, n):
                far[model, metric] = (built["results"][model][metric], rate, n)
    assert not far, f"(built, recorded, questions) beyond 3 binomial sigmas: {far}"
    assert built["base_final_loss"] < 0.05  # the base memorised its worlds (recorded: 0.0002)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name for name in manifest} >= {"model/model.safetensors", "adapters/spouses/adapter_model.safetensors",
                                          "adapters/oracle/adapter_config.json", "eval/twohop-steps.jsonl"}
    assert demo.verify_kit(out)["plan"] == "small"
    assert build.PLANS["small"].size.eval_people * 3 == sum(1 for _ in (out / "eval" / "hop1.jsonl").open())


def test_an_oracle_that_never_composes_gets_bounded_extra_rounds_then_fails_the_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real build path with a model far too small to learn anything (seconds, not minutes)."""
    tiny = build.TrainPlan(w.KitSize(base_worlds=1, people_per_world=8, eval_people=4, cities=4), layers=1,
                           hidden=64, ffn=64, base_steps=3, lora_steps=2, batch=8)
    monkeypatch.setitem(build.PLANS, "tiny", tiny)
    assert build.main(["--size", "tiny", "--seed", "5", "--out", str(tmp_path / "kit")]) == 1
    report = json.loads((tmp_path / "kit" / "controls.json").read_text())
    assert not report["controls"]["oracle_twohop_steps"]["ok"]
    rounds = report["oracle_rounds"]
    assert rounds["extra"] == build.ORACLE_EXTRA_ROUNDS and len(rounds["measured"]) == build.ORACLE_EXTRA_ROUNDS + 1
    assert set(rounds["measured"][0]) == {"twohop_steps", "hop1_statements", "hop2_statements"}
    assert report["counts"]["oracle"]["eval_twohop-steps"] == 3 * 4  # every question of the 4 evaluation people
