"""Routes for pilots and the SiteDirector (``/api/x-embedded/``): the pilot registry, matching, commands, demand."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from ...times import format_time
from .. import jobs, matcher, pilots, policy, taskqueues
from ..auth import create_pilot_tokens
from ..db import read_transaction
from ..errors import route_class
from ..signals import long_poll
from .deps import Caller, Ctx, LongPollWait, PathJobId, json_response
from .models import PilotRegistration, PilotsAdd, PilotStatusUpdate, PilotTokensRequest, SlotDescription

router = APIRouter(tags=["pilots"], route_class=route_class())

#: A long-polling match wakes when jobs are queued: through this worker at once, through the other workers of this
#: host within a quarter second (``Generation.watch``), through other hosts within a second (``Generation.follow``);
#: on its own it re-reads the database only this often, a last resort that costs nothing while pilots wait.
RECHECK_INTERVAL = 60.0
#: The same for a wrapper's long poll for its job's commands (a Kill sent through another host's worker).
COMMANDS_RECHECK_INTERVAL = 60.0


@router.post("/api/x-embedded/pilots")
def add_pilots(ctx: Ctx, caller: Caller, body: PilotsAdd) -> Response:
    policy.require_pilot_manager(caller)
    fields = body.model_dump(exclude={"stamps", "references"})
    ids = pilots.add_pilots(ctx.engine, body.stamps, vo=caller.vo, references=body.references, **fields)
    return json_response(ids)


@router.post("/api/x-embedded/pilots/tokens")
def pilot_tokens(ctx: Ctx, caller: Caller, body: PilotTokensRequest) -> Response:
    """A token per pilot about to be submitted, bound to its stamp and site (the director asks, the pilot carries
    it): what a compromised worker node can do is limited to its own pilot."""
    policy.require_pilot_manager(caller)
    cap = ctx.settings.pilot_token_lifetime
    lifetime = min(body.lifetime or cap, cap)
    tokens = create_pilot_tokens(ctx.key, body.stamps, site=body.site, vo=caller.vo, lifetime=lifetime)
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=lifetime)
    return json_response({"tokens": tokens, "expires": format_time(expires)})


@router.post("/api/x-embedded/pilots/register")
def register_pilot(ctx: Ctx, caller: Caller, body: PilotRegistration) -> Response:
    policy.require_pilot(caller, body.stamp, body.site)
    pilot_id = pilots.register(ctx.engine, body.stamp, body.model_dump(), caller.vo)
    return json_response({"PilotID": pilot_id, "PilotStamp": body.stamp})


@router.patch("/api/x-embedded/pilots/{stamp}")
def set_pilot_status(ctx: Ctx, caller: Caller, stamp: str, body: PilotStatusUpdate) -> Response:
    policy.require_pilot(caller, stamp)
    return json_response(pilots.set_status(ctx.engine, stamp, body.status, body.reason, body.matched_jobs))


@router.get("/api/x-embedded/pilots")
def list_pilots(
    ctx: Ctx,
    caller: Caller,
    stamp: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI query default
    status: Annotated[list[str], Query()] = [],  # noqa: B006
    queue: str = "",
    limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
) -> Response:
    stamps = policy.visible_pilots(caller, stamp)
    return json_response(pilots.list_pilots(ctx.engine, stamps=stamps, statuses=status, queue=queue, limit=limit))


@router.get("/api/x-embedded/jobs/{job_id}/commands")
async def job_commands(ctx: Ctx, caller: Caller, job_id: PathJobId, wait: LongPollWait = 0) -> Response:
    """The job's pending commands (Kill), once; with ``wait``, held until one comes (a kill in about a second
    instead of at the next heartbeat). Heartbeats still deliver them where a server lacks this route."""
    caller.require("job", "admin")
    commands = await long_poll(
        jobs.commands_queued, COMMANDS_RECHECK_INTERVAL, wait, lambda: jobs.take_commands(ctx.engine, job_id, caller)
    )
    return json_response(commands or [])


@router.post("/api/x-embedded/match")
async def match(ctx: Ctx, caller: Caller, body: SlotDescription, wait: LongPollWait = 0) -> Response:
    """Hand the slot one job; with ``wait``, hold an empty answer up to that many seconds (long poll)."""
    stamp = policy.matching_pilot(caller, body.PilotStamp, body.Site)
    slot = body.to_slot(stamp)
    pilot_id = await run_in_threadpool(pilots.pilot_id_for, ctx.engine, stamp) if stamp else None
    row = await long_poll(
        taskqueues.changes, RECHECK_INTERVAL, wait, lambda: matcher.match_job(ctx.engine, slot, pilot_id=pilot_id)
    )
    if row is None:
        return Response(status_code=204)
    return json_response(matcher.offer(ctx.key, ctx.settings.job_token_lifetime, row, stamp))


@router.get("/api/x-embedded/taskqueues/demand")
def demand(ctx: Ctx, caller: Caller) -> Response:
    caller.require("director", "pilot", "admin", "reader")
    with read_transaction(ctx.engine) as conn:
        return json_response(taskqueues.demand(conn))
