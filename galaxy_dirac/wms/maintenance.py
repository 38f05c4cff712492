"""Periodic maintenance (DIRAC's StalledJobAgent, JobCleaningAgent, pilot status agents in one loop).

Each step is a function of (engine, settings, now) so tests can call them directly with a fake clock; the loop only
runs them on an interval, in the one process (of every API worker on every host) that holds the ``maintenance``
lease in the database (:class:`Lease`). Two at once would still be safe: every step works in its own write
transaction with guarded updates.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from .. import states
from . import jobs, taskqueues
from .config import Settings
from .db import (
    Jobs,
    JobToPilotMapping,
    Leases,
    PilotAgents,
    SandBoxes,
    SBEntityMapping,
    retrying,
    utcnow,
    write_transaction,
)

log = logging.getLogger(__name__)


def mark_stalled(engine: Engine, settings: Settings, now: dt.datetime | None = None) -> list[int]:
    """Running jobs silent for ``stalled_after`` seconds become Stalled; Completing jobs (no heartbeats while the
    wrapper uploads outputs) after ``completing_timeout`` seconds."""
    now = now or utcnow()
    cutoffs = {
        states.RUNNING: now - dt.timedelta(seconds=settings.stalled_after),
        states.COMPLETING: now - dt.timedelta(seconds=settings.completing_timeout),
    }
    done = []
    with write_transaction(engine) as conn:
        rows = jobs.jobs_in_states(conn, list(cutoffs), max(cutoffs.values()), Jobs.HeartBeatTime)
        records = []
        for row in rows:
            last = max(t for t in (row.HeartBeatTime, row.LastUpdateTime) if t is not None)
            if last >= cutoffs[row.Status]:
                continue
            if _move(conn, row, states.STALLED, "Job stalled: pilot not running", now, records):
                done.append(row.JobID)
        jobs.add_logging(conn, records)
    return done


def _move(conn: Any, row: Any, status: str, minor: str, now: dt.datetime, records: list, **values: Any) -> bool:
    """Move a job on from the status it was read in, unless something else moved it meanwhile; log the change."""
    changed = conn.execute(
        update(Jobs)
        .where(Jobs.JobID == row.JobID, Jobs.Status == row.Status)
        .values(Status=status, MinorStatus=minor, LastUpdateTime=now, **values)
    ).rowcount
    if changed:
        records.append((row.JobID, status, minor, None, now, "StalledJobAgent"))
    return bool(changed)


def handle_stalled(engine: Engine, settings: Settings, now: dt.datetime | None = None) -> list[int]:
    """Stalled jobs silent for ``failed_after`` more seconds are rescheduled (or failed, if so configured)."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.failed_after)
    done = []
    with write_transaction(engine) as conn:
        rows = jobs.jobs_in_states(conn, [states.STALLED], cutoff, Jobs.HeartBeatTime)
        records: list[Any] = []
        for row in rows:
            if row.LastUpdateTime and row.LastUpdateTime >= cutoff:
                continue
            if settings.reschedule_stalled:
                jobs.reschedule_in(conn, row, settings, records, "StalledJobAgent")
            else:
                minor = f"Stalling for more than {int(settings.failed_after)} sec"
                _move(conn, row, states.FAILED, minor, now, records, EndExecTime=now)
            done.append(row.JobID)
        jobs.add_logging(conn, records)
    if done:
        taskqueues.changes.bump()
    return done


def reschedule_stuck_matched(engine: Engine, settings: Settings, now: dt.datetime | None = None) -> list[int]:
    """Matched jobs that never started within ``matched_timeout``: their pilot died before running them."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.matched_timeout)
    done = []
    with write_transaction(engine) as conn:
        rows = jobs.jobs_in_states(conn, [states.MATCHED], cutoff, Jobs.LastUpdateTime)
        records: list[Any] = []
        for row in rows:
            jobs.reschedule_in(conn, row, settings, records, "StalledJobAgent (matched too long)")
            done.append(row.JobID)
        jobs.add_logging(conn, records)
    if done:
        taskqueues.changes.bump()
    return done


def age_pilots(engine: Engine, settings: Settings, now: dt.datetime | None = None) -> int:
    """Pilots without news become Unknown, and Unknown for as long again become Aborted.

    A pilot sends no news of its own while it runs a job (the job's heartbeats are its news): a pilot whose current
    job heartbeated since the cut-off is alive, however long the job runs.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.pilot_unknown_after)
    busy = select(Jobs.JobID).where(Jobs.JobID == PilotAgents.CurrentJobID, Jobs.HeartBeatTime >= cutoff).exists()
    with write_transaction(engine) as conn:
        aborted = conn.execute(
            update(PilotAgents)
            .where(PilotAgents.Status == states.PILOT_UNKNOWN, PilotAgents.LastUpdateTime < cutoff, ~busy)
            .values(Status=states.PILOT_ABORTED, StatusReason="Unknown for too long", LastUpdateTime=now)
        ).rowcount
        unknown = conn.execute(
            update(PilotAgents)
            .where(
                PilotAgents.Status.in_(list(states.PILOT_TRANSIENT_STATES)), PilotAgents.LastUpdateTime < cutoff, ~busy
            )
            .values(Status=states.PILOT_UNKNOWN, StatusReason="No news from the pilot", LastUpdateTime=now)
        ).rowcount
    return aborted + unknown


