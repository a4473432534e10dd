"""The one exception tree of loragate.

Every error a client can cause carries its HTTP status and renders as an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``. Layers below ``server`` raise these without
knowing anything about HTTP frameworks; the server installs a single handler that renders them.
Client mistakes are 4xx by construction: only :class:`UpstreamError`, :class:`StorageUnavailable`
and :class:`GatewayError` map to 5xx. :class:`ConfigError` is the operator's mistake, found at
startup: it stops the gateway with its one-line message and is never an HTTP response.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LoragateError(Exception):
    """Base class: an error with an HTTP status and an OpenAI-style error body."""

    default_status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.status = status or self.default_status

    def body(self) -> dict[str, Any]:
        """The OpenAI-style JSON body for this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(LoragateError):
    """Malformed or out-of-range input (400)."""

    default_status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(LoragateError):
    """Missing or wrong bearer token (401)."""

    default_status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(LoragateError):
    """Authenticated or not, the action is not allowed (403): paths outside import roots, admin disabled."""

    default_status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(LoragateError):
    """A named adapter, model or record does not exist (404)."""

    default_status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(LoragateError):
    """The request clashes with existing state, e.g. a duplicate adapter name (409)."""

    default_status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(LoragateError):
    """An upload or adapter directory exceeds the configured size limit (413)."""

    default_status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class Unprocessable(LoragateError):
    """Well-formed input that cannot be served: not a LoRA, wrong base model, rank too high (422)."""

    default_status = 422
    type = "invalid_request_error"
    default_code = "unprocessable"


class UpstreamError(LoragateError):
    """A worker failed or could not be reached (502 by default; 503/504 via subclasses)."""

    default_status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class NoWorkerAvailable(UpstreamError):
    """No healthy worker can take the request (503)."""

    default_status = 503
    default_code = "no_worker_available"


class UpstreamTimeout(UpstreamError):
    """The worker did not answer in time (504)."""

    default_status = 504
    default_code = "upstream_timeout"


class StorageUnavailable(LoragateError):
    """The registry or outcome database (or the object store) cannot be reached (503): the request
    changed nothing and may be retried; the message says what is down, never a password."""

    default_status = 503
    type = "server_error"
    default_code = "storage_unavailable"


class WorkerRejected(LoragateError):
    """The worker answered with an error status; the gateway passes that status and message on."""

    default_status = 502
    type = "upstream_error"
    default_code = "worker_error"


class ConfigError(LoragateError):
    """A startup configuration mistake (a setting, the worker list, a policy or plugin name).

    Raised while the gateway is wired, before it listens: ``loragate serve``/``up`` print the message
    as one line and exit non-zero. ``param`` names the setting. Never a client's fault, so never a
    400; were one rendered, it would be a 500.
    """

    default_status = 500
    type = "server_error"
    default_code = "config_error"
