"""Operational routes: health and Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loragate.server.app import Services
from loragate.server.routes.deps import services

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(svc: Services = Depends(services)) -> dict[str, object]:
    return {"status": "ok", "pid": os.getpid(), "adapters": len(svc.registry.snapshot()),
            "workers": [{"url": w.url, "healthy": w.healthy} for w in svc.pool.views()]}


@router.get("/metrics")
async def metrics(svc: Services = Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
