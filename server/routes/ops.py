"""Operational routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loragate.errors import NoWorkerAvailable
from loragate.server.app import Services
from loragate.server.routes.deps import services

router = APIRouter(tags=["ops"])


def _workers(svc: Services) -> list[dict[str, object]]:
    return [{"url": w.url, "healthy": w.healthy} for w in svc.pool.views()]


@router.get("/health")
async def health(svc: Services = Depends(services)) -> dict[str, object]:
    """Liveness: the process answers (200 even with every worker down; see ``/ready``)."""
    return {"status": "ok", "pid": os.getpid(), "adapters": len(svc.registry.snapshot()), "workers": _workers(svc)}


@router.get("/ready", responses={503: {"description": "No worker can take a request; the body says why."}})
async def ready(svc: Services = Depends(services)) -> dict[str, object]:
    """Readiness: 200 when a request could be sent to a worker now, else 503 naming why.

    Asks the pool the question a request asks (``pick`` without reserving, panic routing
    included), so readiness and serving never disagree. A load balancer or Kubernetes readiness
    probe takes the gateway out while it would only answer 503s, without restarting it (the
    liveness route ``/health`` stays 200). Until the first probe round has answered, every
    worker is only assumed healthy, so a gateway just started is not ready yet (requests are
    still tried meanwhile; readiness is the stricter of the two only for that first interval).
    """
    if not svc.pool.probed:
        raise NoWorkerAvailable("not ready: the workers have not been probed yet", code="not_ready")
    try:
        svc.pool.pick(None)
    except NoWorkerAvailable as exc:
        down = ", ".join(w.url for w in svc.pool.views() if not w.healthy)
        raise NoWorkerAvailable(f"not ready: no worker is in rotation ({exc.message}; out of rotation: {down})",
                                code="not_ready") from exc
    return {"status": "ready", "adapters": len(svc.registry.snapshot()), "workers": _workers(svc)}


@router.get("/metrics")
async def metrics(svc: Services = Depends(services)) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
