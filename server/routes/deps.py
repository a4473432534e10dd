"""Request-scoped helpers shared by the route modules."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

from loragate.server.app import Services

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def request_id(request: Request) -> str:
    """The client's X-Request-Id when it is sane, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
