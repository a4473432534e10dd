"""Each rule of PEFT validation, on hand-made configs and shapes."""

from __future__ import annotations

import pytest

from loragate.adapters.peft_format import parse_spec
from loragate.errors import InvalidRequest, Unprocessable

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
          "base_model_name_or_path": "tiny-llama"}
SHAPES = [("base_model.model.layers.0.q_proj.lora_A.weight", (4, 32)),
          ("base_model.model.layers.0.q_proj.lora_B.weight", (64, 4))]


def test_valid_spec_reports_rank_scaling_and_modules() -> None:
    spec = parse_spec(CONFIG, SHAPES)
    assert (spec.rank, spec.alpha, spec.scaling) == (4, 8.0, 2.0)
    assert spec.module_paths == ("base_model.model.layers.0.q_proj",)
    rs = parse_spec({**CONFIG, "use_rslora": True}, SHAPES)
    assert rs.scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize(("override", "fragment"), [
    ({"peft_type": "PREFIX_TUNING"}, "not a LoRA"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": -1}, "lora_alpha must be positive"),
    ({"base_model_name_or_path": None}, "base_model_name_or_path is missing"),
    ({"target_modules": []}, "target_modules"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
])
def test_config_rules(override: dict[str, object], fragment: str) -> None:
    with pytest.raises(Unprocessable, match=fragment):
        parse_spec({**CONFIG, **override}, SHAPES)


def test_shape_inconsistent_with_rank_is_refused() -> None:
    with pytest.raises(Unprocessable, match="do not match rank r=8"):
        parse_spec({**CONFIG, "r": 8}, SHAPES)


def test_module_outside_target_modules_is_refused() -> None:
    shapes = [(k.replace("q_proj", "k_proj"), s) for k, s in SHAPES]
    with pytest.raises(Unprocessable, match="not covered by target_modules"):
        parse_spec(CONFIG, shapes)


def test_half_a_pair_is_refused() -> None:
    with pytest.raises(Unprocessable, match="has no lora_B"):
        parse_spec(CONFIG, SHAPES[:1])


def test_regex_target_modules_use_full_match() -> None:
    spec = parse_spec({**CONFIG, "target_modules": r".*\.(q_proj|v_proj)"}, SHAPES)
    assert spec.target_modules == (r".*\.(q_proj|v_proj)",)


def test_no_lora_tensors_is_refused() -> None:
    with pytest.raises(Unprocessable, match="no lora_A/lora_B"):
        parse_spec(CONFIG, [("model.embed_tokens.weight", (10, 4))])


def test_error_types_are_client_errors() -> None:
    assert issubclass(Unprocessable, Exception) and Unprocessable("x").status == 422
    assert InvalidRequest("x").status == 400
