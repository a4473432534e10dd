"""Request-scoped helpers shared by the route modules."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

from loragate.errors import InvalidRequest
from loragate.server.app import Services

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


async def services(request: Request) -> Services:
    """The app's services. ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    which cost every request a thread round trip (and the GIL hand-offs with it) to read one attribute."""
    svc: Services = request.app.state.services
    return svc


def request_ids(request: Request) -> tuple[str, str]:
    """``(request id, outcome id)``: the client's X-Request-Id when it is sane, else a fresh one; and
    the key of the request's outcome record, unique even when a client sends the same id twice
    (the generated id itself, else a fresh one)."""
    given = request.headers.get("x-request-id", "")
    fresh = uuid.uuid4().hex
    return (given, fresh) if _REQUEST_ID.fullmatch(given) else (fresh, fresh)


def header_text(value: str) -> str:
    """A header value as the client wrote it.

    ASGI servers hand header bytes over and Starlette decodes them as latin-1, so a client's UTF-8
    (``pin;adapter="café"``, ``X-Expected-Answer: Zürich``) arrives garbled ("cafÃ©"): error
    messages quoted it wrongly and grading compared against the wrong answer. Bytes that are valid
    UTF-8 are read as UTF-8; anything else stays latin-1 (every byte string is valid latin-1).
    """
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return value


def single_header(request: Request, name: str) -> str | None:
    """The one value of header ``name`` (None if absent); a header sent twice is a 400.

    With two ``X-Adapter-Policy`` headers the first used to win silently; which one a client meant
    is unknowable, so the request is refused and names the header.
    """
    values = request.headers.getlist(name)
    if len(values) > 1:
        shown = "-".join(part.capitalize() for part in name.split("-"))  # x-adapter-policy -> X-Adapter-Policy
        raise InvalidRequest(f"{shown} was sent {len(values)} times; send it once", param=shown,
                             code="duplicate_header")
    return header_text(values[0]) if values else None
