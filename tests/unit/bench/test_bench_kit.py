"""The seed benchmark of the two-hop kit: its tables from given builds (no build runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import bench_kit


def test_the_seed_benchmark_reports_each_control_per_seed_and_a_failed_one(tmp_path: Path) -> None:
    def built(oracle: float, hop2: float) -> dict[str, Any]:
        controls = {"oracle_twohop_steps": {"measured": oracle, "threshold": 0.8, "ok": oracle >= 0.8},
                    "hop_own_facts": {"measured": 1.0, "threshold": 0.9, "ok": True}}
        return {"controls": controls, "results": {"base": {"eval_hop2": hop2}}, "counts": {"base": {"eval_hop2": 48}},
                "oracle_rounds": {"extra": 0 if oracle >= 0.8 else 3,
                                  "measured": [{"twohop_steps": oracle}] * (1 if oracle >= 0.8 else 4)}}

    headline = bench_kit.write([0, 7], [built(1.0, 0.125), built(0.77, 0.104)], tmp_path)
    assert headline.startswith("small kit at seeds [0, 7]: controls failed at seeds [7]")
    text = (tmp_path / "kit.md").read_text()
    assert "| oracle_twohop_steps | 0.8 | 1.000 | 0.770 | 0.770 | **no** |" in text
    assert "| oracle extra training rounds |  | 0 | 3 |  |  |" in text
    assert "| base | eval_hop2 | 48 | 0.125 | 0.104 | 0.021 | 0.046 |" in text
    assert "seed 0: 1.000; seed 7: 0.770 -> 0.770 -> 0.770 -> 0.770." in text
