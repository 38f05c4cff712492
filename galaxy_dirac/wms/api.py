"""HTTP routes: the DiracX 0.7 job API plus ``/api/x-embedded/`` for pilots and the SiteDirector.

Thin by design: each route checks the caller's role, converts the body, and calls a plain function in jobs,
matcher, pilots, sandbox_metadata or taskqueues. Errors carry ``{"detail": ...}`` and a 4xx status; a request
that fails writes nothing.
"""

import asyncio
import datetime as dt
import fcntl
import logging
import os
import tempfile
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable, Dict, List, Literal, Optional, Tuple, Union

import orjson
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from .. import jdl
from ..times import format_time
from . import errors, jobs, maintenance, matcher, pilots, policy, sandbox_metadata, taskqueues
from .auth import Principal, create_token, refresh_tokens, verify_token_with_expiry
from .config import Settings
from .db import create_schema, make_engine, read_transaction
from .errors import Unauthorized
from .sandboxes import (
    SandboxNotFound,
    SandboxStore,
    SandboxTooLarge,
    key_from_pfn,
    make_ticket,
    read_ticket,
)
from .signals import Generation

log = logging.getLogger(__name__)

def json_response(data: Any, status_code: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    """orjson (a dependency) serialises a 10,000-row status page several times faster than json."""
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


# --- bodies (DiracX 0.7 models) ----------------------------------------------------------------------------------
#: Integers the database can bind (64-bit); larger ones are refused with 422 instead of overflowing in the driver.
BigInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: A job id as it may appear in a path, a query or a body key.
JobId = Annotated[int, Field(ge=0, le=2**63 - 1)]
#: Search values are scalars, as in DiracX (lists and objects cannot be bound as query parameters).
SearchValue = Union[BigInt, float, str, bool, None]


class ScalarSearchSpec(BaseModel):
    """DiracX's scalar filter: a value-taking operator with ``value`` (``values`` here is a 422, as there)."""

    model_config = ConfigDict(extra="forbid")
    parameter: str
    operator: Literal["eq", "neq", "gt", "lt", "like", "not like", "regex"]
    value: SearchValue


class VectorSearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameter: str
    operator: Literal["in", "not in"]
    values: List[SearchValue]


SearchSpec = Union[ScalarSearchSpec, VectorSearchSpec]


class SortSpec(BaseModel):
    parameter: str
    direction: Literal["asc", "desc"] = "asc"


class JobSearchParams(BaseModel):
    parameters: Optional[list[str]] = None
    search: list[SearchSpec] = []
    sort: list[SortSpec] = []
    distinct: bool = False


class JobSummaryParams(BaseModel):
    grouping: list[str]
    search: list[SearchSpec] = []


class JobStatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    Status: Optional[str] = None
    MinorStatus: Optional[str] = None
    ApplicationStatus: Optional[str] = None
    Source: str = "Unknown"


class HeartbeatData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    LoadAverage: Optional[float] = None
    MemoryUsed: Optional[float] = None
    Vsize: Optional[float] = None
    AvailableDiskSpace: Optional[float] = None
    CPUConsumed: Optional[float] = None
    WallClockTime: Optional[float] = None
    StandardOutput: Optional[str] = None

    @field_validator("StandardOutput")
    @classmethod
    def _printable(cls, value: Optional[str]) -> Optional[str]:
        # A payload may print NUL bytes; PostgreSQL text cannot hold them, and the heartbeat must not fail for it.
        return value.replace("\x00", "\ufffd") if value else value


class SandboxInfo(BaseModel):
    checksum_algorithm: Literal["sha256"]
    checksum: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    size: int = Field(ge=1)
    format: Literal["tar.bz2", "tar.gz", "tar.xz", "tar", "zip"]


class RescheduleBody(BaseModel):
    job_ids: List[JobId] = Field(min_length=1)


class PilotsAdd(BaseModel):
    stamps: list[str]
    queue: str = ""
    site: str = ""
    ce: str = ""
    grid_type: str = ""
    references: dict[str, str] = {}


class PilotRegistration(BaseModel):
    stamp: str
    site: str = ""
    ce: str = ""
    queue: str = ""
    platform: str = ""
    tags: list[str] = []
    processors: int = 1
    memory_mb: int = 0
    hostname: str = ""
    grid_type: str = ""


class PilotStatusUpdate(BaseModel):
    status: str
    matched_jobs: Optional[int] = None
    reason: str = ""


class SlotDescription(BaseModel):
    Site: str = Field(max_length=100)  # becomes the job's Site column
    GridCE: str = ""
    Queue: str = ""
    Platform: Union[List[str], str] = []
    Tags: list[str] = []
    NumberOfProcessors: int = Field(1, ge=1, le=4096)
    MaxRAM: int = Field(0, ge=0, le=2**63 - 1)
    CPUTime: int = Field(0, ge=0, le=2**63 - 1)
    PilotStamp: str = ""
    OwnerGroup: list[str] = []


# --- app -------------------------------------------------------------------------------------------------------
class BodyLimit:
    """Refuse request bodies over the limit with 413 before reading them into memory (ASGI middleware)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.default = settings.max_request_size
        self.upload = settings.max_sandbox_size + 1024 * 1024  # room for multipart framing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload if "/sandboxes/upload/" in scope["path"] else self.default
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _too_large(send, limit)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class _BodyTooLarge(HTTPException):
    """Raised from inside ``receive``: an HTTPException, so FastAPI's body reading passes it on as a 413 instead of
    turning it into "There was an error parsing the body" (400) when a chunked body has no Content-Length."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


async def _too_large(send: Any, limit: int) -> None:
    body = orjson.dumps({"detail": f"request body larger than {limit} bytes"})
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Context:
    """Everything the routes share: settings, engine, signing key and sandbox store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db)
        create_schema(self.engine)
        self.key = settings.signing_key(create=True)
        self.store = SandboxStore(settings.sandbox_dir, max_size=settings.max_sandbox_size)
        self._verified: Dict[str, Tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        """Verify a bearer token, remembering good ones: pilots and runners send the same token many times a second,
        and a JWT signature check costs more than a match. Expiry is still checked on every use."""
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        principal, expires = verify_token_with_expiry(self.key, token)
        if len(self._verified) >= 10_000:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def delete_sandbox(self, pfn: str) -> None:
        # Bytes are shared between owners (content addressed): only drop them when no pfn names the key any more.
        key = key_from_pfn(pfn)
        from .db import SandBoxes

        with read_transaction(self.engine) as conn:
            still_used = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN.like(f"%/{key}"))).first()
        if still_used is None:
            self.store.delete(key)


def create_app(settings: Settings) -> FastAPI:
    ctx = Context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = _maintenance_leader(ctx)
        if worker is not None:
            worker.start()
        # Jobs queued and Kills sent by the other API workers of this host wake this one's long polls too.
        watchers = []
        for name, signal in (("taskqueues", taskqueues.changes), ("commands", jobs.commands_queued)):
            signal.share(os.path.join(ctx.settings.sandbox_dir, f".{name}.changed"))
            watchers.append(asyncio.create_task(signal.watch()))
        try:
            yield
        finally:
            for task in watchers:
                task.cancel()
            if worker is not None:
                worker.stop()
            ctx.engine.dispose()

    app = FastAPI(
        title="galaxy-dirac embedded scheduler",
        description="DiracX-compatible job API plus matching routes for pilots",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
    )
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, settings=settings)
    errors.install_handlers(app)  # before the routes: they are made with its route class
    _install_routes(app, ctx)
    _install_monitoring_routes(app, ctx)
    return app


def _maintenance_leader(ctx: Context) -> Optional[maintenance.MaintenanceThread]:
    """With several API workers only one runs the maintenance loop: whoever holds the lock file."""
    if ctx.settings.maintenance_interval <= 0:
        return None
    lock_path = os.path.join(ctx.settings.sandbox_dir, ".maintenance.lock")
    fh = open(lock_path, "a+")  # noqa: SIM115 - held open for the process lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    thread = maintenance.MaintenanceThread(ctx.engine, ctx.settings, ctx.delete_sandbox)
    thread.lock_file = fh  # type: ignore[attr-defined]
    return thread


def _install_routes(app: FastAPI, ctx: Context) -> None:
    settings, engine = ctx.settings, ctx.engine

    async def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization header is missing")
        return ctx.verify(token.strip())

    Caller = Annotated[Principal, Depends(principal)]
    PathJobId = Annotated[int, Path(ge=0, le=2**63 - 1)]

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    # --- DiracX job routes ---------------------------------------------------------------------------------
    @app.post("/api/jobs/jdl", tags=["jobs"], status_code=201)
    def submit_jdl_jobs(caller: Caller, job_definitions: Annotated[list[str], Body()]) -> Response:
        return json_response(jobs.submit(engine, job_definitions, caller, settings), 201)

    @app.post("/api/jobs/search", tags=["jobs"])
    def search(
        caller: Caller,
        body: Annotated[Optional[JobSearchParams], Body()] = None,
        page: Annotated[int, Query(ge=1, le=10**9)] = 1,
        per_page: Annotated[int, Query(ge=1, le=10000)] = 100,
    ) -> Response:
        body = body or JobSearchParams()
        rows, total = jobs.search(
            engine,
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

    @app.post("/api/jobs/summary", tags=["jobs"])
    def summary(caller: Caller, body: JobSummaryParams) -> Response:
        return json_response(
            jobs.summary(engine, caller, body.grouping, [s.model_dump(exclude_none=True) for s in body.search])
        )

    @app.patch("/api/jobs/status", tags=["jobs"])
    def set_job_statuses(
        caller: Caller,
        body: Annotated[dict[JobId, dict[dt.datetime, JobStatusUpdate]], Body()],
        force: bool = False,
    ) -> Response:
        if any(when.tzinfo is None for per_job in body.values() for when in per_job):
            raise jobs.BadRequest("status update times must carry a time zone (e.g. 2026-01-01T12:00:00+00:00)")
        updates = {
            job_id: {when: upd.model_dump() for when, upd in per_job.items()} for job_id, per_job in body.items()
        }
        if not updates:
            raise jobs.BadRequest("no status updates given")
        return json_response(jobs.set_statuses(engine, updates, caller, force=force, clock_skew=settings.clock_skew))

    @app.patch("/api/jobs/heartbeat", tags=["jobs"])
    def add_heartbeat(caller: Caller, body: Annotated[dict[JobId, HeartbeatData], Body()]) -> Response:
        data = {job_id: hb.model_dump(exclude_none=True) for job_id, hb in body.items()}
        return json_response(jobs.heartbeat(engine, data, caller))

    @app.post("/api/jobs/reschedule", tags=["jobs"])
    def reschedule_jobs(caller: Caller, body: Annotated[RescheduleBody, Body()], reset_jobs: bool = False) -> Response:
        policy.require_role(caller, "admin", "runner", "job")
        return json_response(jobs.reschedule(engine, body.job_ids, caller, settings))

    # --- sandboxes -----------------------------------------------------------------------------------------
    @app.post("/api/jobs/sandbox", tags=["sandboxes"])
    def initiate_sandbox_upload(caller: Caller, info: SandboxInfo, request: Request) -> Response:
        """An upload target, or none when the caller already holds these bytes (dedup within one owner, and for a
        job token within its job: knowing another owner's checksum is not proof of holding the bytes)."""
        policy.require_role(caller, "admin", "runner", "job")
        if info.size > settings.max_sandbox_size:
            raise SandboxTooLarge(f"sandbox of {info.size} bytes is over the limit of {settings.max_sandbox_size}")
        key = ctx.store.key_for(info.checksum_algorithm, info.checksum.lower(), info.format)
        pfn = jobs.sandbox_pfn(caller, info.checksum_algorithm, info.checksum.lower(), info.format)
        ref = sandbox_metadata.full_ref(pfn)
        if sandbox_metadata.has_own_copy(engine, caller, pfn) and ctx.store.exists(key):
            sandbox_metadata.touch(engine, pfn)
            return json_response({"pfn": ref, "url": None, "fields": {}})
        ticket = make_ticket(
            ctx.key,
            key,
            "upload",
            int(settings.ticket_lifetime),
            {"size": info.size, "pfn": pfn, "principal": _principal_data(caller)},
        )
        url = f"{base_url(request)}/api/x-embedded/sandboxes/upload/{ticket}"
        return json_response({"pfn": ref, "url": url, "fields": {"key": key}})

    @app.get("/api/jobs/sandbox", tags=["sandboxes"])
    def get_sandbox_file(caller: Caller, pfn: str, request: Request) -> Response:
        _, path = jobs.split_sandbox_ref(pfn) if pfn.startswith("SB:") else ("", pfn)
        sandbox_metadata.check_read_access(engine, caller, path)
        key = key_from_pfn(path)
        claims = {"principal": _principal_data(caller)} if caller.role == "job" else None
        ticket = make_ticket(ctx.key, key, "download", int(settings.ticket_lifetime), claims)
        sandbox_metadata.touch(engine, path)
        return json_response(
            {
                "url": f"{base_url(request)}/api/x-embedded/sandboxes/download/{ticket}",
                "expires_in": int(settings.ticket_lifetime),
            }
        )

    @app.get("/api/jobs/{job_id}/sandbox", tags=["sandboxes"])
    def get_job_sandboxes(caller: Caller, job_id: PathJobId) -> Response:
        jobs.get_job_row(engine, job_id, caller)
        return json_response(sandbox_metadata.job_sandboxes(engine, job_id))

    @app.get("/api/jobs/{job_id}/sandbox/{sandbox_type}", tags=["sandboxes"])
    def get_job_sandbox(caller: Caller, job_id: PathJobId, sandbox_type: Literal["input", "output"]) -> Response:
        jobs.get_job_row(engine, job_id, caller)
        return json_response(sandbox_metadata.job_sandboxes(engine, job_id)[sandbox_type.capitalize()])

    @app.patch("/api/jobs/{job_id}/sandbox/output", tags=["sandboxes"])
    def assign_sandbox_to_job(caller: Caller, job_id: PathJobId, pfn: Annotated[str, Body()]) -> Response:
        path = jobs.split_sandbox_ref(pfn)[1] if pfn.startswith("SB:") else pfn
        sandbox_metadata.assign(engine, job_id, path, "Output", caller)
        return json_response(None)

    @app.post("/api/x-embedded/sandboxes/upload/{ticket}", tags=["sandboxes"], include_in_schema=True)
    @app.put("/api/x-embedded/sandboxes/upload/{ticket}", tags=["sandboxes"], include_in_schema=False)
    async def upload_sandbox(ticket: str, request: Request) -> Response:
        """Store the bytes (hashed even when the content is stored already: the upload is the proof of holding
        them), then register the pfn for the ticket's principal."""
        claims = read_ticket(ctx.key, ticket, "upload")
        key, size = claims["key"], claims["size"]
        if request.method == "POST" and request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form(max_files=1, max_fields=20)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise jobs.BadRequest("multipart upload needs the archive in a part named 'file'")
            await run_in_threadpool(ctx.store.write, key, upload.file, size, prove=True)
            await form.close()
        else:
            with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
                async for chunk in request.stream():
                    spool.write(chunk)
                    if spool.tell() > size:
                        raise SandboxTooLarge(f"more than the declared {size} bytes were sent")
                spool.seek(0)
                await run_in_threadpool(ctx.store.write, key, spool, size, prove=True)
        await run_in_threadpool(sandbox_metadata.register, engine, claims["principal"], claims["pfn"], size)
        return Response(status_code=204)

    @app.get("/api/x-embedded/sandboxes/download/{ticket}", tags=["sandboxes"])
    def download_sandbox(ticket: str) -> Response:
        from fastapi.responses import FileResponse

        claims = read_ticket(ctx.key, ticket, "download")
        if "principal" in claims:  # a job token's ticket dies with the attempt it was given to
            with read_transaction(engine) as conn:
                policy.require_live_job_token(conn, Principal(**claims["principal"]))
        path = ctx.store.path_for(claims["key"])
        if not path.exists():
            raise SandboxNotFound(f"sandbox {claims['key']} is not in the store")
        return FileResponse(path, media_type="application/octet-stream", filename=claims["key"])

    # --- pilots --------------------------------------------------------------------------------------------
    @app.post("/api/x-embedded/pilots", tags=["pilots"])
    def add_pilots(caller: Caller, body: PilotsAdd) -> Response:
        caller.require("pilot", "admin")
        ids = pilots.add_pilots(
            engine,
            body.stamps,
            queue=body.queue,
            site=body.site,
            ce=body.ce,
            grid_type=body.grid_type,
            vo=caller.vo,
            references=body.references,
        )
        return json_response(ids)

    @app.post("/api/x-embedded/pilots/register", tags=["pilots"])
    def register_pilot(caller: Caller, body: PilotRegistration) -> Response:
        caller.require("pilot", "admin")
        pilot_id = pilots.register(engine, body.stamp, body.model_dump(), caller.vo)
        return json_response({"PilotID": pilot_id, "PilotStamp": body.stamp})

    @app.patch("/api/x-embedded/pilots/{stamp}", tags=["pilots"])
    def set_pilot_status(caller: Caller, stamp: str, body: PilotStatusUpdate) -> Response:
        caller.require("pilot", "admin")
        return json_response(pilots.set_status(engine, stamp, body.status, body.reason, body.matched_jobs))

    @app.get("/api/x-embedded/pilots", tags=["pilots"])
    def list_pilots(
        caller: Caller,
        stamp: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI query default
        status: Annotated[list[str], Query()] = [],  # noqa: B006
        queue: str = "",
        limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
    ) -> Response:
        caller.require("pilot", "admin", "reader")
        return json_response(pilots.list_pilots(engine, stamps=stamp, statuses=status, queue=queue, limit=limit))

    @app.get("/api/x-embedded/jobs/{job_id}/commands", tags=["pilots"])
    async def job_commands(
        caller: Caller, job_id: PathJobId, wait: Annotated[float, Query(ge=0, le=120)] = 0
    ) -> Response:
        """The job's pending commands (Kill), once; with ``wait``, held until one comes (a kill in about a second
        instead of at the next heartbeat). Heartbeats still deliver them where a server lacks this route."""
        caller.require("job", "admin")
        commands = await _long_poll(
            jobs.commands_queued, COMMANDS_RECHECK_INTERVAL, wait, lambda: jobs.take_commands(engine, job_id, caller)
        )
        return json_response(commands or [])

    @app.post("/api/x-embedded/match", tags=["pilots"])
    async def match(caller: Caller, body: SlotDescription, wait: Annotated[float, Query(ge=0, le=120)] = 0) -> Response:
        """Hand the slot one job; with ``wait``, hold an empty answer up to that many seconds (long poll)."""
        caller.require("pilot", "admin")
        platforms = [body.Platform] if isinstance(body.Platform, str) else body.Platform
        slot = matcher.Slot(
            site=body.Site,
            grid_ce=body.GridCE,
            queue=body.Queue,
            platforms=[p for p in platforms if p],
            tags=body.Tags,
            processors=body.NumberOfProcessors,
            max_ram=body.MaxRAM,
            cpu_time=body.CPUTime,
            pilot_stamp=body.PilotStamp,
            owner_groups=body.OwnerGroup,
        )
        pilot_id = await run_in_threadpool(pilots.pilot_id_for, engine, body.PilotStamp) if body.PilotStamp else None
        row = await _long_poll(
            taskqueues.changes, RECHECK_INTERVAL, wait, lambda: matcher.match_job(engine, slot, pilot_id=pilot_id)
        )
        if row is None:
            return Response(status_code=204)
        job_id, text = row.JobID, row.JDL
        lifetime = settings.job_token_lifetime
        token = create_token(
            ctx.key,
            role="job",
            owner=row.Owner,
            group=row.OwnerGroup,
            vo=row.VO,
            lifetime=lifetime,
            job_id=job_id,
            run=row.RescheduleCounter,
            pilot_stamp=body.PilotStamp or None,
        )
        now = dt.datetime.now(dt.timezone.utc)
        return json_response(
            {
                "JobID": job_id,
                "JDL": text,
                "Job": _jsonable_jdl(jdl.parse(text)),
                "Token": token,
                "TokenExpires": format_time(now + dt.timedelta(seconds=lifetime)),
                "ServerTime": format_time(now),
            }
        )

    @app.get("/api/x-embedded/taskqueues/demand", tags=["pilots"])
    def demand(caller: Caller) -> Response:
        caller.require("pilot", "admin", "reader")
        with read_transaction(engine) as conn:
            return json_response(taskqueues.demand(conn))

    @app.get("/api/x-embedded/jobs/{job_id}", tags=["jobs"])
    def job_details(caller: Caller, job_id: PathJobId) -> Response:
        """One job with its JDL, history and parameters (for the runner's error reports and for monitoring)."""
        if caller.role == "reader":
            row = jobs.get_job_row(engine, job_id, Principal("admin", "", "", ""))
        else:
            row = jobs.get_job_row(engine, job_id, caller)
        attrs = {c: jobs._jsonable(getattr(row, c)) for c in jobs.JOB_COLUMNS}
        stamps = pilots.stamps_of_job(engine, job_id)
        return json_response(
            {
                **attrs,
                "JDL": jobs.job_jdl(engine, job_id),
                "History": jobs.history(engine, job_id),
                "Parameters": jobs.parameters(engine, job_id),
                "Pilots": stamps,
                # Where it ran (CE, queue, pilot reference), as DiracX's pilot search gives a VO's users.
                "PilotAgents": pilots.list_pilots(engine, stamps=stamps) if stamps else [],
                "HeartBeat": jobs.heartbeat_summary(engine, job_id),
            }
        )

    # --- what diracx-client asks of a server --------------------------------------------------------------
    @app.get("/.well-known/openid-configuration", include_in_schema=False)
    def openid_configuration(request: Request) -> Response:
        base = base_url(request)
        return json_response(
            {
                "issuer": base,
                "token_endpoint": f"{base}/api/auth/token",
                "grant_types_supported": ["refresh_token"],
                "response_types_supported": ["code"],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": [],
            }
        )

    @app.post("/api/auth/token", tags=["auth"])
    async def refresh_access_token(request: Request) -> Response:
        """OAuth2 refresh grant, so diracx-client can renew the access token it was given."""
        form = await request.form()
        if form.get("grant_type") != "refresh_token" or not form.get("refresh_token"):
            return json_response({"detail": "only grant_type=refresh_token with a refresh_token is supported"}, 400)
        access, refresh, lifetime = refresh_tokens(ctx.key, str(form["refresh_token"]), settings.token_lifetime)
        return json_response(
            {"access_token": access, "expires_in": int(lifetime), "token_type": "Bearer", "refresh_token": refresh}
        )

    @app.get("/api/x-embedded/health", tags=["pilots"], include_in_schema=False)
    def health() -> Response:
        with read_transaction(engine) as conn:
            conn.execute(select(1))
        return json_response({"status": "ok"})


# --- monitoring page, accounting plots and /metrics (kept apart from the DiracX routes) -------------------------
def _install_monitoring_routes(app: FastAPI, ctx: Context) -> None:
    """The operators' page (``/monitor``), its read-only JSON API, accounting plots and Prometheus ``/metrics``.

    Every data route needs an admin or reader token; the page itself is static and asks for the token.
    """
    from fastapi.responses import RedirectResponse
    from fastapi.staticfiles import StaticFiles

    from . import accounting, metrics, monitoring

    engine = ctx.engine
    monitoring.ensure_schema(engine)
    registry = metrics.Registry()
    app.state.metrics = registry
    app.add_middleware(metrics.MetricsMiddleware, registry=registry)
    static_dir = os.path.join(os.path.dirname(__file__), "static")
    app.mount("/monitor/static", StaticFiles(directory=static_dir), name="monitor-static")

    bearer = _bearer(ctx)

    def reader(request: Request) -> Principal:
        caller = bearer(request)
        caller.require("admin", "reader")
        return caller

    Reader = Annotated[Principal, Depends(reader)]
    Caller = Annotated[Principal, Depends(bearer)]
    Page = Annotated[int, Query(ge=1, le=10**9)]
    PerPage = Annotated[int, Query(ge=1, le=1000)]

    def bad_request(exc: ValueError) -> HTTPException:
        return HTTPException(400, str(exc))

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/monitor")

    @app.get("/monitor", include_in_schema=False)
    def monitor_page() -> Response:
        from fastapi.responses import FileResponse

        return FileResponse(os.path.join(static_dir, "monitor.html"), media_type="text/html")

    @app.get("/api/x-embedded/monitoring/facets", tags=["monitoring"])
    def monitoring_facets(_: Reader) -> Response:
        return json_response(monitoring.facets(engine))

    @app.get("/api/x-embedded/monitoring/jobs", tags=["monitoring"])
    def monitoring_jobs(
        _: Reader,
        status: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI query default
        site: str = "",
        owner: str = "",
        group: str = "",
        jobgroup: str = "",
        page: Page = 1,
        per_page: PerPage = 50,
        sort: str = "JobID",
        direction: Literal["asc", "desc"] = "desc",
    ) -> Response:
        filters = {"status": status, "site": site, "owner": owner, "group": group, "jobgroup": jobgroup}
        try:
            result = monitoring.list_jobs(
                engine, filters, page=page, per_page=per_page, sort=sort, descending=direction == "desc"
            )
        except ValueError as exc:
            raise bad_request(exc) from exc
        return json_response(result)

    @app.get("/api/x-embedded/monitoring/jobs/{job_id}", tags=["monitoring"])
    def monitoring_job(_: Reader, job_id: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> Response:
        return json_response(monitoring.job_detail(engine, job_id))

    @app.get("/api/x-embedded/monitoring/pilots/summary", tags=["monitoring"])
    def monitoring_pilot_summary(_: Reader) -> Response:
        return json_response(monitoring.pilot_summary(engine))

    @app.get("/api/x-embedded/monitoring/pilots", tags=["monitoring"])
    def monitoring_pilots(
        _: Reader, status: str = "", queue: str = "", ce: str = "", page: Page = 1, per_page: PerPage = 50
    ) -> Response:
        filters = {"status": status, "queue": queue, "ce": ce}
        return json_response(monitoring.list_pilots(engine, filters, page=page, per_page=per_page))

    @app.get("/api/x-embedded/monitoring/taskqueues", tags=["monitoring"])
    def monitoring_taskqueues(_: Reader) -> Response:
        return json_response(monitoring.taskqueue_demand(engine))

    @app.get("/api/x-embedded/monitoring/sitedirector", tags=["monitoring"])
    def monitoring_decisions(_: Reader) -> Response:
        return json_response(monitoring.last_decisions(engine))

    @app.post("/api/x-embedded/monitoring/sitedirector", tags=["monitoring"])
    def record_decisions(caller: Caller, body: Annotated[list[dict], Body()]) -> Response:
        caller.require("pilot", "admin")
        return json_response({"recorded": monitoring.record_decisions(engine, body, caller.owner)})

    @app.get("/api/x-embedded/accounting/{kind}", tags=["monitoring"])
    def accounting_plot(
        _: Reader,
        kind: str,
        since: str = "30d",
        until: str = "",
        bucket: str = "1d",
        format: Literal["json", "csv", "png"] = "json",  # noqa: A002 - the query parameter's public name
        width: Annotated[int, Query(ge=200, le=4000)] = 1200,
        height: Annotated[int, Query(ge=150, le=3000)] = 600,
    ) -> Response:
        try:
            data = accounting.aggregate(
                engine,
                kind,
                accounting.parse_time(since),
                accounting.parse_time(until or None),
                accounting.parse_duration(bucket),
            )
        except accounting.AccountingError as exc:
            raise bad_request(exc) from exc
        if format == "csv":
            return Response(accounting.to_csv(data), media_type="text/csv")
        if format == "png":
            try:
                png = accounting.render_png(data, width, height)
            except ImportError as exc:
                raise HTTPException(501, f"plots need matplotlib (pip install matplotlib): {exc}") from exc
            return Response(png, media_type="image/png")
        return json_response(data)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(_: Reader) -> Response:
        return Response(metrics.render(engine, registry), media_type=metrics.CONTENT_TYPE)


def _bearer(ctx: Context) -> Any:
    def dependency(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization header is missing")
        return ctx.verify(token.strip())

    return dependency


#: A long-polling match re-reads the database this often: jobs queued by this worker wake it at once, those of the
#: other workers of this host within a quarter second (signals.Generation.watch); this covers other hosts.
RECHECK_INTERVAL = 5.0
#: The same for a wrapper's long poll for its job's commands (a Kill sent through another host's worker).
COMMANDS_RECHECK_INTERVAL = 5.0


async def _long_poll(changes: Generation, recheck: float, wait: float, attempt: Callable[[], Any]) -> Any:
    """``attempt()`` (blocking, in the thread pool) until it answers something (not None, not empty) or ``wait``
    seconds pass; between tries, sleep until ``changes`` moves on or ``recheck`` seconds pass."""
    deadline = time.monotonic() + wait
    while True:
        seen = changes.value
        answer = await run_in_threadpool(attempt)
        if (answer is not None and answer != []) or time.monotonic() >= deadline:
            return answer
        await changes.wait_past(seen, min(deadline, time.monotonic() + recheck) - time.monotonic())


def _principal_data(caller: Principal) -> dict[str, Any]:
    """Who a ticket is for (signed into it); for job tokens with the job and attempt, checked again on use."""
    data: dict[str, Any] = {"role": caller.role, "owner": caller.owner, "group": caller.group, "vo": caller.vo}
    if caller.role == "job":
        data.update(job_id=caller.job_id, run=caller.run)
    return data


def _jsonable_jdl(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable_jdl(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable_jdl(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if not isinstance(value, str) else str(value)
    return str(value)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings come from GALAXY_DIRAC_WMS_* variables."""
    from .config import load_settings

    return create_app(load_settings())
