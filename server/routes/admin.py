"""Admin routes under /admin (bearer token); thin wrappers over :class:`AdminService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import UploadFile

from loragate.errors import InvalidRequest, PayloadTooLarge
from loragate.server.app import Services
from loragate.server.calls import parse_json, parse_json_body
from loragate.server.routes.deps import services
from loragate.server.schemas import AdapterPatch, AdapterRegistration, AdapterUpload, request_body

_FORM_OVERHEAD = 1 << 20


async def authorized(request: Request, svc: Services = Depends(services)) -> Services:
    svc.auth.check(request.headers.get("authorization"))
    return svc


router = APIRouter(prefix="/admin", tags=["admin"])


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _examples(raw: Any) -> list[str]:
    if isinstance(raw, str):  # multipart sends examples as a JSON list in a text field
        raw = parse_json(raw, "examples (a JSON list of strings)", "examples") if raw else []
    if not isinstance(raw, list):
        raise InvalidRequest("examples must be a list of strings", param="examples")
    return raw


@router.post("/adapters", status_code=201, openapi_extra=request_body(
    ("application/json", AdapterRegistration), ("multipart/form-data", AdapterUpload)))
async def register(request: Request, response: Response, svc: Services = Depends(authorized)) -> dict[str, object]:
    """201 with the new record; 200 with the existing one when this repeats a committed registration."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        raise InvalidRequest("a form without files: send JSON {\"name\", \"path\"} for a server-side directory, "
                             "JSON {\"name\", \"source\"} for an s3:// URL, or multipart/form-data with `files` parts",
                             param="files")
    if content_type.startswith("multipart/form-data"):
        declared = int(request.headers.get("content-length") or 0)
        if declared > svc.admin.max_bytes + _FORM_OVERHEAD:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {svc.admin.max_bytes} bytes")
        async with request.form(max_files=4, max_fields=8) as form:
            for field in ("path", "source"):
                if field in form:
                    raise InvalidRequest(f"a multipart registration uploads files; {field} goes in a JSON body "
                                         "instead (path XOR upload XOR source)", param=field)
            files = {f.filename or "": _chunks(f) for f in form.getlist("files") if isinstance(f, UploadFile)}
            if not files:
                raise InvalidRequest("multipart registration needs `files` parts (adapter_config.json, "
                                     "adapter_model.safetensors)", param="files")
            registration = await svc.admin.register_upload(
                str(form.get("name", "")), files, str(form.get("description", "")),
                _examples(form.get("examples", "")))
    else:
        body = parse_json_body(await request.body())
        registration = await svc.admin.register_json(str(body.get("name", "")), body.get("path"), body.get("source"),
                                                     body.get("description", ""), _examples(body.get("examples", [])))
    if not registration.created:
        response.status_code = 200
    return registration.record.public()


@router.get("/limits")
async def limits(svc: Services = Depends(authorized)) -> dict[str, object]:
    """The registration limits (max_adapter_bytes, max_lora_rank), for clients to check before uploading."""
    return svc.admin.limits()


@router.get("/adapters")
async def list_adapters(svc: Services = Depends(authorized)) -> dict[str, object]:
    return {"object": "list", "data": [r.public() for r in svc.admin.adapters()]}


@router.get("/adapters/{name}")
async def show_adapter(name: str, svc: Services = Depends(authorized)) -> dict[str, object]:
    return svc.admin.show(name).public()


@router.patch("/adapters/{name}", openapi_extra=request_body(("application/json", AdapterPatch)))
async def patch_adapter(name: str, request: Request, svc: Services = Depends(authorized)) -> dict[str, object]:
    body = parse_json_body(await request.body())
    unknown = sorted(set(body) - {"description", "examples"})
    if unknown:
        raise InvalidRequest(f"only description and examples can be changed, not {unknown}", param=unknown[0])
    examples = _examples(body["examples"]) if "examples" in body else None
    return (await svc.admin.patch(name, body.get("description"), examples)).public()


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, svc: Services = Depends(authorized)) -> dict[str, object]:
    record = await svc.admin.delete(name)
    return {"id": record.name, "object": "adapter", "deleted": True}


@router.get("/workers")
async def workers(svc: Services = Depends(authorized)) -> dict[str, object]:
    return {"object": "list", "data": [
        {"url": w.url, "healthy": w.healthy, "in_flight": w.in_flight, "loaded_adapters": list(w.loaded)}
        for w in svc.pool.views()]}


@router.get("/outcomes/summary")
async def outcomes_summary(svc: Services = Depends(authorized)) -> dict[str, object]:
    """Success rate with a Wilson 95% interval by policy x compositional, and paired shadow comparisons."""
    return await svc.outcomes.summary()


@router.get("/auto")
async def auto(svc: Services = Depends(authorized)) -> dict[str, object]:
    """The learned auto: per context, every arm's graded outcomes, posterior mean and 95% interval, and the choice."""
    if svc.auto is None:
        return {"object": "auto", "enabled": False, "default": svc.settings.default_policy, "contexts": []}
    return svc.auto.report()


@router.get("/outcomes")
async def outcomes(limit: int = 100, svc: Services = Depends(authorized)) -> dict[str, object]:
    """The most recent outcome records."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit must be in [1, 10000]", param="limit")
    return {"object": "list", "data": await svc.outcomes.records(limit)}
