"""Read-only queries behind the monitoring page: paged job lists, one job in full, pilots, task queues, SiteDirector.

Everything is paged and aggregated in the database (indexed filters, ``LIMIT/OFFSET``, ``GROUP BY`` on indexed
columns) so the page stays fast with 100k jobs; nothing here writes to DIRAC's tables. The only table of our own,
``gd_SiteDirectorDecisions``, holds the last decision per SiteDirector queue, which the SiteDirector may post.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Mapping, Sequence

from sqlalchemy import (
    Engine,
    delete,
    func,
    insert,
    select,
)

from galaxy_dirac.times import format_time

from .db import (
    HeartBeatLoggingInfo,
    Jobs,
    JobToPilotMapping,
    PilotAgents,
    SiteDirectorDecisions,
    read_transaction,
    retrying,
    utcnow,
    write_transaction,
)
from .errors import Invalid
from .jobs import NotFound, history, job_jdl, parameters
from .sandbox_metadata import job_sandboxes
from .taskqueues import demand

#: Job-list filters the page offers: query name → Jobs column (each one indexed in db.py).
JOB_FILTERS = {
    "status": Jobs.Status,
    "site": Jobs.Site,
    "owner": Jobs.Owner,
    "group": Jobs.OwnerGroup,
    "jobgroup": Jobs.JobGroup,
}
JOB_LIST_COLUMNS = (
    "JobID",
    "JobName",
    "Status",
    "MinorStatus",
    "Site",
    "Owner",
    "OwnerGroup",
    "JobGroup",
    "SubmissionTime",
    "LastUpdateTime",
    "RescheduleCounter",
)
SORTABLE = {"JobID", "LastUpdateTime", "SubmissionTime", "Status", "Site", "Owner"}
PILOT_FILTERS = {"status": PilotAgents.Status, "queue": PilotAgents.Queue, "ce": PilotAgents.DestinationSite}


def _jsonable(value: Any) -> Any:
    return format_time(value) if isinstance(value, dt.datetime) else value


def _row_dict(row: Any, columns: Sequence[str]) -> dict[str, Any]:
    return {c: _jsonable(getattr(row, c)) for c in columns}


# --- jobs --------------------------------------------------------------------------------------------------------
def list_jobs(
    engine: Engine,
    filters: Mapping[str, str | Sequence[str]] | None = None,
    *,
    page: int = 1,
    per_page: int = 50,
    sort: str = "JobID",
    descending: bool = True,
) -> dict[str, Any]:
    """One page of jobs matching equality filters, newest first, with the total count for the pager."""
    if sort not in SORTABLE:
        raise Invalid(f"cannot sort by {sort!r}; use one of {', '.join(sorted(SORTABLE))}")
    per_page = max(1, min(per_page, 1000))
    page = max(1, page)
    conditions = []
    for name, value in (filters or {}).items():
        if name not in JOB_FILTERS:
            raise Invalid(f"unknown job filter {name!r}; use one of {', '.join(JOB_FILTERS)}")
        values = [v for v in ([value] if isinstance(value, str) else value) if v]
        if values:
            column = JOB_FILTERS[name]
            conditions.append(column == values[0] if len(values) == 1 else column.in_(values))
    column = getattr(Jobs, sort)
    order = [column.desc() if descending else column.asc()]
    if sort != "JobID":
        order.append(Jobs.JobID.desc() if descending else Jobs.JobID.asc())
    query = select(*(getattr(Jobs, c) for c in JOB_LIST_COLUMNS)).where(*conditions).order_by(*order)
    with read_transaction(engine) as conn:
        total = conn.execute(select(func.count()).select_from(Jobs).where(*conditions)).scalar_one()
        rows = conn.execute(query.limit(per_page).offset((page - 1) * per_page)).all()
    return {
        "total": total,
        "page": page,
        "per_page": per_page,
        "jobs": [_row_dict(r, JOB_LIST_COLUMNS) for r in rows],
    }


def facets(engine: Engine) -> dict[str, Any]:
    """Counts per status, site, owner, group and job group: the filter menus and the status overview."""
    result: dict[str, Any] = {}
    with read_transaction(engine) as conn:
        for name, column in JOB_FILTERS.items():
            rows = conn.execute(select(column, func.count()).group_by(column).order_by(column)).all()
            result[name] = [{"value": v, "count": n} for v, n in rows]
    result["total"] = sum(f["count"] for f in result["status"])
    return result


def heartbeats(engine: Engine, job_id: int, limit: int = 500) -> list[dict[str, Any]]:
    """A job's heartbeats, one row per heartbeat time with every reported value (the table stores name/value)."""
    by_time: dict[dt.datetime, dict[str, Any]] = {}
    with read_transaction(engine) as conn:
        for name, value, when in conn.execute(
            select(HeartBeatLoggingInfo.Name, HeartBeatLoggingInfo.Value, HeartBeatLoggingInfo.HeartBeatTime)
            .where(HeartBeatLoggingInfo.JobID == job_id)
            .order_by(HeartBeatLoggingInfo.ID)
        ):
            by_time.setdefault(when, {"HeartBeatTime": _jsonable(when)})[name] = _number(value)
    return list(by_time.values())[-limit:]


