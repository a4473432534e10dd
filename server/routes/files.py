"""Read-only adapter files for the workers' resolver plugin: bearer token, content-addressed paths.

Thin on purpose: token check, manifest and path safety live in ``workers.delivery.AdapterFiles``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header
from fastapi.responses import FileResponse

from loragate.server.app import Services
from loragate.server.routes.deps import services
from loragate.workers.delivery import FILES_PREFIX

router = APIRouter(prefix=FILES_PREFIX, tags=["adapter-files"], include_in_schema=False)


@router.get("/by-name/{name}")
async def manifest(name: str, authorization: str | None = Header(None),
                   svc: Services = Depends(services)) -> dict[str, object]:
    svc.adapter_files.authorize(authorization)
    return (await svc.adapter_files.manifest(name)).as_json()


@router.get("/{sha256}/{filename}")
async def adapter_file(sha256: str, filename: str, authorization: str | None = Header(None),
                       svc: Services = Depends(services)) -> FileResponse:
    svc.adapter_files.authorize(authorization)
    return FileResponse(await svc.adapter_files.fetch(sha256, filename), media_type="application/octet-stream")
