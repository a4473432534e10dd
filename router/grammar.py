"""The ``X-Adapter-Policy`` grammar: an RFC 8941 structured-field Item, parsed by ``http-sfv``.

    base | pin;adapter="name" | select;min_score=0.35 | average;k=2;method=cat;... | chain;k=2;... | auto

Parsing is syntax only (policy names and parameters are checked by the policy registry), so a
syntax error and an unsupported policy produce different, precise messages.
"""

from __future__ import annotations

from decimal import Decimal
from types import MappingProxyType

from http_sfv.item import Item
from http_sfv.types import Token

from loragate.errors import InvalidRequest
from loragate.router.types import ParamValue, PolicySpec

GRAMMAR = (
    'X-Adapter-Policy is an RFC 8941 item: a policy token with ;key=value parameters, e.g. '
    '`base`, `pin;adapter="spouses"`, `select;min_score=0.35`, '
    '`average;k=2;method=cat;weights=softmax;temperature=0.05`, '
    '`average;adapters="a b";weights="0.5 0.5";method=linear`, `chain;k=2;choose=likelihood;max_steps=8`, '
    '`chain;adapters="a b";base=?1`, `auto`'
)


def _plain(value: object) -> ParamValue:
    if isinstance(value, bool | int):
        return value
    if isinstance(value, Decimal | float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    raise InvalidRequest(f"unsupported parameter value {value!r} in X-Adapter-Policy. {GRAMMAR}",
                         param="X-Adapter-Policy", code="invalid_policy")


def parse_policy(text: str, *, source: str) -> PolicySpec:
    """Parse header (or body field) text into a :class:`PolicySpec`; 400 with the grammar on failure."""
    item = Item()
    try:
        item.parse(text.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidRequest(f"cannot parse X-Adapter-Policy {text!r}. {GRAMMAR}", param="X-Adapter-Policy",
                             code="invalid_policy") from exc
    if not isinstance(item.value, Token):
        raise InvalidRequest(f"X-Adapter-Policy must start with a policy name token, got {text!r}. {GRAMMAR}",
                             param="X-Adapter-Policy", code="invalid_policy")
    params = {str(k): _plain(v) for k, v in item.params.items()}
    return PolicySpec(name=str(item.value), params=MappingProxyType(params), source=source)


def serialize(spec: PolicySpec) -> str:
    """Header syntax for a spec (round-trips through :func:`parse_policy`)."""
    item = Item(Token(spec.name))
    for key, value in spec.params.items():
        item.params[key] = Token(value) if isinstance(value, str) and value.isidentifier() else value
    return str(item)
