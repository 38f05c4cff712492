"""Periodic maintenance (DIRAC's StalledJobAgent, JobCleaningAgent, pilot status agents in one loop).

Each step is a function of (engine, settings, now) so tests can call them directly with a fake clock; the loop only
runs them on an interval. Running several API workers is safe: every step works in its own write transaction with
guarded updates.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any, Callable

from sqlalchemy import Engine, delete, select, update

from .. import states
from . import jobs, taskqueues
from .config import Settings
from .db import (
    Jobs,
    JobToPilotMapping,
    PilotAgents,
    SandBoxes,
    SBEntityMapping,
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
    return deleted


class MaintenanceThread(threading.Thread):
    """Runs ``run_once`` every ``settings.maintenance_interval`` seconds until stopped."""

    def __init__(self, engine: Engine, settings: Settings, delete_sandbox: Callable[[str], None] | None = None):
        super().__init__(name="wms-maintenance", daemon=True)
        self.engine, self.settings, self.delete_sandbox = engine, settings, delete_sandbox
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.maintenance_interval):
            report = run_once(self.engine, self.settings, self.delete_sandbox)
            if any(v for v in report.values()):
                log.info("maintenance: %s", {k: v for k, v in report.items() if v})

    def stop(self) -> None:
        self.stopping.set()
