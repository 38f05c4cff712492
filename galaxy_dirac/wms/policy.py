"""Who may do what to which job and sandbox: the scheduler's authorisation rules, in one place.

Every rule answers with a typed refusal from :mod:`.errors` (``Forbidden``, ``NotFound``), never with a message to
be matched. Roles (see ``docs/security.md``):

- ``admin``: everything.
- ``runner`` (Galaxy, one owner): submits, reads and changes its owner's jobs and sandboxes.
- ``reader`` (monitoring): reads every job; changes nothing.
- ``director`` (the SiteDirector): records the pilots it submits, mints each one's pilot token, reconciles pilot
  states and reads demand; matches no job.
- ``pilot`` with a stamp (minted by the director for one pilot): registers, updates and matches as that pilot only,
  at the site it was started for. Without a stamp (``token create --role pilot``): a site-wide pilot token that may
  also do what a director does, for pilots started by hand; it belongs on trusted hosts only.
- ``job`` (minted at match time for one job and one attempt): heartbeats and status of that job, its own input and
  output sandboxes; dead once the job is rescheduled (``run`` no longer equals the job's RescheduleCounter).
"""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import select

from .auth import Principal
from .db import Jobs, SandBoxes, SBEntityMapping, SBJobUploads
from .errors import Forbidden, NotFound, WMSError


def require_role(principal: Principal, *roles: str) -> None:
    """Refuse a caller whose role is not among ``roles``."""
    if principal.role not in roles:
        raise Forbidden(f"a {principal.role} token may not do this (needs role {' or '.join(roles)})")


def owner_prefix(principal: Principal) -> str:
    """The start of every sandbox pfn of the principal's owner (DiracX's naming: vo/group/owner)."""
    return f"/S3/sandboxes/{principal.vo}/{principal.group}/{principal.owner}/"


# --- pilots -------------------------------------------------------------------------------------------------------
def require_pilot_manager(principal: Principal) -> None:
    """Record submitted pilots, mint their tokens, change any pilot's record: the director's work."""
    require_role(principal, "admin", "director", "pilot")
    if principal.is_one_pilot:
        raise Forbidden(f"the token of pilot {principal.pilot_stamp} may act for that pilot only")


def require_pilot(principal: Principal, stamp: str, site: Optional[str] = None) -> None:
    """May the caller register or update pilot ``stamp`` (reporting ``site``)? A one-pilot token: itself only."""
    require_role(principal, "admin", "director", "pilot")
    if not principal.is_one_pilot:
        return
    if stamp != principal.pilot_stamp:
        raise Forbidden(f"this token is pilot {principal.pilot_stamp}'s, not pilot {stamp}'s")
    if site is not None and principal.pilot_site and site != principal.pilot_site:
        raise Forbidden(f"pilot {stamp} was started for site {principal.pilot_site}, not {site}")


def matching_pilot(principal: Principal, stamp: str, site: str) -> str:
    """May the caller ask for a job for this slot? Returns the stamp the match is recorded under: a one-pilot
    token matches as itself, at its own site, so it can neither take another site's jobs nor blame another pilot."""
    require_role(principal, "admin", "pilot")
    if not principal.is_one_pilot:
        return stamp
    require_pilot(principal, stamp or str(principal.pilot_stamp), site)
    return str(principal.pilot_stamp)


def visible_pilots(principal: Principal, stamps: list[str]) -> list[str]:
    """The stamps a pilot listing may show: a one-pilot token sees its own record only."""
    require_role(principal, "admin", "director", "pilot", "reader")
    if principal.is_one_pilot:
        if stamps and stamps != [principal.pilot_stamp]:
            raise Forbidden(f"this token is pilot {principal.pilot_stamp}'s; it may list that pilot only")
        return [str(principal.pilot_stamp)]
    return stamps


# --- jobs ----------------------------------------------------------------------------------------------------------
def job_refusal(principal: Principal, job_id: int, row: Any) -> Optional[WMSError]:
    """Why ``principal`` may not change job ``job_id`` (its row, or ``None`` if there is none), or ``None`` if it may.

    Refusals that concern one job of a bulk request are returned (they become that job's ``failed`` entry);
    refusals of the token itself are raised, so the whole request is refused.
    """
    if row is None:
        return NotFound(f"job {job_id} not found")
    if principal.role == "job":
        if principal.job_id != job_id:
            raise Forbidden(f"this job token is for job {principal.job_id}, not job {job_id}")
        require_current_attempt(principal, row.RescheduleCounter)
        return None
    if principal.role == "runner":
        if row.Owner != principal.owner or row.VO != principal.vo:
            return Forbidden(f"job {job_id} belongs to another owner")
        return None
    if principal.role == "admin":
        return None
    raise Forbidden(f"a {principal.role} token may not change jobs")