def _number(value: str) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def job_detail(engine: Engine, job_id: int) -> dict[str, Any]:
    """Everything about one job: attributes, JDL, status history, heartbeats, parameters, pilots and sandboxes."""
    with read_transaction(engine) as conn:
        row = conn.execute(select(Jobs).where(Jobs.JobID == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        pilot_rows = conn.execute(
            select(PilotAgents, JobToPilotMapping.StartTime)
            .join(JobToPilotMapping, JobToPilotMapping.PilotID == PilotAgents.PilotID)
            .where(JobToPilotMapping.JobID == job_id)
            .order_by(JobToPilotMapping.StartTime)
        ).all()
    attrs = {c.name: _jsonable(getattr(row, c.name)) for c in Jobs.__table__.columns}
    try:
        jdl_text = job_jdl(engine, job_id)
    except NotFound:
        jdl_text = ""
    return {
        **attrs,
        "JDL": jdl_text,
        "History": history(engine, job_id),
        "HeartBeats": heartbeats(engine, job_id),
        "Parameters": parameters(engine, job_id),
        "Pilots": [{**_pilot_dict(p), "MatchTime": _jsonable(p.StartTime)} for p in pilot_rows],
        "Sandboxes": job_sandboxes(engine, job_id),
    }


# --- pilots --------------------------------------------------------------------------------------------------------
PILOT_LIST_COLUMNS = (
    "PilotID",
    "PilotStamp",
    "PilotJobReference",
    "Status",
    "StatusReason",
    "GridSite",
    "DestinationSite",
    "Queue",
    "GridType",
    "MatchedJobs",
    "CurrentJobID",
    "SubmissionTime",
    "LastUpdateTime",
)


def _pilot_dict(row: Any) -> dict[str, Any]:
    return _row_dict(row, PILOT_LIST_COLUMNS)


def pilot_summary(engine: Engine) -> list[dict[str, Any]]:
    """Pilot counts per queue, CE and state, the SiteDirector's view of every queue."""
    query = (
        select(PilotAgents.Queue, PilotAgents.DestinationSite, PilotAgents.GridSite, PilotAgents.Status, func.count())
        .group_by(PilotAgents.Queue, PilotAgents.DestinationSite, PilotAgents.GridSite, PilotAgents.Status)
        .order_by(PilotAgents.Queue, PilotAgents.DestinationSite)
    )
    summary: dict[tuple[str, str, str], dict[str, Any]] = {}
    with read_transaction(engine) as conn:
        for queue, ce, site, status, count in conn.execute(query):
            entry = summary.setdefault(
                (queue, ce, site), {"Queue": queue, "CE": ce, "Site": site, "Total": 0, "States": {}}
            )
            entry["States"][status] = count
            entry["Total"] += count
    return list(summary.values())


def list_pilots(
    engine: Engine, filters: Mapping[str, str] | None = None, *, page: int = 1, per_page: int = 50
) -> dict[str, Any]:
    """One page of pilots, newest first; ``StatusReason`` is the pilot's log excerpt the scheduler has."""
    per_page = max(1, min(per_page, 1000))
    page = max(1, page)
    conditions = []
    for name, value in (filters or {}).items():
        if name not in PILOT_FILTERS:
            raise Invalid(f"unknown pilot filter {name!r}; use one of {', '.join(PILOT_FILTERS)}")
        if value:
            conditions.append(PILOT_FILTERS[name] == value)
    with read_transaction(engine) as conn:
        total = conn.execute(select(func.count()).select_from(PilotAgents).where(*conditions)).scalar_one()
        rows = conn.execute(
            select(PilotAgents)
            .where(*conditions)
            .order_by(PilotAgents.PilotID.desc())
            .limit(per_page)
            .offset((page - 1) * per_page)
        ).all()
    return {"total": total, "page": page, "per_page": per_page, "pilots": [_pilot_dict(r) for r in rows]}


# --- task queues and SiteDirector ------------------------------------------------------------------------------------
def taskqueue_demand(engine: Engine) -> list[dict[str, Any]]:
    """Non-empty task queues with their waiting jobs, as the SiteDirector sees them."""
    with read_transaction(engine) as conn:
        return demand(conn)


@retrying
def record_decisions(engine: Engine, decisions: Sequence[Mapping[str, Any]], director: str = "") -> int:
    """Keep the last decision per queue (a SiteDirector posts its cycle's decisions); returns how many were kept."""
    now = utcnow()
    rows = []
    for decision in decisions:
        queue = str(decision.get("queue") or decision.get("Queue") or "")
        if queue:
            rows.append(
                {
                    "Queue": queue[:128],
                    "Director": director[:128],
                    "DecisionTime": now,
                    "Decision": json.dumps(dict(decision), default=str),
                }
            )
    if not rows:
        return 0
    with write_transaction(engine) as conn:
        conn.execute(delete(SiteDirectorDecisions).where(SiteDirectorDecisions.Queue.in_([r["Queue"] for r in rows])))
        conn.execute(insert(SiteDirectorDecisions), rows)
    return len(rows)


def last_decisions(engine: Engine) -> list[dict[str, Any]]:
    """The last decision recorded for each SiteDirector queue (empty until a SiteDirector posts any)."""
    with read_transaction(engine) as conn:
        rows = conn.execute(select(SiteDirectorDecisions).order_by(SiteDirectorDecisions.Queue)).all()
    return [
        {"Queue": r.Queue, "Director": r.Director, "DecisionTime": _jsonable(r.DecisionTime), **json.loads(r.Decision)}
        for r in rows
    ]
