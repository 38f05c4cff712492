"""Pilot registry (DIRAC's PilotAgentsDB): who was submitted where, who is alive, which jobs each one ran."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import Engine, insert, select, update

from .. import states
from .db import JobToPilotMapping, PilotAgents, read_transaction, retrying, utcnow, write_transaction
from .errors import Invalid as BadRequest
from .errors import NotFound

PILOT_COLUMNS = [c.name for c in PilotAgents.__table__.columns]


#: Request field → PilotAgents column it is stored in.
_FIELD_COLUMNS = {"queue": "Queue", "site": "GridSite", "ce": "DestinationSite", "grid_type": "GridType"}


def _check_lengths(**values: str) -> None:
    """Refuse values longer than their PilotAgents column (strict backends would fail the insert with a 500)."""
    for name, value in values.items():
        limit = PilotAgents.__table__.columns[_FIELD_COLUMNS[name]].type.length
        if value and len(value) > limit:
            raise BadRequest(f"pilot {name} {value[:40]!r}... is longer than {limit} characters")


def _row(row: Any) -> dict[str, Any]:
    from .jobs import _jsonable

    return {name: _jsonable(getattr(row, name)) for name in PILOT_COLUMNS}


@retrying
def add_pilots(
    engine: Engine,
    stamps: Sequence[str],
    *,
    queue: str,
    site: str,
    ce: str,
    grid_type: str,
    vo: str,
    references: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Register pilots the SiteDirector just submitted, as Submitted; returns stamp → PilotID."""
    if not stamps:
        raise BadRequest("no pilot stamps given")
    stamps = list(dict.fromkeys(stamps))  # a repeated stamp is one pilot
    _check_lengths(queue=queue, site=site, ce=ce, grid_type=grid_type)
    for stamp in stamps:
        if not stamp or len(stamp) > 32:
            raise BadRequest(f"pilot stamp {stamp!r} must be 1 to 32 characters")
    references = references or {}
    now = utcnow()
    with write_transaction(engine) as conn:
        known = dict(
            conn.execute(
                select(PilotAgents.PilotStamp, PilotAgents.PilotID).where(PilotAgents.PilotStamp.in_(stamps))
            ).all()
        )
        rows = [
            {
                "PilotStamp": stamp,
                "PilotJobReference": references.get(stamp, stamp)[:255],
                "DestinationSite": ce or "NotAssigned",
                "Queue": queue or "Unknown",
                "GridSite": site or "Unknown",
                "GridType": grid_type or "Unknown",
                "VO": vo,
                "SubmissionTime": now,
                "LastUpdateTime": now,
                "Status": states.PILOT_SUBMITTED,
                "StatusReason": "Submitted by SiteDirector",
            }
            for stamp in stamps
            if stamp not in known
        ]
        if rows:
            conn.execute(insert(PilotAgents), rows)
        return dict(
            conn.execute(
                select(PilotAgents.PilotStamp, PilotAgents.PilotID).where(PilotAgents.PilotStamp.in_(stamps))
            ).all()
        )


@retrying
def register(engine: Engine, stamp: str, description: Mapping[str, Any], vo: str) -> int:
    """A pilot starting on a worker node: Running from now on (created if the SiteDirector did not add it)."""
    if not stamp or len(stamp) > 32:
        raise BadRequest("pilot stamp must be 1 to 32 characters")
    _check_lengths(**{name: str(description.get(name) or "") for name in _FIELD_COLUMNS})
    now = utcnow()
    values = {
        "Status": states.PILOT_RUNNING,
        "StatusReason": f"Running on {description.get('hostname') or 'unknown host'}"[:255],
        "LastUpdateTime": now,
    }
    with write_transaction(engine) as conn:
        pilot_id = conn.execute(select(PilotAgents.PilotID).where(PilotAgents.PilotStamp == stamp)).scalar()
        if pilot_id is None:
            pilot_id = conn.execute(
                insert(PilotAgents).values(
                    PilotStamp=stamp,
                    PilotJobReference=stamp,
                    DestinationSite=str(description.get("ce") or "NotAssigned"),
                    Queue=str(description.get("queue") or "Unknown"),
                    GridSite=str(description.get("site") or "Unknown"),
                    GridType=str(description.get("grid_type") or "Unknown"),
                    VO=vo,
                    SubmissionTime=now,
                    **values,
                )
            ).inserted_primary_key[0]
        else:
            conn.execute(update(PilotAgents).where(PilotAgents.PilotID == pilot_id).values(**values))
    return int(pilot_id)


#: PilotStamp → PilotID never changes once assigned, and every match request names its pilot: remember them.
_pilot_ids: dict[tuple[str, str], int] = {}


def pilot_id_for(engine: Engine, stamp: str) -> int | None:
    key = (str(engine.url), stamp)
    pilot_id = _pilot_ids.get(key)
    if pilot_id is None:
        with read_transaction(engine) as conn:
            pilot_id = conn.execute(select(PilotAgents.PilotID).where(PilotAgents.PilotStamp == stamp)).scalar()
        if pilot_id is not None:
            if len(_pilot_ids) > 100_000:
                _pilot_ids.clear()
            _pilot_ids[key] = pilot_id
    return pilot_id


@retrying
def set_status(engine: Engine, stamp: str, status: str, reason: str = "", matched_jobs: int | None = None) -> dict:
    if status not in states.PILOT_STATES:
        raise BadRequest(f"unknown pilot status {status!r}; use one of {', '.join(states.PILOT_STATES)}")
    with write_transaction(engine) as conn:
        row = conn.execute(select(PilotAgents).where(PilotAgents.PilotStamp == stamp)).first()
        if row is None:
            raise NotFound(f"pilot {stamp!r} not found")
        values: dict[str, Any] = {"Status": status, "LastUpdateTime": utcnow()}
        if reason:
            values["StatusReason"] = reason[:255]
        elif matched_jobs == 0 and row.MatchedJobs == 0:
            values["StatusReason"] = "Empty pilot: no job ever matched"
        conn.execute(update(PilotAgents).where(PilotAgents.PilotID == row.PilotID).values(**values))
        return _row(conn.execute(select(PilotAgents).where(PilotAgents.PilotID == row.PilotID)).one())


def list_pilots(
    engine: Engine, *, stamps: Sequence[str] = (), statuses: Sequence[str] = (), queue: str = "", limit: int = 1000
) -> list[dict[str, Any]]:
    query = select(PilotAgents)
    if stamps:
        query = query.where(PilotAgents.PilotStamp.in_(list(stamps)))
    if statuses:
        query = query.where(PilotAgents.Status.in_(list(statuses)))
    if queue:
        query = query.where(PilotAgents.Queue == queue)
    with read_transaction(engine) as conn:
        return [_row(r) for r in conn.execute(query.order_by(PilotAgents.PilotID.desc()).limit(limit))]


def jobs_of_pilot(engine: Engine, pilot_id: int) -> list[int]:
    with read_transaction(engine) as conn:
        return list(
            conn.execute(select(JobToPilotMapping.JobID).where(JobToPilotMapping.PilotID == pilot_id)).scalars()
        )


def stamps_of_job(engine: Engine, job_id: int) -> list[str]:
    """Stamps of the pilots that were handed this job, in order (more than one after a reschedule)."""
    with read_transaction(engine) as conn:
        return list(
            conn.execute(
                select(PilotAgents.PilotStamp)
                .join(JobToPilotMapping, JobToPilotMapping.PilotID == PilotAgents.PilotID)
                .where(JobToPilotMapping.JobID == job_id)
                .order_by(JobToPilotMapping.StartTime)
            ).scalars()
        )
