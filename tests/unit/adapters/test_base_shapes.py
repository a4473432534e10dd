"""The base model's shapes from its config.json, and which LoRA pairs do not fit them (pure, plus file reading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loragate.adapters.base_shapes import BaseModelShapes
from loragate.errors import Unprocessable

# a GQA model: 8 query heads of 32, 2 key/value heads
GQA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
       "num_key_value_heads": 2}
P = "model.layers.{}.{}"


def test_projection_sizes_follow_the_config() -> None:
    shapes = BaseModelShapes.from_config(GQA)
    assert shapes.layers == 4
    assert shapes.projections["q_proj"] == (256, 256) and shapes.projections["k_proj"] == (256, 64)
    assert shapes.projections["o_proj"] == (256, 256) and shapes.projections["down_proj"] == (688, 256)
    nested = BaseModelShapes.from_config({"architectures": ["X"], "text_config": {**GQA, "head_dim": 64}})
    assert nested.projections["q_proj"] == (256, 512) and nested.projections["o_proj"] == (512, 256)


def test_mismatches_name_module_and_sizes() -> None:
    shapes = BaseModelShapes.from_config(GQA, "m/config.json")
    fitting = [(P.format(0, "self_attn.q_proj"), 256, 256), (P.format(3, "self_attn.v_proj"), 256, 64),
               (P.format(1, "mlp.down_proj"), 688, 256), (P.format(0, "custom.unknown"), 5, 7)]
    assert shapes.mismatches(fitting) == []
    wrong = [(P.format(0, "self_attn.v_proj"), 256, 256), (P.format(4, "self_attn.q_proj"), 256, 256)]
    problems = shapes.mismatches(wrong)
    assert problems == [
        "model.layers.0.self_attn.v_proj: LoRA maps 256 -> 256 features, the base model's v_proj maps 256 -> 64",
        "model.layers.4.self_attn.q_proj: layer 4 does not exist (the base model has 4 layers)"]
    with pytest.raises(Unprocessable, match=r"does not fit the base model \(m/config.json\)") as caught:
        shapes.check(wrong * 3)
    assert caught.value.code == "base_shape_mismatch" and "(and 3 more)" in caught.value.message


def test_reading_a_dir_or_file_and_refusing_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GQA))
    assert BaseModelShapes.read(tmp_path) == BaseModelShapes.read(tmp_path / "config.json")
    with pytest.raises(ValueError, match="cannot read"):
        BaseModelShapes.read(tmp_path / "missing")
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks the sizes of a decoder model"):
        BaseModelShapes.read(tmp_path / "bad.json")
