"""The X-Adapter-Policy grammar (RFC 8941 items via http-sfv)."""

from __future__ import annotations

import pytest

from loragate.errors import InvalidRequest
from loragate.router.grammar import parse_policy, serialize


@pytest.mark.parametrize(("text", "name", "params"), [
    ("base", "base", {}),
    ('pin;adapter="spouses"', "pin", {"adapter": "spouses"}),
    ("select;min_score=0.35", "select", {"min_score": 0.35}),
    ("average;k=2;method=cat;weights=softmax;temperature=0.05", "average",
     {"k": 2, "method": "cat", "weights": "softmax", "temperature": 0.05}),
    ('average;adapters="spouses birthplaces";weights="0.5 0.5";method=linear', "average",
     {"adapters": "spouses birthplaces", "weights": "0.5 0.5", "method": "linear"}),
    ("auto", "auto", {}),
])
def test_examples_from_the_design_parse(text: str, name: str, params: dict[str, object]) -> None:
    spec = parse_policy(text, source="header")
    assert spec.name == name
    assert dict(spec.params) == params
    assert parse_policy(serialize(spec), source="header") == spec


@pytest.mark.parametrize("text", ['pin;adapter="unterminated', "", "1pin", '"quoted"', "pin;;", "pin adapter=x"])
def test_unparsable_is_400_showing_the_grammar(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_policy(text, source="header")
    assert caught.value.status == 400
    assert 'pin;adapter="spouses"' in caught.value.message
