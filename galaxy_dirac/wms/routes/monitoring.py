"""The operators' page (``/monitor``), its read-only JSON API, accounting plots, ``/metrics`` and health.

Every data route needs an admin or reader token; the page itself is static and asks for the token.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy import select

from .. import accounting, metrics, monitoring, policy
from ..db import read_transaction
from ..errors import WMSError, route_class
from .deps import Caller, Ctx, Reader, json_response

router = APIRouter(tags=["monitoring"], route_class=route_class())
STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")
Page = Annotated[int, Query(ge=1, le=10**9)]
PerPage = Annotated[int, Query(ge=1, le=1000)]


class PlotsUnavailable(WMSError):
    """PNG plots need matplotlib, an optional dependency (501)."""

    status = 501


@router.get("/", include_in_schema=False)
def root() -> Response:
    return RedirectResponse("/monitor")


@router.get("/monitor", include_in_schema=False)
def monitor_page() -> Response:
    return FileResponse(os.path.join(STATIC_DIR, "monitor.html"), media_type="text/html")


@router.get("/api/x-embedded/health", tags=["pilots"], include_in_schema=False)
def health(ctx: Ctx) -> Response:
    with read_transaction(ctx.engine) as conn:
        conn.execute(select(1))
    return json_response({"status": "ok"})


@router.get("/api/x-embedded/monitoring/facets")
def monitoring_facets(ctx: Ctx, _: Reader) -> Response:
    return json_response(monitoring.facets(ctx.engine))


@router.get("/api/x-embedded/monitoring/jobs")
def monitoring_jobs(
    ctx: Ctx,
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
    descending = direction == "desc"
    return json_response(
        monitoring.list_jobs(ctx.engine, filters, page=page, per_page=per_page, sort=sort, descending=descending)
    )


@router.get("/api/x-embedded/monitoring/jobs/{job_id}")
def monitoring_job(ctx: Ctx, _: Reader, job_id: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> Response:
    return json_response(monitoring.job_detail(ctx.engine, job_id))


@router.get("/api/x-embedded/monitoring/pilots/summary")
def monitoring_pilot_summary(ctx: Ctx, _: Reader) -> Response:
    return json_response(monitoring.pilot_summary(ctx.engine))


@router.get("/api/x-embedded/monitoring/pilots")
def monitoring_pilots(
    ctx: Ctx, _: Reader, status: str = "", queue: str = "", ce: str = "", page: Page = 1, per_page: PerPage = 50
) -> Response:
    filters = {"status": status, "queue": queue, "ce": ce}
    return json_response(monitoring.list_pilots(ctx.engine, filters, page=page, per_page=per_page))


@router.get("/api/x-embedded/monitoring/taskqueues")
def monitoring_taskqueues(ctx: Ctx, _: Reader) -> Response:
    return json_response(monitoring.taskqueue_demand(ctx.engine))


@router.get("/api/x-embedded/monitoring/sitedirector")
def monitoring_decisions(ctx: Ctx, _: Reader) -> Response:
    return json_response(monitoring.last_decisions(ctx.engine))


@router.post("/api/x-embedded/monitoring/sitedirector")
def record_decisions(ctx: Ctx, caller: Caller, body: Annotated[list[dict], Body()]) -> Response:
    policy.require_pilot_manager(caller)
    return json_response({"recorded": monitoring.record_decisions(ctx.engine, body, caller.owner)})


@router.get("/api/x-embedded/accounting/{kind}")
def accounting_plot(
    ctx: Ctx,
    _: Reader,
    kind: str,
    since: str = "30d",
    until: str = "",
    bucket: str = "1d",
    format: Literal["json", "csv", "png"] = "json",  # noqa: A002 - the query parameter's public name
    width: Annotated[int, Query(ge=200, le=4000)] = 1200,
    height: Annotated[int, Query(ge=150, le=3000)] = 600,
) -> Response:
    data = accounting.aggregate(
        ctx.engine,
        kind,
        accounting.parse_time(since),
        accounting.parse_time(until or None),
        accounting.parse_duration(bucket),
    )
    if format == "csv":
        return Response(accounting.to_csv(data), media_type="text/csv")
    if format == "png":
        try:
            png = accounting.render_png(data, width, height)
        except ImportError as exc:
            raise PlotsUnavailable(f"plots need matplotlib (pip install matplotlib): {exc}") from exc
        return Response(png, media_type="image/png")
    return json_response(data)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(ctx: Ctx, _: Reader, request: Request) -> Response:
    return Response(metrics.render(ctx.engine, request.app.state.metrics), media_type=metrics.CONTENT_TYPE)
