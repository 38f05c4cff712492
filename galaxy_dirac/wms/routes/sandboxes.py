"""Sandbox routes: DiracX's upload/download negotiation and our ticket-signed byte transfers."""

from __future__ import annotations

import tempfile
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from .. import jobs, sandbox_metadata
from ..errors import Invalid, route_class
from ..sandboxes import SandboxTooLarge
from .deps import BaseURL, Caller, Ctx, PathJobId, json_response
from .models import SandboxInfo

router = APIRouter(tags=["sandboxes"], route_class=route_class())
#: Uploads up to this size are spooled in memory, bigger ones on disk.
SPOOL_IN_MEMORY = 8 * 1024 * 1024


@router.post("/api/jobs/sandbox")
def initiate_sandbox_upload(ctx: Ctx, caller: Caller, info: SandboxInfo, base_url: BaseURL) -> Response:
    target = sandbox_metadata.upload_target(
        ctx, caller, info.checksum_algorithm, info.checksum, info.format, info.size, base_url
    )
    return json_response(target)


@router.get("/api/jobs/sandbox")
def get_sandbox_file(ctx: Ctx, caller: Caller, pfn: str, base_url: BaseURL) -> Response:
    return json_response(sandbox_metadata.download_target(ctx, caller, pfn, base_url))


@router.get("/api/jobs/{job_id}/sandbox")
def get_job_sandboxes(ctx: Ctx, caller: Caller, job_id: PathJobId) -> Response:
    jobs.get_job_row(ctx.engine, job_id, caller)
    return json_response(sandbox_metadata.job_sandboxes(ctx.engine, job_id))


@router.get("/api/jobs/{job_id}/sandbox/{sandbox_type}")
def get_job_sandbox(ctx: Ctx, caller: Caller, job_id: PathJobId, sandbox_type: Literal["input", "output"]) -> Response:
    jobs.get_job_row(ctx.engine, job_id, caller)
    return json_response(sandbox_metadata.job_sandboxes(ctx.engine, job_id)[sandbox_type.capitalize()])


@router.patch("/api/jobs/{job_id}/sandbox/output")
def assign_sandbox_to_job(ctx: Ctx, caller: Caller, job_id: PathJobId, pfn: Annotated[str, Body()]) -> Response:
    sandbox_metadata.assign(ctx.engine, job_id, pfn, "Output", caller)
    return json_response(None)


@router.post("/api/x-embedded/sandboxes/upload/{ticket}")
@router.put("/api/x-embedded/sandboxes/upload/{ticket}", include_in_schema=False)
async def upload_sandbox(ctx: Ctx, ticket: str, request: Request) -> Response:
    """The bytes, as one multipart part named ``file`` (S3 presigned-POST style) or as the raw body (PUT)."""
    claims = sandbox_metadata.upload_claims(ctx, ticket)
    if request.method == "POST" and request.headers.get("content-type", "").startswith("multipart/"):
        form = await request.form(max_files=1, max_fields=20)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Invalid("multipart upload needs the archive in a part named 'file'")
        await run_in_threadpool(sandbox_metadata.store_upload, ctx, claims, upload.file)
        await form.close()
        return Response(status_code=204)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
            if spool.tell() > claims["size"]:
                raise SandboxTooLarge(f"more than the declared {claims['size']} bytes were sent")
        spool.seek(0)
        await run_in_threadpool(sandbox_metadata.store_upload, ctx, claims, spool)
    return Response(status_code=204)


@router.get("/api/x-embedded/sandboxes/download/{ticket}")
def download_sandbox(ctx: Ctx, ticket: str) -> Response:
    path = sandbox_metadata.download_path(ctx, ticket)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
