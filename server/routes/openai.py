"""OpenAI-compatible routes; thin: translate HTTP to the completion service and back."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from loragate.server.app import Services
from loragate.server.pipeline import POLICY_HEADER, CompletionRequest, parse_json_body
from loragate.server.routes.deps import request_id, services

router = APIRouter(prefix="/v1", tags=["openai"])


async def _complete(route: str, request: Request, svc: Services) -> Response:
    received = time.perf_counter()
    call = CompletionRequest(route=route, body=parse_json_body(await request.body()), request_id=request_id(request),
                             policy_header=request.headers.get(POLICY_HEADER), received_at=received)
    result = await svc.completions.complete(call)
    if result.stream is not None:
        return StreamingResponse(result.stream, status_code=result.status, headers=dict(result.headers),
                                 media_type=result.media_type)
    return Response(result.content, status_code=result.status, headers=dict(result.headers),
                    media_type=result.media_type)


@router.post("/completions")
async def completions(request: Request, svc: Services = Depends(services)) -> Response:
    return await _complete("completions", request, svc)


@router.post("/chat/completions")
async def chat_completions(request: Request, svc: Services = Depends(services)) -> Response:
    return await _complete("chat.completions", request, svc)


@router.get("/models")
async def models(svc: Services = Depends(services)) -> dict[str, object]:
    base = svc.settings.model
    data: list[dict[str, object]] = [{"id": base, "object": "model", "created": 0, "owned_by": "loragate",
                                      "root": base, "parent": None}]
    data += [{"id": r.name, "object": "model", "created": int(r.created_at), "owned_by": "loragate",
              "root": r.sha256, "parent": base} for r in svc.registry.snapshot().values()]
    return {"object": "list", "data": data}
