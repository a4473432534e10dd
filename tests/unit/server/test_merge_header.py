"""X-Adapter-Merge names the merge, its method and every parameter it was keyed by, as an RFC 8941 item."""

from __future__ import annotations

from types import MappingProxyType

from http_sfv.item import Item
from http_sfv.types import Token

from loragate.adapters.resolve import Servable
from loragate.server.headers import merge_header


def parsed(text: str) -> Item:
    item = Item()
    item.parse(text.encode())
    return item


def test_merge_header_carries_method_and_parameters() -> None:
    ties = Servable("merge-0123456789abcdef", "/m", "ties",
                    params=MappingProxyType({"density": 0.5, "majority": "total"}))
    text = merge_header(ties)
    assert text == '"merge-0123456789abcdef";method=ties;density=0.5;majority=total'
    item = parsed(text)
    assert item.value == "merge-0123456789abcdef"
    assert dict(item.params) == {"method": Token("ties"), "density": 0.5, "majority": Token("total")}
    dare = parsed(merge_header(Servable("merge-x", "/m", "dare_ties",
                                        params=MappingProxyType({"density": 0.25, "majority": "frequency",
                                                                 "seed": 7}))))
    assert dict(dare.params) == {"method": Token("dare_ties"), "density": 0.25, "majority": Token("frequency"),
                                 "seed": 7}


def test_merge_header_without_parameters_is_as_before() -> None:
    assert merge_header(Servable("merge-x", "/m", "cat")) == '"merge-x";method=cat'
    assert merge_header(Servable("merge-x", "/m", "svd", params=MappingProxyType({"target_rank": 8}))) == (
        '"merge-x";method=svd;target_rank=8')