def reading_as(principal: Principal) -> Principal:
    """The principal a read of one job is checked as: a reader (monitoring) reads every job as an admin would."""
    return (
        Principal("admin", principal.owner, principal.group, principal.vo) if principal.role == "reader" else principal
    )


def require_current_attempt(principal: Principal, reschedule_counter: int) -> None:
    """A job token is for one attempt: once the job was rescheduled its old pilot may no longer act for it."""
    if principal.role == "job" and principal.run != reschedule_counter:
        raise Forbidden(
            f"job {principal.job_id} was rescheduled since this token was issued; this pilot no longer runs it"
        )


def require_live_job_token(conn: Any, principal: Principal) -> None:
    """For job tokens: their job exists and has not been rescheduled since the token was minted."""
    if principal.role != "job":
        return
    counter = conn.execute(select(Jobs.RescheduleCounter).where(Jobs.JobID == principal.job_id)).scalar()
    if counter is None:
        raise NotFound(f"job {principal.job_id} not found")
    require_current_attempt(principal, counter)


# --- sandboxes -----------------------------------------------------------------------------------------------------
def _job_holds(conn: Any, sb_id: int, job_id: Optional[int]) -> bool:
    """The sandbox is one of the job's own: its input or output, or uploaded with the job's token."""
    entity = f"Job:{job_id}"
    mapped = conn.execute(
        select(SBEntityMapping.SBId).where(SBEntityMapping.SBId == sb_id, SBEntityMapping.EntityId == entity)
    ).first()
    if mapped is not None:
        return True
    return (
        conn.execute(select(SBJobUploads.SBId).where(SBJobUploads.SBId == sb_id, SBJobUploads.JobID == job_id)).first()
        is not None
    )


def _owns_a_job_of(conn: Any, principal: Principal, sb_id: int) -> bool:
    entities = conn.execute(select(SBEntityMapping.EntityId).where(SBEntityMapping.SBId == sb_id)).scalars()
    job_ids = [int(e.split(":", 1)[1]) for e in entities if e.startswith("Job:") and e[4:].isdigit()]
    if not job_ids:
        return False
    query = select(Jobs.JobID).where(Jobs.JobID.in_(job_ids), Jobs.Owner == principal.owner, Jobs.VO == principal.vo)
    return conn.execute(query).first() is not None


def sandbox_id(conn: Any, pfn: str) -> int:
    sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar()
    if sb_id is None:
        raise NotFound(f"sandbox {pfn} not found")
    return int(sb_id)


def require_sandbox_read(conn: Any, principal: Principal, pfn: str) -> int:
    """May ``principal`` download the registered sandbox ``pfn``? Returns its SBId.

    Owners read the sandboxes registered under their own name (registration needs an upload, so knowing a
    checksum is not enough) and those mapped to their jobs; a live job token reads only its own job's sandboxes.
    """
    sb_id = sandbox_id(conn, pfn)
    if principal.role == "admin":
        return sb_id
    if principal.role == "runner":
        if pfn.startswith(owner_prefix(principal)) or _owns_a_job_of(conn, principal, sb_id):
            return sb_id
    elif principal.role == "job":
        require_live_job_token(conn, principal)
        if _job_holds(conn, sb_id, principal.job_id):
            return sb_id
        raise Forbidden(f"sandbox {pfn} is not one of job {principal.job_id}'s sandboxes")
    raise Forbidden(f"sandbox {pfn} is not yours to read")


def require_sandbox_assign(conn: Any, principal: Principal, job_row: Any, pfn: str) -> int:
    """May ``principal`` attach the sandbox ``pfn`` to the job (as its output)? Returns its SBId.

    The job itself must be the caller's to change (checked by the caller with :func:`job_refusal`).
    """
    sb_id = sandbox_id(conn, pfn)
    if principal.role == "admin":
        return sb_id
    if principal.role == "job":
        if _job_holds(conn, sb_id, job_row.JobID):
            return sb_id
        raise Forbidden(f"sandbox {pfn} was not uploaded by job {job_row.JobID}; upload it with this job's token")
    if principal.role == "runner" and pfn.startswith(owner_prefix(principal)):
        return sb_id
    raise Forbidden(f"sandbox {pfn} is not yours to assign")


def has_own_copy(conn: Any, principal: Principal, pfn: str) -> bool:
    """Whether the caller already holds the sandbox ``pfn`` and needs no upload (DiracX's dedup, within one owner:
    for a job token, within its own job)."""
    sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar()
    if sb_id is None:
        return False
    if principal.role == "job":
        return _job_holds(conn, sb_id, principal.job_id)
    return True