def clean_final_jobs(
    engine: Engine,
    settings: Settings,
    now: dt.datetime | None = None,
    delete_sandbox: Callable[[str], None] | None = None,
) -> int:
    """Remove final jobs older than the retention period, and sandboxes no job uses any more."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.retention_days)
    with write_transaction(engine) as conn:
        old = list(
            conn.execute(
                select(Jobs.JobID)
                .where(Jobs.Status.in_(list(states.FINAL_STATES)), Jobs.LastUpdateTime < cutoff)
                .limit(10000)
            ).scalars()
        )
        if old:
            conn.execute(delete(SBEntityMapping).where(SBEntityMapping.EntityId.in_([f"Job:{j}" for j in old])))
            conn.execute(delete(JobToPilotMapping).where(JobToPilotMapping.JobID.in_(old)))
            taskqueues.remove_jobs(conn, old)
            from .db import HeartBeatLoggingInfo, JobCommands, JobJDLs, JobParameters, LoggingInfo

            for table in (HeartBeatLoggingInfo, JobCommands, JobJDLs, JobParameters, LoggingInfo):
                conn.execute(delete(table).where(table.JobID.in_(old)))
            conn.execute(delete(Jobs).where(Jobs.JobID.in_(old)))
        mapped = select(SBEntityMapping.SBId).where(SBEntityMapping.SBId == SandBoxes.SBId).exists()
        unused = conn.execute(
            select(SandBoxes.SBId, SandBoxes.SEPFN).where(~mapped, SandBoxes.LastAccessTime < cutoff)
        ).all()
        if unused:
            conn.execute(delete(SandBoxes).where(SandBoxes.SBId.in_([u[0] for u in unused])))
    if delete_sandbox:
        for _, pfn in unused:
            delete_sandbox(pfn)
    return len(old)


def run_once(engine: Engine, settings: Settings, delete_sandbox: Callable[[str], None] | None = None) -> dict:
    """One maintenance pass; each step's failure is logged and does not stop the others."""
    report: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {
        "stalled": lambda: mark_stalled(engine, settings),
        "stalled_handled": lambda: handle_stalled(engine, settings),
        "matched_rescheduled": lambda: reschedule_stuck_matched(engine, settings),
        "pilots_aged": lambda: age_pilots(engine, settings),
        "jobs_cleaned": lambda: clean_final_jobs(engine, settings, delete_sandbox=delete_sandbox),
        "queues_deleted": lambda: _tq_housekeeping(engine, settings),
    }
    for name, step in steps.items():
        try:
            report[name] = step()
        except Exception:  # noqa: BLE001 - one failing step must not stop the loop
            log.exception("maintenance step %s failed", name)
    return report


def _tq_housekeeping(engine: Engine, settings: Settings) -> int:
    with write_transaction(engine) as conn:
        deleted = taskqueues.delete_empty(conn)
        taskqueues.recalculate_priorities(conn, settings.group_shares)
        taskqueues.prune_events(conn)
    return deleted


#: A leader whose lease has not moved for this many maintenance intervals is presumed dead and replaced.
LEASE_INTERVALS = 3
#: The lease's name in ``gd_Leases``.
MAINTENANCE_LEASE = "maintenance"


