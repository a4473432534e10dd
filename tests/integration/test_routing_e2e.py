"""Semantic routing end to end: select, average with exact merges, decision headers, PEFT equivalence."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import MODEL, Stack

GREEDY = {"temperature": 0, "max_tokens": 8}


def complete(stack: Stack, prompt: str, policy: str | None = None) -> httpx.Response:
    headers = {"x-adapter-policy": policy} if policy else {}
    return httpx.post(f"{stack.gateway}/v1/completions", json={"model": MODEL, "prompt": prompt, **GREEDY},
                      headers=headers, timeout=120)


def words(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"]).split()


def test_select_routes_by_descriptor_and_answers_like_pin(stack: Stack) -> None:
    cooking = complete(stack, "what should i cook with some rice and eggs", "select;min_score=0.2")
    assert cooking.headers["x-adapters"] == '"alpha";w=1.0'
    assert cooking.headers["x-route-scores"].startswith('"alpha";s=')
    assert words(cooking) == words(complete(stack, "what should i cook with some rice and eggs",
                                            'pin;adapter="alpha"'))
    stars = complete(stack, "how many moons does jupiter have", "select;min_score=0.2")
    assert stars.headers["x-adapters"] == '"beta";w=1.0'


def test_select_below_min_score_falls_back_to_base(stack: Stack) -> None:
    response = complete(stack, "the cat sat on the red chair", "select;min_score=0.95")
    assert "x-adapters" not in response.headers
    assert response.headers["x-route-fallback"] == "?1"
    assert words(response) == words(complete(stack, "the cat sat on the red chair", "base"))


def test_average_serves_a_cached_merge(stack: Stack) -> None:
    policy = 'average;adapters="alpha beta";weights="0.5 0.5";method=cat'
    first = complete(stack, "the cat sat on the red chair", policy)
    assert first.headers["x-adapters"] == '"alpha";w=0.5, "beta";w=0.5'
    merge_name = first.headers["x-adapter-merge"].split(";")[0].strip('"')
    assert merge_name.startswith("merge-") and first.headers["x-adapter-merge"].endswith("method=cat")
    again = complete(stack, "the cat sat on the red chair", policy)
    assert words(again) == words(first)
    metrics = httpx.get(f"{stack.gateway}/metrics").text
    assert 'loragate_merge_cache_total{result="build"} 1.0' in metrics
    assert 'loragate_merge_cache_total{result="hit"}' in metrics
    assert words(first) != words(complete(stack, "the cat sat on the red chair", "base"))


@pytest.mark.parametrize(("policy", "status", "fragment"), [
    ('average;adapters="alpha ghost"', 404, "'ghost'"),
    ("average;method=magic", 400, "cat, dare_linear, dare_ties, linear, svd, ties"),
    ("select;min_score=2", 400, "out of range"),
])
def test_routing_errors(stack: Stack, policy: str, status: int, fragment: str) -> None:
    response = complete(stack, "hello there", policy)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_cat_merge_on_vllm_matches_peft_cat_in_transformers(stack: Stack) -> None:
    """vLLM serving our cat merge gives the greedy tokens of PEFT's own cat merge in transformers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "the cat sat on the red chair and then"
    served = words(complete(stack, prompt, 'average;adapters="alpha beta";weights="0.7 0.3";method=cat'))

    tokenizer = AutoTokenizer.from_pretrained(stack.tiny.model)
    model = AutoModelForCausalLM.from_pretrained(stack.tiny.model, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, stack.tiny.root / "adapters" / "alpha", adapter_name="alpha")
    peft_model.load_adapter(str(stack.tiny.root / "adapters" / "beta"), adapter_name="beta")
    peft_model.add_weighted_adapter(["alpha", "beta"], [0.7, 0.3], adapter_name="both", combination_type="cat")
    peft_model.set_adapter("both")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reference = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).split()
    assert served == reference
