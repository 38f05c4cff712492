"""Which owner registered which sandbox, and which job uses it (DIRAC's SandboxMetadataDB).

The bytes live in the content-addressed store (``sandboxes.py``); this module decides who may see them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from .auth import AuthError, Principal
from .db import SandBoxes, SBEntityMapping, SBOwners, read_transaction, utcnow, write_transaction
from .jobs import SANDBOX_SE, BadRequest, NotFound, split_sandbox_ref

SANDBOX_TYPES = ("Input", "Output")


def full_ref(pfn: str) -> str:
    return f"SB:{SANDBOX_SE}|{pfn}"


def _owner_id(conn: Any, principal: Principal) -> int:
    query = select(SBOwners.OwnerID).where(
        SBOwners.Owner == principal.owner, SBOwners.OwnerGroup == principal.group, SBOwners.VO == principal.vo
    )
    owner_id = conn.execute(query).scalar()
    if owner_id is None:
        try:
            with conn.begin_nested():
                owner_id = conn.execute(
                    insert(SBOwners).values(Owner=principal.owner, OwnerGroup=principal.group, VO=principal.vo)
                ).inserted_primary_key[0]
        except IntegrityError:
            owner_id = conn.execute(query).scalar_one()
    return int(owner_id)


def is_registered(engine: Engine, pfn: str) -> bool:
    with read_transaction(engine) as conn:
        return conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar() is not None


def register(engine: Engine, principal_data: dict[str, Any], pfn: str, size: int) -> None:
    """Record a sandbox whose bytes are in the store; idempotent (re-uploads and dedup hits are fine)."""
    principal = Principal(**principal_data)
    now = utcnow()
    with write_transaction(engine) as conn:
        if conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar() is not None:
            conn.execute(update(SandBoxes).where(SandBoxes.SEPFN == pfn).values(LastAccessTime=now))
            return
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(SandBoxes).values(
                        OwnerId=_owner_id(conn, principal),
                        SEName=SANDBOX_SE,
                        SEPFN=pfn,
                        Bytes=size,
                        RegistrationTime=now,
                        LastAccessTime=now,
                        Assigned=False,
                    )
                )
        except IntegrityError:
            pass  # registered concurrently by the same owner


def check_read_access(engine: Engine, principal: Principal, pfn: str) -> None:
    """Owners read their own sandboxes; a job token reads the sandboxes mapped to its job; admins read all."""
    with read_transaction(engine) as conn:
        sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar()
        if sb_id is None:
            raise NotFound(f"sandbox {pfn} not found")
        if principal.is_admin:
            return
        if principal.role == "runner":
            if pfn.startswith(owner_prefix(principal)):
                return
            # An owner may also read sandboxes mapped to its own jobs (outputs uploaded with a job token).
            entity_ids = conn.execute(select(SBEntityMapping.EntityId).where(SBEntityMapping.SBId == sb_id)).scalars()
            job_ids = [int(e.split(":", 1)[1]) for e in entity_ids if e.startswith("Job:")]
            if job_ids and _owns_any(conn, principal, job_ids):
                return
        elif principal.role == "job":
            mapped = conn.execute(
                select(SBEntityMapping.SBId).where(
                    SBEntityMapping.SBId == sb_id, SBEntityMapping.EntityId == f"Job:{principal.job_id}"
                )
            ).scalar()
            if mapped is not None or pfn.startswith(owner_prefix(principal)):
                return
        raise AuthError(403, f"sandbox {pfn} is not yours to read")


def _owns_any(conn: Any, principal: Principal, job_ids: list[int]) -> bool:
    from .db import Jobs

    return (
        conn.execute(
            select(Jobs.JobID).where(Jobs.JobID.in_(job_ids), Jobs.Owner == principal.owner, Jobs.VO == principal.vo)
        ).first()
        is not None
    )


def owner_prefix(principal: Principal) -> str:
    return f"/S3/sandboxes/{principal.vo}/{principal.group}/{principal.owner}/"


def assign(engine: Engine, job_id: int, ref_or_pfn: str, sandbox_type: str) -> None:
    """Attach a registered sandbox to a job (the output sandbox after the wrapper uploaded it)."""
    if sandbox_type not in SANDBOX_TYPES:
        raise BadRequest(f"sandbox type must be one of {SANDBOX_TYPES}")
    pfn = split_sandbox_ref(ref_or_pfn)[1] if ref_or_pfn.startswith("SB:") else ref_or_pfn
    with write_transaction(engine) as conn:
        sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar()
        if sb_id is None:
            raise NotFound(f"sandbox {pfn} not found (upload it first)")
        entity = f"Job:{job_id}"
        exists = conn.execute(
            select(SBEntityMapping.SBId).where(
                SBEntityMapping.SBId == sb_id, SBEntityMapping.EntityId == entity, SBEntityMapping.Type == sandbox_type
            )
        ).scalar()
        if exists is None:
            conn.execute(insert(SBEntityMapping).values(SBId=sb_id, EntityId=entity, Type=sandbox_type))
        conn.execute(update(SandBoxes).where(SandBoxes.SBId == sb_id).values(Assigned=True, LastAccessTime=utcnow()))


def job_sandboxes(engine: Engine, job_id: int) -> dict[str, list[str]]:
    """A job's sandbox pfns by type, in the short ``/S3/...`` form DiracX returns."""
    result: dict[str, list[str]] = {t: [] for t in SANDBOX_TYPES}
    with read_transaction(engine) as conn:
        for pfn, sandbox_type in conn.execute(
            select(SandBoxes.SEPFN, SBEntityMapping.Type)
            .join(SBEntityMapping, SBEntityMapping.SBId == SandBoxes.SBId)
            .where(SBEntityMapping.EntityId == f"Job:{job_id}")
            .order_by(SandBoxes.SBId)
        ):
            result.setdefault(sandbox_type, []).append(pfn)  # DiracX lists the short form
    return result


def touch(engine: Engine, pfn: str) -> None:
    with write_transaction(engine) as conn:
        conn.execute(update(SandBoxes).where(SandBoxes.SEPFN == pfn).values(LastAccessTime=utcnow()))
