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

import bisect
import dataclasses
import datetime as dt
import itertools
import logging
import random
import threading
import time
from typing import Any, Iterable, Sequence

from sqlalchemy import Engine, and_, bindparam, case, delete, exists, insert, not_, or_, select, update

from .. import jdl, states
from ..times import format_time
from . import jobs as jobs_mod
from . import taskqueues
from .auth import create_token
from .db import (
    JobJDLs,
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
    retrying,
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

    Efraimidis–Spirakis keys (u^(1/w)): one sort gives a whole fallback order; used when the cheap single draw
    (``_Eligible.draw``) keeps landing on queues emptied by concurrent pilots.
    """
    keyed = []
    for tq_id, priority in queues:
        weight = max(priority, 1e-9)
        keyed.append((rng.random() ** (1.0 / weight), tq_id))
    keyed.sort(reverse=True)
    return [tq_id for _, tq_id in keyed]


class _Eligible:
    """The eligible queues of one slot signature, with cumulative weights for O(log n) weighted draws."""

    def __init__(self, queues: list[tuple[int, float]], expires: float, generation: int) -> None:
        self.generation = generation
        self.queues = queues
        self.expires = expires
        self.cumulative = list(itertools.accumulate(max(p, 1e-9) for _, p in queues))

    def draw(self, rng: random.Random) -> int:
        point = rng.random() * self.cumulative[-1]
        return self.queues[min(bisect.bisect_right(self.cumulative, point), len(self.queues) - 1)][0]


#: Pilots of one CE queue all describe the same slot, so the eligibility query (which reads every task queue) is
#: shared between their match requests for a moment. A queue created meanwhile is seen at most this late.
ELIGIBLE_TTL = 2.0
#: "Nothing fits this slot" is remembered for less long: idle pilots long-poll, and a job queued by another API
#: worker must reach them quickly (this process's own submissions invalidate the cache at once).
NOTHING_TTL = 0.5
_eligible_cache: dict[tuple, _Eligible] = {}
_cache_lock = threading.Lock()


def _signature(engine: Engine, slot: Slot) -> tuple:
    return (
        str(engine.url),
        slot.site,
        slot.grid_ce,
        tuple(sorted(slot.platforms)),
        tuple(sorted(slot.tags)),
        slot.processors,
        slot.max_ram,
        slot.cpu_time,
        tuple(sorted(slot.owner_groups)),
    )


def forget_eligible(engine: Engine | None = None) -> None:
    """Drop cached eligibility (tests, and this process after it created a task queue)."""
    with _cache_lock:
        if engine is None:
            _eligible_cache.clear()
        else:
            for key in [k for k in _eligible_cache if k[0] == str(engine.url)]:
                del _eligible_cache[key]


def _eligible(engine: Engine, slot: Slot, *, refresh: bool = False) -> _Eligible | None:
    key = _signature(engine, slot)
    now = time.monotonic()
    entry = None if refresh else _eligible_cache.get(key)
    if entry is None or entry.expires < now or entry.generation != taskqueues.changes.value:
        generation = taskqueues.changes.value  # read before the query: a change during it forces a re-read
        queues = eligible_queues(engine, slot)
        entry = _Eligible(queues, now + (ELIGIBLE_TTL if queues else NOTHING_TTL), generation)
        with _cache_lock:
            _eligible_cache[key] = entry
    return entry if entry.queues else None


def match(engine: Engine, slot: Slot, *, pilot_id: int | None = None, rng: random.Random | None = None) -> int | None:
    """Hand one waiting job to this slot and return its id, or None when nothing fits."""
    matched = match_job(engine, slot, pilot_id=pilot_id, rng=rng)
    return None if matched is None else matched.JobID


@dataclasses.dataclass
class Matched:
    """The job handed to a pilot, with what the pilot needs to run it (read in the matching transaction)."""

    JobID: int
    Owner: str
    OwnerGroup: str
    VO: str
    RescheduleCounter: int
    JDL: str


@retrying
def match_job(
    engine: Engine, slot: Slot, *, pilot_id: int | None = None, rng: random.Random | None = None
) -> Matched | None:
    rng = rng or random.Random()
    entry = _eligible(engine, slot)
    tried: set[int] = set()
    for attempt in range(MAX_QUEUES_TRIED):
        if entry is None:
            return None
        tq_id = entry.draw(rng)
        if tq_id in tried:
            # Several draws hit emptied queues: read the queues afresh and walk them in weighted order.
            entry = _eligible(engine, slot, refresh=True)
            if entry is None:
                return None
            for tq_id in weighted_order(entry.queues, rng)[: MAX_QUEUES_TRIED - attempt]:
                matched = _take_from_queue(engine, tq_id, slot, pilot_id)
                if matched is not None:
                    return matched
            return None
        tried.add(tq_id)
        matched = _take_from_queue(engine, tq_id, slot, pilot_id)
        if matched is not None:
            return matched
    return None


_PICK = (
    select(TQJobs.JobId)
    .where(TQJobs.TQId == bindparam("tq"))
    .order_by(TQJobs.Priority.desc(), TQJobs.JobId.asc())
    .limit(1)
)
_UNQUEUE = delete(TQJobs).where(TQJobs.TQId == bindparam("tq"), TQJobs.JobId == bindparam("job"))
_TAKE = (
    update(Jobs)
    .where(Jobs.JobID == bindparam("job"), Jobs.Status == states.WAITING)
    .values(Status=states.MATCHED, MinorStatus="Assigned", Site=bindparam("site"), LastUpdateTime=bindparam("now"))
)
_JOB_INFO = (
    select(Jobs.JobID, Jobs.Owner, Jobs.OwnerGroup, Jobs.VO, Jobs.RescheduleCounter, JobJDLs.JDL)
    .join(JobJDLs, JobJDLs.JobID == Jobs.JobID)
    .where(Jobs.JobID == bindparam("job"))
)
# A rescheduled job may come back to the pilot that ran it before: replace that pilot's row, don't duplicate it.
_UNMAP = delete(JobToPilotMapping).where(
    JobToPilotMapping.PilotID == bindparam("pilot"), JobToPilotMapping.JobID == bindparam("job")
)
_MAP = insert(JobToPilotMapping).values(PilotID=bindparam("pilot"), JobID=bindparam("job"), StartTime=bindparam("now"))
_PILOT_BUSY = (
    update(PilotAgents)
    .where(PilotAgents.PilotID == bindparam("pilot"))
    .values(
        CurrentJobID=bindparam("job"),
        InitialJobID=case((PilotAgents.InitialJobID == 0, bindparam("job")), else_=PilotAgents.InitialJobID),
        MatchedJobs=PilotAgents.MatchedJobs + 1,
        LastUpdateTime=bindparam("now"),
        Status=states.PILOT_RUNNING,
    )
)


def _take_from_queue(engine: Engine, tq_id: int, slot: Slot, pilot_id: int | None) -> Matched | None:
    pick = _PICK
    if supports_skip_locked(engine):
        pick = pick.with_for_update(skip_locked=True)
    elif not is_sqlite(engine):
        pick = pick.with_for_update()
    while True:
        with write_transaction(engine) as conn:
            job_id = conn.execute(pick, {"tq": tq_id}).scalar()
            if job_id is None:
                return None
            conn.execute(_UNQUEUE, {"tq": tq_id, "job": job_id})
            now = utcnow()
            if conn.execute(_TAKE, {"job": job_id, "site": slot.site or "Unknown", "now": now}).rowcount != 1:
                # A stale queue entry (the job was killed or rescheduled meanwhile): dropped, try the next one.
                log.warning("job %s was in task queue %s but not Waiting; entry removed", job_id, tq_id)
                continue
            jobs_mod.add_logging(
                conn, [(job_id, states.MATCHED, "Assigned", "", now, f"Matcher ({slot.pilot_stamp or 'pilot'})")]
            )
            if pilot_id is not None:
                conn.execute(_UNMAP, {"pilot": pilot_id, "job": job_id})
                conn.execute(_MAP, {"pilot": pilot_id, "job": job_id, "now": now})
                conn.execute(_PILOT_BUSY, {"pilot": pilot_id, "job": job_id, "now": now})
            return Matched(*conn.execute(_JOB_INFO, {"job": job_id}).one())


def offer(key: bytes, token_lifetime: float, row: Any, pilot_stamp: str) -> dict[str, Any]:
    """What a pilot gets for a matched job: its JDL (text and parsed) and a token for that job and attempt only."""
    token = create_token(
        key,
        role="job",
        owner=row.Owner,
        group=row.OwnerGroup,
        vo=row.VO,
        lifetime=token_lifetime,
        job_id=row.JobID,
        run=row.RescheduleCounter,
        pilot_stamp=pilot_stamp or None,
    )
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "JobID": row.JobID,
        "JDL": row.JDL,
        "Job": jdl.to_jsonable(jdl.parse(row.JDL)),
        "Token": token,
        "TokenExpires": format_time(now + dt.timedelta(seconds=token_lifetime)),
        "ServerTime": format_time(now),
    }
