"""Match a pilot's slot to one waiting job, atomically (DIRAC's Matcher + TaskQueueDB.matchAndGetJob).

Rules (DIRAC's): a task queue is eligible when its CPU time fits the slot, every tag it needs is offered by the slot,
its site/CE/platform lists allow the slot (an empty list allows everything) and its banned sites do not name the
slot's site, and the slot has the RAM it asks for. Among eligible queues one is drawn at random weighted by priority
(fair share), and within it the job with the highest user priority, oldest first.

Exactly-once: the job leaves ``tq_Jobs`` and goes Waiting → Matched in one transaction whose UPDATE is guarded by
``Status = 'Waiting'``; on SQLite that transaction holds the write lock from its start, on PostgreSQL and MariaDB the
queue row is taken with ``FOR UPDATE SKIP LOCKED`` so concurrent pilots pick different jobs instead of waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Iterable, Sequence

from sqlalchemy import Engine, and_, delete, exists, not_, or_, select, update

from .. import states
from . import jobs as jobs_mod
from .db import (
    Jobs,
    JobToPilotMapping,
    PilotAgents,
    TaskQueues,
    TQJobs,
    TQToBannedSites,
    TQToGridCEs,
    TQToPlatforms,
    TQToSites,
    TQToTags,
    is_sqlite,
    read_transaction,
    supports_skip_locked,
    utcnow,
    write_transaction,
)

log = logging.getLogger(__name__)

#: How many eligible queues one match request tries before answering "no job" (queues can empty under us).
MAX_QUEUES_TRIED = 20


@dataclasses.dataclass
class Slot:
    """What a pilot offers, as it describes itself to the matcher."""

    site: str
    grid_ce: str = ""
    queue: str = ""
    platforms: Sequence[str] = ()
    tags: Sequence[str] = ()
    processors: int = 1
    max_ram: int = 0  # MB; 0 = unknown, no RAM limit applied
    cpu_time: int = 0  # seconds; 0 = unlimited
    pilot_stamp: str = ""
    owner_groups: Sequence[str] = ()  # restrict to these groups (a VO's dedicated pilots); empty = any

    def offered_tags(self) -> list[str]:
        """Tags offered: the declared ones, plus what the processor count implies (DIRAC's pilot convention)."""
        tags = set(self.tags)
        tags.update(f"{n}Processors" for n in range(1, max(1, self.processors) + 1))
        if self.processors > 1:
            tags.add("MultiProcessor")
        return sorted(tags)


def eligible_queues(engine: Engine, slot: Slot) -> list[tuple[int, float]]:
    """(TQId, Priority) of every non-empty queue the slot satisfies."""
    tq = TaskQueues
    conds = [tq.Enabled.is_(True), exists().where(TQJobs.TQId == tq.TQId)]
    if slot.cpu_time > 0:
        conds.append(tq.CPUTime <= slot.cpu_time)
    if slot.max_ram > 0:
        conds.append(tq.MinRAM <= slot.max_ram)
    if slot.owner_groups:
        conds.append(tq.OwnerGroup.in_(list(slot.owner_groups)))
    conds.append(_allows(TQToSites, slot.site))
    conds.append(_allows(TQToGridCEs, slot.grid_ce))
    conds.append(not_(exists().where(and_(TQToBannedSites.TQId == tq.TQId, TQToBannedSites.Value == slot.site))))
    platform_ok = not_(exists().where(TQToPlatforms.TQId == tq.TQId))
    if slot.platforms:
        platform_ok = or_(
            platform_ok,
            exists().where(and_(TQToPlatforms.TQId == tq.TQId, TQToPlatforms.Value.in_(list(slot.platforms)))),
        )
    conds.append(platform_ok)
    conds.append(not_(exists().where(and_(TQToTags.TQId == tq.TQId, TQToTags.Value.not_in(slot.offered_tags())))))
    with read_transaction(engine) as conn:
        return [(row[0], float(row[1])) for row in conn.execute(select(tq.TQId, tq.Priority).where(*conds))]


def _allows(table: Any, value: str) -> Any:
    """An empty list allows every value; otherwise the value must be listed."""
    listed = exists().where(table.TQId == TaskQueues.TQId)
    if not value:
        return not_(listed)
    return or_(not_(listed), exists().where(and_(table.TQId == TaskQueues.TQId, table.Value == value)))


def weighted_order(queues: Iterable[tuple[int, float]], rng: random.Random) -> list[int]:
    """Queues in a random order where each comes first with probability proportional to its priority.

    Efraimidis–Spirakis keys (u^(1/w)): one sort gives the whole fallback order, so a queue emptied by a concurrent
    pilot costs one more try, not a new draw.
    """
    keyed = []
    for tq_id, priority in queues:
        weight = max(priority, 1e-9)
        keyed.append((rng.random() ** (1.0 / weight), tq_id))
    keyed.sort(reverse=True)
    return [tq_id for _, tq_id in keyed]


def match(engine: Engine, slot: Slot, *, pilot_id: int | None = None, rng: random.Random | None = None) -> int | None:
    """Hand one waiting job to this slot and return its id, or None when nothing fits."""
    rng = rng or random.Random()
    order = weighted_order(eligible_queues(engine, slot), rng)
    for tq_id in order[:MAX_QUEUES_TRIED]:
        job_id = _take_from_queue(engine, tq_id, slot, pilot_id)
        if job_id is not None:
            return job_id
    return None


def _take_from_queue(engine: Engine, tq_id: int, slot: Slot, pilot_id: int | None) -> int | None:
    skip_locked = supports_skip_locked(engine)
    while True:
        with write_transaction(engine) as conn:
            query = (
                select(TQJobs.JobId)
                .where(TQJobs.TQId == tq_id)
                .order_by(TQJobs.Priority.desc(), TQJobs.JobId.asc())
                .limit(1)
            )
            if skip_locked:
                query = query.with_for_update(skip_locked=True)
            elif not is_sqlite(engine):
                query = query.with_for_update()
            job_id = conn.execute(query).scalar()
            if job_id is None:
                return None
            conn.execute(delete(TQJobs).where(TQJobs.TQId == tq_id, TQJobs.JobId == job_id))
            now = utcnow()
            taken = conn.execute(
                update(Jobs)
                .where(Jobs.JobID == job_id, Jobs.Status == states.WAITING)
                .values(Status=states.MATCHED, MinorStatus="Assigned", Site=slot.site or "Unknown", LastUpdateTime=now)
            ).rowcount
            if taken != 1:
                # A stale queue entry (the job was killed or rescheduled meanwhile): dropped, try the next one.
                log.warning("job %s was in task queue %s but not Waiting; entry removed", job_id, tq_id)
                continue
            jobs_mod.add_logging(
                conn, [(job_id, states.MATCHED, "Assigned", "", now, f"Matcher ({slot.pilot_stamp or 'pilot'})")]
            )
            if pilot_id is not None:
                conn.execute(JobToPilotMapping.__table__.insert().values(PilotID=pilot_id, JobID=job_id, StartTime=now))
                conn.execute(
                    update(PilotAgents)
                    .where(PilotAgents.PilotID == pilot_id)
                    .values(
                        CurrentJobID=job_id,
                        MatchedJobs=PilotAgents.MatchedJobs + 1,
                        LastUpdateTime=now,
                        Status=states.PILOT_RUNNING,
                    )
                )
            return int(job_id)
