"""OpenAI-compatible routes; thin: translate HTTP to the completion service and back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loragate.errors import InvalidRequest
from loragate.server.app import Services
from loragate.server.calls import EXPECTED_HEADER, POLICY_HEADER, SHADOW_HEADER, CompletionRequest, parse_json_body
from loragate.server.executors import ProxiedResponse
from loragate.server.outcomes import Feedback
from loragate.server.recorder import RecordedStream
from loragate.server.routes.deps import request_ids, services, single_header
from loragate.server.schemas import (
    ChatCompletionBody,
    CompletionBody,
    FeedbackBody,
    completion_operation,
    request_body,
)
from loragate.workers.dispatch import CLIENT_CLOSED

router = APIRouter(prefix="/v1", tags=["openai"])


def expected_answer(request: Request) -> str | None:
    """X-Expected-Answer (evaluation traffic): graded by the gateway, never sent to the worker."""
    value = single_header(request, EXPECTED_HEADER)
    if value is not None and not 0 < len(value.strip()) <= 1000:
        raise InvalidRequest("X-Expected-Answer must be 1 to 1000 characters", param="X-Expected-Answer")
    return value


class RelayResponse(StreamingResponse):
    """A streamed completion that is closed however sending ends: finished, failed, or the client gone
    before the first byte (the stream then never iterated) — closing it releases the worker and ends
    the request's record."""

    def __init__(self, stream: RecordedStream, status_code: int, headers: dict[str, str], media_type: str) -> None:
        super().__init__(stream, status_code=status_code, headers=headers, media_type=media_type)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[ProxiedResponse]) -> ProxiedResponse:
    """``work``, cancelled if the client disconnects first: a whole answer nobody waits for (a chain's
    steps, a worker's generation) stops instead of running on; the request is recorded as 499.

    The work runs in this task (a watcher task cancels it): a worker's stream must be read in the task
    that opened it, since aiohttp ties a request's timeouts to its task."""
    handler = asyncio.current_task()
    assert handler is not None

    async def watch() -> bool:
        await _disconnected(request)
        handler.cancel()
        return True

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not (watcher.done() and not watcher.cancelled() and watcher.result()):
            raise  # cancelled for another reason (shutdown): let it through
        handler.uncancel()
        return ProxiedResponse(CLIENT_CLOSED, {}, "application/json")
    finally:
        watcher.cancel()


async def _complete(route: str, request: Request, svc: Services) -> Response:
    received = time.perf_counter()
    rid, outcome_id = request_ids(request)
    request.state.request_id = rid
    call = CompletionRequest(route=route, body=parse_json_body(await request.body()), request_id=rid,
                             policy_header=single_header(request, POLICY_HEADER), received_at=received,
                             expected=expected_answer(request), shadow_header=single_header(request, SHADOW_HEADER),
                             outcome_id=outcome_id)
    result = await unless_disconnected(request, svc.completions.complete(call))
    if result.stream is not None:
        return RelayResponse(result.stream, status_code=result.status, headers=dict(result.headers),
                             media_type=result.media_type)
    return Response(result.content, status_code=result.status, headers=dict(result.headers),
                    media_type=result.media_type)


@router.post("/completions", openapi_extra=completion_operation(CompletionBody))
async def completions(request: Request, svc: Services = Depends(services)) -> Response:
    return await _complete("completions", request, svc)


@router.post("/chat/completions", openapi_extra=completion_operation(ChatCompletionBody))
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


@router.post("/feedback", openapi_extra=request_body(("application/json", FeedbackBody)))
async def feedback(request: Request, svc: Services = Depends(services)) -> dict[str, object]:
    """Grade a past request: ``{request_id, success | score, note, overwrite}``."""
    graded = await svc.outcomes.feedback(Feedback.parse(parse_json_body(await request.body())))
    svc.metrics.outcome(str(graded["policy"]), {"true": True, "false": False}.get(str(graded["compositional"])),
                        str(graded["result"]), "primary")
    return {"object": "feedback", **graded}