def holder_id() -> str:
    """Names this process in a lease: host and PID for operators, and a random part so that a process reusing a
    dead one's PID is a new holder (at most 255 characters, the column's width)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    """One named lease in ``gd_Leases``, contended for by every process (API worker, any host) that may run the
    loop it guards.

    :meth:`hold` takes or renews it in one write transaction of guarded statements (an UPDATE that matches only the
    row as it was read, an INSERT that the primary key refuses to a second creator), so exactly one contender holds
    it. Every write bumps ``Renewals``. A lease is free when given up (empty holder) or once this contender has seen
    it unchanged for ``duration`` seconds of its own monotonic clock: no two hosts' clocks are ever compared.
    """

    def __init__(
        self,
        engine: Engine,
        name: str,
        duration: float,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine, self.name, self.duration, self.clock = engine, name, duration, clock
        self.holder = holder or holder_id()
        self.held = False
        self.leader = ""  # the holder last seen, for logging changes
        self._seen: tuple[str, int] | None = None
        self._seen_at = 0.0

    def hold(self) -> bool:
        """Take or renew the lease; True while this process holds it."""
        try:
            leader = self._contend()
        except IntegrityError:  # another contender created the row in the meantime
            leader = self.leader
        held = leader == self.holder
        if held and not self.held:
            log.info("%s lease taken by this process (%s) from %s", self.name, self.holder, self.leader or "nobody")
        elif self.held and not held:
            log.info("%s lease lost by this process (%s) to %s", self.name, self.holder, leader or "nobody")
        elif not held and leader != self.leader and leader:
            log.info("%s lease held by %s; this process (%s) stands by", self.name, leader, self.holder)
        self.held, self.leader = held, leader
        return held

    @retrying
    def _contend(self) -> str:
        """One try at the lease: the holder after it."""
        now, wall = self.clock(), utcnow()
        this = Leases.Name == self.name
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(Leases.Holder, Leases.Renewals).where(this)).first()
            if row is None:
                conn.execute(
                    insert(Leases).values(
                        Name=self.name, Holder=self.holder, Renewals=0, AcquiredTime=wall, RenewedTime=wall
                    )
                )
                return self.holder
            if row.Holder == self.holder:
                renewed = conn.execute(
                    update(Leases)
                    .where(this, Leases.Holder == self.holder)
                    .values(Renewals=Leases.Renewals + 1, RenewedTime=wall)
                ).rowcount
                return self.holder if renewed else ""
            state = (row.Holder, row.Renewals)
            if state != self._seen:
                self._seen, self._seen_at = state, now
            if row.Holder and now - self._seen_at < self.duration:
                return str(row.Holder)
            taken = conn.execute(
                update(Leases)
                .where(this, Leases.Holder == row.Holder, Leases.Renewals == row.Renewals)
                .values(Holder=self.holder, Renewals=row.Renewals + 1, AcquiredTime=wall, RenewedTime=wall)
            ).rowcount
            return self.holder if taken else str(row.Holder)

    def release(self) -> None:
        """Give the lease up (a clean shutdown), so that another contender takes it at its next try rather than
        after ``duration``."""
        if not self.held:
            return
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(Leases)
                .where(Leases.Name == self.name, Leases.Holder == self.holder)
                .values(Holder="", Renewals=Leases.Renewals + 1, RenewedTime=utcnow())
            )
        self.held, self.leader = False, ""
        log.info("%s lease given up by this process (%s)", self.name, self.holder)


class MaintenanceThread(threading.Thread):
    """Contends for the maintenance lease every ``settings.maintenance_interval`` seconds and runs ``run_once``
    while it holds it.

    Every API worker of every host on the database runs one; one of them does the work, and when it dies another
    takes over within ``LEASE_INTERVALS`` intervals, without a restart. A leader slower than that (a pass longer
    than the lease) may overlap its successor for a pass: harmless, since every step is a guarded update.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        delete_sandbox: Callable[[str], None] | None = None,
        lease: Lease | None = None,
    ):
        super().__init__(name="wms-maintenance", daemon=True)
        self.engine, self.settings, self.delete_sandbox = engine, settings, delete_sandbox
        self.lease = lease or Lease(engine, MAINTENANCE_LEASE, LEASE_INTERVALS * settings.maintenance_interval)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self._hold()  # at once: a free lease is taken at start, and the leader is known from the first second
            while not self.stopping.wait(self.settings.maintenance_interval):
                if self._hold():
                    report = run_once(self.engine, self.settings, self.delete_sandbox)
                    if any(v for v in report.values()):
                        log.info("maintenance: %s", {k: v for k, v in report.items() if v})
        finally:
            try:
                self.lease.release()
            except Exception:  # noqa: BLE001 - the lease then expires instead
                log.warning("could not give up the %s lease", self.lease.name, exc_info=True)

    def _hold(self) -> bool:
        try:
            return self.lease.hold()
        except Exception:  # noqa: BLE001 - a database outage must not end the loop
            log.warning("could not renew or take the %s lease", self.lease.name, exc_info=True)
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, waiting a moment for the lease to be given up (a pass in progress is not waited for longer)."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)


def leader(
    engine: Engine, settings: Settings, delete_sandbox: Callable[[str], None] | None = None
) -> MaintenanceThread | None:
    """The maintenance thread of this process, contending for the lease with every other one (None: maintenance
    is off, ``maintenance_interval`` <= 0)."""
    if settings.maintenance_interval <= 0:
        return None
    return MaintenanceThread(engine, settings, delete_sandbox)
