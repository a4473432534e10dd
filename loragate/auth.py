"""The bearer-token check that /admin and /adapters-files share (the server and workers/ both use it).

Constant-time compare of the token after ``Bearer`` (scheme case-insensitive). Without a
configured token the routes are off: 403 with a message that says how to turn them on, unless
the operator opened them explicitly (``allow_unauthenticated``, local use only).
"""

from __future__ import annotations

import secrets

from loragate.errors import Forbidden, Unauthorized


class BearerAuth:
    """Checks an ``Authorization`` header against one configured token; ``what`` names the token in 401s."""

    def __init__(self, token: str | None, *, what: str, disabled: str, disabled_code: str,
                 allow_unauthenticated: bool = False) -> None:
        self._token = token.encode() if token else None
        self._open = allow_unauthenticated and token is None
        self._what = what
        self._disabled = disabled
        self._disabled_code = disabled_code

    def check(self, authorization: str | None) -> None:
        """Return if the header carries the token (or the routes are open); raise 403 or 401 otherwise."""
        if self._open:
            return
        if self._token is None:
            raise Forbidden(self._disabled, code=self._disabled_code)
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(presented.strip().encode(), self._token):
            raise Unauthorized(f"missing or invalid {self._what} bearer token")
