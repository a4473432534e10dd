"""The two-hop kit end to end: the shipped artifacts through the gateway on a real vLLM-CPU worker,
and a reduced-size build reproducing its own recorded numbers from the same seed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from examples import demo
from examples.twohop import build

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


def test_small_build_reproduces_its_recorded_numbers(tmp_path: Path) -> None:
    """Same seed, same numbers: CI rebuilds the reduced kit and compares with what was recorded."""
    out = tmp_path / "kit"
    proc = subprocess.run([sys.executable, "examples/twohop/build.py", "--size", "small", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    built = json.loads((out / "controls.json").read_text())
    reference = json.loads(REFERENCE.read_text())
    assert built["results"] == reference["results"]
    assert built["controls"] == reference["controls"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name for name in manifest} >= {"model/model.safetensors", "adapters/spouses/adapter_model.safetensors",
                                          "adapters/oracle/adapter_config.json", "eval/twohop-steps.jsonl"}
    assert demo.verify_kit(out)["plan"] == "small"
    assert build.PLANS["small"].size.eval_people * 3 == sum(1 for _ in (out / "eval" / "hop1.jsonl").open())
