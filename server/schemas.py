"""Typed request bodies of the HTTP API, published in the OpenAPI document.

Why they exist: the routes read their bodies themselves (the proxy forwards what the client sent,
unknown fields included, and JSON is parsed once with :func:`loragate.server.calls.parse_json`),
so FastAPI saw no body parameters and the published spec declared no request bodies: clients and
schema-driven tools (schemathesis in the suite) could not know what to send. The OpenAI models
accept and keep unknown fields (``extra="allow"``): vLLM's own fields are forwarded untouched.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _OpenAIBody(BaseModel):
    """Fields every OpenAI completion request shares; anything else is forwarded as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The base model, or a registered adapter (which means `pin` on it).")
    adapter_policy: str | None = Field(None, description="X-Adapter-Policy syntax; the header wins. "
                                                         "Never forwarded to the worker.")
    stream: bool = Field(False, description="Relay the answer as server-sent events.")
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, or token ids; routing embeds the text.")


class ChatMessage(BaseModel):
    """One chat turn (``content`` text or OpenAI content parts); other fields are forwarded."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(_OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class FeedbackBody(BaseModel):
    """``POST /v1/feedback``: a verdict on one past request (unknown fields are a 400)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, description="The response's X-Request-Id.")
    outcome_id: str | None = Field(None, description="The response's X-Outcome-Id: names one record even "
                                                     "when a client reused its X-Request-Id.")
    success: bool | None = None
    score: float | None = Field(None, ge=0, le=1)
    note: str | None = Field(None, max_length=2000)
    overwrite: bool = False


class AdapterRegistration(BaseModel):
    """``POST /admin/adapters`` as JSON: a server-side directory inside the import roots, or a source URL
    whose files the gateway copies into its store (exactly one of ``path`` and ``source``)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["path"], "not": {"required": ["source"]}},
                  {"required": ["source"], "not": {"required": ["path"]}}]})

    name: str
    path: str | None = Field(None, description="A server-side directory inside the import roots.")
    source: str | None = Field(
        None, description="s3://bucket/prefix/ holding adapter_config.json and adapter_model.safetensors (only s3:// "
                          "for now), read with the gateway's object-store credentials, copied into its store and "
                          "validated like an upload.")
    description: str = ""
    examples: list[str] = []


class AdapterUpload(BaseModel):
    """``POST /admin/adapters`` as ``multipart/form-data``: the PEFT files uploaded."""

    name: str
    description: str = ""
    examples: str = Field("[]", description="A JSON list of example prompts.")
    files: list[bytes] = Field(description="adapter_config.json and adapter_model.safetensors.",
                               json_schema_extra={"items": {"type": "string", "format": "binary"}})


class AdapterPatch(BaseModel):
    """``PATCH /admin/adapters/{name}``: only the descriptors can change."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    examples: list[str] | None = None


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` to ``$defs`` replaced by its target (the models are not recursive)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, self-contained (an OpenAPI operation cannot carry ``$defs``)."""
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


def request_body(*models: tuple[str, type[BaseModel]]) -> dict[str, Any]:
    """``openapi_extra`` that declares a required request body, one schema per media type."""
    return {"requestBody": {"required": True, "content": {
        media: {"schema": json_schema(model)} for media, model in models}}}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"},
            "description": description}


COMPLETION_HEADERS: list[dict[str, Any]] = [
    _header("X-Adapter-Policy", "How to choose adapters (RFC 8941 item: `base`, `pin;adapter=\"a\"`, "
                                "`select`, `average;k=2`, `auto`); at most once."),
    _header("X-Adapter-Policy-Shadow", "Run the request again under this policy off the client's path; at most once."),
    _header("X-Expected-Answer", "Grade the answer against this (evaluation traffic; never forwarded); at most once."),
    _header("X-Request-Id", "Correlation id echoed back and sent to the worker (1-128 of A-Z a-z 0-9 . _ : -)."),
]


def completion_operation(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of an OpenAI completion route: its body and the gateway's headers."""
    return {**request_body(("application/json", model)), "parameters": COMPLETION_HEADERS}
