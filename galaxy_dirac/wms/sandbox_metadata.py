"""Which owner registered which sandbox, and which job uses it (DIRAC's SandboxMetadataDB).

The bytes live in the content-addressed store (``sandboxes.py``); this module decides who may see them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import policy
from .auth import Principal
from .db import (
    Jobs,
    SandBoxes,
    SBEntityMapping,
    SBJobUploads,
    SBOwners,
    read_transaction,
    retrying,
    utcnow,
    write_transaction,
)
from .jobs import SANDBOX_SE, BadRequest, sandbox_pfn, split_sandbox_ref
from .sandboxes import SandboxNotFound, SandboxStore, SandboxTooLarge, key_from_pfn, make_ticket, read_ticket

if TYPE_CHECKING:
    from .context import Context

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


@retrying
def register(engine: Engine, principal_data: dict[str, Any], pfn: str, size: int) -> None:
    """Record a sandbox whose bytes were just uploaded (and verified) by this principal; idempotent.

    An upload with a job token also records that the job holds the sandbox, so that job may attach it as output.
    """
    principal = Principal(**principal_data)
    now = utcnow()
    with write_transaction(engine) as conn:
        policy.require_live_job_token(conn, principal)
        sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar()
        if sb_id is not None:
            conn.execute(update(SandBoxes).where(SandBoxes.SBId == sb_id).values(LastAccessTime=now))
        else:
            try:
                with conn.begin_nested():
                    sb_id = conn.execute(
                        insert(SandBoxes).values(
                            OwnerId=_owner_id(conn, principal),
                            SEName=SANDBOX_SE,
                            SEPFN=pfn,
                            Bytes=size,
                            RegistrationTime=now,
                            LastAccessTime=now,
                            Assigned=False,
                        )
                    ).inserted_primary_key[0]
            except IntegrityError:  # registered concurrently by the same owner
                sb_id = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN == pfn)).scalar_one()
        if principal.role == "job" and principal.job_id is not None:
            held = select(SBJobUploads.SBId).where(SBJobUploads.SBId == sb_id, SBJobUploads.JobID == principal.job_id)
            if conn.execute(held).first() is None:
                with contextlib.suppress(IntegrityError), conn.begin_nested():
                    conn.execute(insert(SBJobUploads).values(SBId=sb_id, JobID=principal.job_id))


def check_read_access(engine: Engine, principal: Principal, pfn: str) -> None:
    """Owners read their own sandboxes; a live job token reads its own job's sandboxes; admins read all
    (the rules are in policy.py)."""
    with read_transaction(engine) as conn:
        policy.require_sandbox_read(conn, principal, pfn)


def has_own_copy(engine: Engine, principal: Principal, pfn: str) -> bool:
    """Whether the caller may skip the upload of ``pfn`` (see policy.has_own_copy); job tokens must be live."""
    with read_transaction(engine) as conn:
        policy.require_live_job_token(conn, principal)
        return policy.has_own_copy(conn, principal, pfn)


def owner_prefix(principal: Principal) -> str:
    return policy.owner_prefix(principal)


@retrying
def assign(engine: Engine, job_id: int, ref_or_pfn: str, sandbox_type: str, principal: Principal | None = None) -> None:
    """Attach a registered sandbox to a job (the output sandbox after the wrapper uploaded it); with a principal,
    only what policy.py allows it."""
    if sandbox_type not in SANDBOX_TYPES:
        raise BadRequest(f"sandbox type must be one of {SANDBOX_TYPES}")
    pfn = split_sandbox_ref(ref_or_pfn)[1] if ref_or_pfn.startswith("SB:") else ref_or_pfn
    with write_transaction(engine) as conn:
        if principal is None:
            sb_id = policy.sandbox_id(conn, pfn)
        else:
            job_row = conn.execute(select(Jobs).where(Jobs.JobID == job_id)).first()
            refusal = policy.job_refusal(principal, job_id, job_row)
            if refusal is not None:
                raise refusal
            sb_id = policy.require_sandbox_assign(conn, principal, job_row, pfn)
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


@retrying
def touch(engine: Engine, pfn: str) -> None:
    with write_transaction(engine) as conn:
        conn.execute(update(SandBoxes).where(SandBoxes.SEPFN == pfn).values(LastAccessTime=utcnow()))


# --- the upload and download flow (DiracX's sandbox logic; the routes only carry HTTP) -----------------------------
def _ticket_principal(caller: Principal) -> dict[str, Any]:
    """Who a ticket is for (signed into it); for job tokens with the job and attempt, checked again on use."""
    data: dict[str, Any] = {"role": caller.role, "owner": caller.owner, "group": caller.group, "vo": caller.vo}
    if caller.role == "job":
        data.update(job_id=caller.job_id, run=caller.run)
    return data


def upload_target(
    ctx: Context, caller: Principal, checksum_algorithm: str, checksum: str, fmt: str, size: int, base_url: str
) -> dict[str, Any]:
    """An upload target, or none when the caller already holds these bytes (dedup within one owner, and for a
    job token within its job: knowing another owner's checksum is not proof of holding the bytes)."""
    policy.require_role(caller, "admin", "runner", "job")
    settings = ctx.settings
    if size > settings.max_sandbox_size:
        raise SandboxTooLarge(f"sandbox of {size} bytes is over the limit of {settings.max_sandbox_size}")
    checksum = checksum.lower()
    key = ctx.store.key_for(checksum_algorithm, checksum, fmt)
    pfn = sandbox_pfn(caller, checksum_algorithm, checksum, fmt)
    if has_own_copy(ctx.engine, caller, pfn) and ctx.store.exists(key):
        touch(ctx.engine, pfn)
        return {"pfn": full_ref(pfn), "url": None, "fields": {}}
    claims = {"size": size, "pfn": pfn, "principal": _ticket_principal(caller)}
    ticket = make_ticket(ctx.key, key, "upload", int(settings.ticket_lifetime), claims)
    return {"pfn": full_ref(pfn), "url": f"{base_url}/api/x-embedded/sandboxes/upload/{ticket}", "fields": {"key": key}}


def upload_claims(ctx: Context, ticket: str) -> dict[str, Any]:
    """What an upload ticket allows (key, size, pfn, principal); refused when forged or expired."""
    return read_ticket(ctx.key, ticket, "upload")


def store_upload(ctx: Context, claims: dict[str, Any], stream: IO[bytes]) -> None:
    """Store the bytes (hashed even when the content is stored already: the upload is the proof of holding
    them), then register the pfn for the ticket's principal."""
    ctx.store.write(claims["key"], stream, claims["size"], prove=True)
    register(ctx.engine, claims["principal"], claims["pfn"], claims["size"])


def download_target(ctx: Context, caller: Principal, ref: str, base_url: str) -> dict[str, Any]:
    """A download ticket for a sandbox the caller may read (policy.require_sandbox_read)."""
    path = split_sandbox_ref(ref)[1] if ref.startswith("SB:") else ref
    check_read_access(ctx.engine, caller, path)
    lifetime = int(ctx.settings.ticket_lifetime)
    claims = {"principal": _ticket_principal(caller)} if caller.role == "job" else None
    ticket = make_ticket(ctx.key, key_from_pfn(path), "download", lifetime, claims)
    touch(ctx.engine, path)
    return {"url": f"{base_url}/api/x-embedded/sandboxes/download/{ticket}", "expires_in": lifetime}


def download_path(ctx: Context, ticket: str) -> Path:
    """The stored file a download ticket names; a job token's ticket dies with the attempt it was given to."""
    claims = read_ticket(ctx.key, ticket, "download")
    if "principal" in claims:
        with read_transaction(ctx.engine) as conn:
            policy.require_live_job_token(conn, Principal(**claims["principal"]))
    path = ctx.store.path_for(claims["key"])
    if not path.exists():
        raise SandboxNotFound(f"sandbox {claims['key']} is not in the store")
    return path


def delete_unused(engine: Engine, store: SandboxStore, pfn: str) -> None:
    """Drop the bytes of a removed sandbox record unless another owner's pfn names the same content."""
    key = key_from_pfn(pfn)
    with read_transaction(engine) as conn:
        still_used = conn.execute(select(SandBoxes.SBId).where(SandBoxes.SEPFN.like(f"%/{key}"))).first()
    if still_used is None:
        store.delete(key)
