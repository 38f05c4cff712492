"""Task queues: jobs grouped by identical requirements, as in DIRAC's TaskQueueDB.

A pilot is matched against a few hundred task queues rather than a million jobs; jobs within a queue are
interchangeable for matching, so the matcher only has to pick a queue and then the oldest job in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from typing import Any, Iterable, Mapping

from sqlalchemy import Connection, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .db import TQ_MULTI_VALUED, QueueEvents, TaskQueues, TQJobs, utcnow
from .signals import Generation

#: DIRAC's CPU-time segments in seconds (6 min … 12.5 days); a job's CPUTime is rounded up to one of them so that
#: jobs with nearly equal requests share a queue.
CPU_SEGMENTS = (
    6 * 60,
    30 * 60,
    3600,
    6 * 3600,
    12 * 3600,
    86400,
    2 * 86400,
    3 * 86400,
    4 * 86400,
    6 * 86400,
    8 * 86400,
    10 * 86400,
    int(12.5 * 86400),
)

#: DIRAC caps a task queue at this many jobs; a fuller queue gets a sibling with the same key.
MAX_JOBS_IN_TQ = 5000

#: Bumped whenever this process creates a task queue, and once jobs it queued are committed, so cached eligibility
#: (matcher) is re-read at once here and waiting long-poll matches wake up and find them.
changes = Generation()


def fit_cpu_time(cpu_time: int) -> int:
    """Round a requested CPU time up to its segment (requests above the last segment get the last one)."""
    for segment in CPU_SEGMENTS:
        if cpu_time <= segment:
            return segment
    return CPU_SEGMENTS[-1]


def processor_tags(processors: int, whole_node: bool = False) -> list[str]:
    """The tags a job needs for its processor count; a pilot with N cores offers ``1Processors``…``NProcessors``."""
    tags: list[str] = []
    if processors > 1:
        tags += [f"{processors}Processors", "MultiProcessor"]
    if whole_node:
        tags += ["WholeNode", "MultiProcessor"]
    return tags


@dataclasses.dataclass(frozen=True)
class TQKey:
    Owner: str
    OwnerGroup: str
    VO: str
    CPUTime: int
    Sites: tuple[str, ...] = ()
    GridCEs: tuple[str, ...] = ()
    BannedSites: tuple[str, ...] = ()
    Platforms: tuple[str, ...] = ()
    JobTypes: tuple[str, ...] = ()
    Tags: tuple[str, ...] = ()
    MinRAM: int = 0
    MaxRAM: int = 0

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _values(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    return tuple(sorted({str(v) for v in value if str(v) and str(v).upper() != "ANY"}))


def key_for_job(attrs: Mapping[str, Any], owner: str, group: str, vo: str) -> TQKey:
    """The task-queue key of a validated job description (DIRAC's ``JobRequirements``)."""
    tags = set(_values(attrs.get("Tags")))
    tags.update(processor_tags(int(attrs.get("NumberOfProcessors") or 1), bool(attrs.get("WholeNode"))))
    return TQKey(
        Owner=owner,
        OwnerGroup=group,
        VO=vo,
        CPUTime=fit_cpu_time(int(attrs.get("CPUTime") or 86400)),
        Sites=_values(attrs.get("Site")),
        GridCEs=_values(attrs.get("GridCE")),
        BannedSites=_values(attrs.get("BannedSites")),
        Platforms=_values(attrs.get("Platform")),
        JobTypes=_values(attrs.get("JobType") or "User"),
        Tags=tuple(sorted(tags)),
        MinRAM=int(attrs.get("MinRAM") or 0),
        MaxRAM=int(attrs.get("MaxRAM") or 0),
    )


def find_or_create(conn: Connection, key: TQKey, shares: Mapping[str, float], *, recalculate: bool = True) -> int:
    """Return the id of a task queue with this key and room for a job, creating it if needed.

    The row is read ``FOR SHARE`` so the maintenance loop cannot delete an empty queue between this lookup and the
    job's insertion on a server database.
    """
    digest = key.hash()
    for attempt in range(100):
        slot_digest = digest if attempt == 0 else f"{digest[:56]}{attempt:08d}"
        query = select(TaskQueues.TQId).where(TaskQueues.KeyHash == slot_digest)
        if conn.dialect.name != "sqlite":
            query = query.with_for_update(read=True)
        tq_id = conn.execute(query).scalar()
        if tq_id is None:
            tq_id = _create(conn, key, slot_digest)
            if tq_id is None:
                continue  # another submitter created it first; read it on the next turn
            changes.bump()
            if recalculate:
                recalculate_priorities(conn, shares, groups=[key.OwnerGroup])
            return tq_id
        count = conn.execute(select(func.count()).select_from(TQJobs).where(TQJobs.TQId == tq_id)).scalar_one()
        if count < MAX_JOBS_IN_TQ:
            return tq_id
    raise RuntimeError("task queue key space exhausted")  # pragma: no cover - 500,000 jobs with one key


def _create(conn: Connection, key: TQKey, digest: str) -> int | None:
    row = {
        "Owner": key.Owner,
        "OwnerGroup": key.OwnerGroup,
        "VO": key.VO,
        "CPUTime": key.CPUTime,
        "Priority": 1.0,
        "Enabled": True,
        "MinRAM": key.MinRAM,
        "MaxRAM": key.MaxRAM,
        "KeyHash": digest,
    }
    try:
        with conn.begin_nested():
            tq_id = conn.execute(insert(TaskQueues).values(**row)).inserted_primary_key[0]
            for field, table in TQ_MULTI_VALUED.items():
                values = getattr(key, field)
                if values:
                    conn.execute(insert(table), [{"TQId": tq_id, "Value": v} for v in values])
    except IntegrityError:
        return None
    return int(tq_id)


def insert_jobs(conn: Connection, rows: Iterable[tuple[int, int, int]]) -> None:
    """Queue jobs as (TQId, JobId, Priority); the caller bumps :data:`changes` once its transaction commits, and the
    queue event recorded here tells the other API workers and hosts (its id is what they watch)."""
    values = [{"TQId": tq, "JobId": job, "Priority": prio, "RealPriority": float(prio)} for tq, job, prio in rows]
    if values:
        conn.execute(insert(TQJobs), values)
        conn.execute(insert(QueueEvents).values(At=utcnow()))


def prune_events(conn: Connection) -> int:
    """Drop every queue event but the newest (only its id matters, and it must never go down)."""
    newest = conn.execute(select(func.max(QueueEvents.ID))).scalar()
    if newest is None:
        return 0
    return conn.execute(delete(QueueEvents).where(QueueEvents.ID < newest)).rowcount


def remove_jobs(conn: Connection, job_ids: Iterable[int]) -> int:
    ids = list(job_ids)
    if not ids:
        return 0
    return conn.execute(delete(TQJobs).where(TQJobs.JobId.in_(ids))).rowcount


def recalculate_priorities(conn: Connection, shares: Mapping[str, float], groups: Iterable[str] | None = None) -> None:
    """Split each group's share equally among its owners, and each owner's part among its queues.

    Matching picks queues at random weighted by these priorities, so over many matches every group gets pilots in
    proportion to its share, whatever the number of jobs or queues a single user creates (DIRAC's fair share).
    """
    query = select(TaskQueues.TQId, TaskQueues.Owner, TaskQueues.OwnerGroup)
    if groups is not None:
        query = query.where(TaskQueues.OwnerGroup.in_(list(groups)))
    by_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for tq_id, owner, group in conn.execute(query):
        by_group[group][owner].append(tq_id)
    updates = []
    for group, owners in by_group.items():
        share = float(shares.get(group, 1.0))
        for tq_ids in owners.values():
            priority = share / len(owners) / len(tq_ids)
            updates.extend({"tq": tq_id, "prio": priority} for tq_id in tq_ids)
    if updates:
        from sqlalchemy import bindparam

        conn.execute(
            update(TaskQueues).where(TaskQueues.TQId == bindparam("tq")).values(Priority=bindparam("prio")),
            updates,
        )


def delete_empty(conn: Connection) -> int:
    """Drop queues without jobs (the maintenance loop does this, not the matcher, to keep matching short)."""
    has_jobs = exists().where(TQJobs.TQId == TaskQueues.TQId)
    query = select(TaskQueues.TQId).where(~has_jobs)
    if conn.dialect.name != "sqlite":
        query = query.with_for_update(skip_locked=True)
    empty = list(conn.execute(query).scalars())
    if empty:
        for table in TQ_MULTI_VALUED.values():
            conn.execute(delete(table).where(table.TQId.in_(empty)))
        conn.execute(delete(TaskQueues).where(TaskQueues.TQId.in_(empty)))
    return len(empty)


def demand(conn: Connection) -> list[dict[str, Any]]:
    """Every non-empty queue with its key and waiting-job count: what the SiteDirector turns into pilots."""
    counts = dict(
        conn.execute(select(TQJobs.TQId, func.count()).group_by(TQJobs.TQId)).all()  # type: ignore[arg-type]
    )
    if not counts:
        return []
    queues = {
        row.TQId: {
            "TQId": row.TQId,
            "Owner": row.Owner,
            "OwnerGroup": row.OwnerGroup,
            "VO": row.VO,
            "CPUTime": row.CPUTime,
            "Priority": row.Priority,
            "MinRAM": row.MinRAM,
            "MaxRAM": row.MaxRAM,
            "WaitingJobs": counts[row.TQId],
            **{field: [] for field in TQ_MULTI_VALUED},
        }
        for row in conn.execute(select(TaskQueues).where(TaskQueues.TQId.in_(list(counts))))
    }
    for field, table in TQ_MULTI_VALUED.items():
        for tq_id, value in conn.execute(select(table.TQId, table.Value).where(table.TQId.in_(list(queues)))):
            queues[tq_id][field].append(value)
    return [queues[tq] for tq in sorted(queues)]
