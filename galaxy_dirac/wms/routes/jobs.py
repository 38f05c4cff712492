"""DiracX 0.7's job routes (``/api/jobs/...``) and our job details route."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Optional

from fastapi import APIRouter, Body, Query, Response

from ...times import format_time, parse_time
from .. import jobs, policy
from ..errors import Invalid, route_class
from ..signals import long_poll
from .deps import Caller, Ctx, LongPollWait, PathJobId, json_response
from .models import HeartbeatData, JobId, JobSearchParams, JobStatusUpdate, JobSummaryParams, RescheduleBody

router = APIRouter(tags=["jobs"], route_class=route_class())


@router.post("/api/jobs/jdl", status_code=201)
def submit_jdl_jobs(ctx: Ctx, caller: Caller, job_definitions: Annotated[list[str], Body()]) -> Response:
    return json_response(jobs.submit(ctx.engine, job_definitions, caller, ctx.settings), 201)


@router.post("/api/jobs/search")
def search(
    ctx: Ctx,
    caller: Caller,
    body: Annotated[Optional[JobSearchParams], Body()] = None,
    page: Annotated[int, Query(ge=1, le=10**9)] = 1,
    per_page: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> Response:
    body = body or JobSearchParams()
    rows, total = jobs.search(
        ctx.engine,
        caller,
        parameters=body.parameters,
        search=[s.model_dump(exclude_none=True) for s in body.search],
        sort=[s.model_dump() for s in body.sort],
        distinct=body.distinct,
        page=page,
        per_page=per_page,
    )
    first = (page - 1) * per_page
    if not rows and total > 0:
        return json_response([], 416, {"Content-Range": f"jobs */{total}"})
    if len(rows) < total:
        return json_response(rows, 206, {"Content-Range": f"jobs {first}-{first + len(rows) - 1}/{total}"})
    return json_response(rows)


@router.post("/api/jobs/summary")
def summary(ctx: Ctx, caller: Caller, body: JobSummaryParams) -> Response:
    search = [s.model_dump(exclude_none=True) for s in body.search]
    return json_response(jobs.summary(ctx.engine, caller, body.grouping, search))


@router.patch("/api/jobs/status")
def set_job_statuses(
    ctx: Ctx,
    caller: Caller,
    body: Annotated[dict[JobId, dict[dt.datetime, JobStatusUpdate]], Body()],
    force: bool = False,
) -> Response:
    if any(when.tzinfo is None for per_job in body.values() for when in per_job):
        raise Invalid("status update times must carry a time zone (e.g. 2026-01-01T12:00:00+00:00)")
    updates = {job_id: {when: upd.model_dump() for when, upd in per_job.items()} for job_id, per_job in body.items()}
    if not updates:
        raise Invalid("no status updates given")
    return json_response(
        jobs.set_statuses(ctx.engine, updates, caller, force=force, clock_skew=ctx.settings.clock_skew)
    )


@router.patch("/api/jobs/heartbeat")
def add_heartbeat(ctx: Ctx, caller: Caller, body: Annotated[dict[JobId, HeartbeatData], Body()]) -> Response:
    data = {job_id: hb.model_dump(exclude_none=True) for job_id, hb in body.items()}
    return json_response(jobs.heartbeat(ctx.engine, data, caller))


@router.post("/api/jobs/reschedule")
def reschedule_jobs(
    ctx: Ctx, caller: Caller, body: Annotated[RescheduleBody, Body()], reset_jobs: bool = False
) -> Response:
    policy.require_role(caller, "admin", "runner", "job")
    return json_response(jobs.reschedule(ctx.engine, body.job_ids, caller, ctx.settings))


#: A runner's long poll for updates wakes on any status change (other hosts: within a second, ``Generation.follow``)
#: and re-reads the database on its own only this often.
UPDATES_RECHECK_INTERVAL = 60.0


@router.get("/api/x-embedded/jobs/updates")
async def job_updates(ctx: Ctx, caller: Caller, since: str = "", wait: LongPollWait = 0) -> Response:
    """Held until one of the caller's jobs changes status after ``since`` (a ``Cursor`` from the last answer), or
    ``wait`` seconds pass: the runner learns of Done when it happens instead of at its next monitor cycle."""
    try:
        after = parse_time(since) if since else None
    except ValueError:
        raise Invalid(f"since must be a time such as 2026-01-01T12:00:00Z, not {since[:40]!r}") from None
    answer = await long_poll(
        jobs.status_changes, UPDATES_RECHECK_INTERVAL, wait, lambda: jobs.updated_since(ctx.engine, caller, after)
    )
    return json_response(answer or {"JobIDs": [], "Cursor": format_time(after) if after else ""})


# After the fixed paths above: {job_id} would match them.
@router.get("/api/x-embedded/jobs/{job_id}")
def job_details(ctx: Ctx, caller: Caller, job_id: PathJobId) -> Response:
    """One job with its JDL, history and parameters (for the runner's error reports and for monitoring)."""
    return json_response(jobs.details(ctx.engine, job_id, caller))
