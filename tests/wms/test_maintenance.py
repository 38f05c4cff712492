"""galaxy_dirac.wms.maintenance: DIRAC's StalledJobAgent, JobCleaningAgent and pilot aging, driven with a fake clock.

Every step takes ``now``; the tests build real jobs (submit, match, status updates with job tokens) and call the
steps with a ``now`` just before and just after each threshold, on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import Engine, func, select, update

from galaxy_dirac import states
from galaxy_dirac.wms import jobs, maintenance, matcher, pilots, sandbox_metadata
from galaxy_dirac.wms.auth import AuthError
from galaxy_dirac.wms.config import Settings
from galaxy_dirac.wms.db import (
    HeartBeatLoggingInfo,
    JobCommands,
    JobJDLs,
    JobParameters,
    Jobs,
    JobToPilotMapping,
    Leases,
    LoggingInfo,
    PilotAgents,
    SandBoxes,
    SBEntityMapping,
    TQJobs,
    read_transaction,
    utcnow,
    write_transaction,
)
from tests.conftest import wait_for
from tests.wms.helpers import ALICE, job_token, make_db, make_settings, row, submit

SITE = "SITE.maintenance.org"
STALLED_AFTER, FAILED_AFTER, MATCHED_TIMEOUT, PILOT_UNKNOWN_AFTER, COMPLETING_TIMEOUT = 60, 120, 90, 300, 600


@pytest.fixture
def wms(db_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Settings]]:
    settings = make_settings(
        tmp_path, db_url, stalled_after=STALLED_AFTER, failed_after=FAILED_AFTER, matched_timeout=MATCHED_TIMEOUT,
        pilot_unknown_after=PILOT_UNKNOWN_AFTER, completing_timeout=COMPLETING_TIMEOUT, max_rescheduling=2,
        retention_days=30,
    )
    engine = make_db(db_url)
    yield engine, settings
    engine.dispose()


def later(seconds: float) -> dt.datetime:
    """The fake clock: naive UTC, like every time the scheduler stores."""
    return utcnow() + dt.timedelta(seconds=seconds)


def match(engine: Engine, pilot_id: int | None = None) -> int:
    job_id = matcher.match(engine, matcher.Slot(site=SITE), pilot_id=pilot_id)
    assert job_id is not None
    return job_id


def token_for(engine: Engine, job_id: int) -> Any:
    return job_token(job_id, run=row(engine, job_id).RescheduleCounter)


def start(engine: Engine, job_id: int, when: dt.datetime | None = None) -> None:
    """What the job wrapper does once its pilot matched the job."""
    when = when or dt.datetime.now(dt.timezone.utc)
    result = jobs.set_statuses(
        engine, {job_id: {when: {"Status": "Running", "MinorStatus": "Application", "Source": "JobWrapper"}}},
        token_for(engine, job_id),
    )
    assert result["success"][job_id]["Status"] == states.RUNNING, result


def running_job(engine: Engine, settings: Settings, pilot_id: int | None = None) -> int:
    [job_id] = submit(engine, settings, Site=SITE)
    assert match(engine, pilot_id) == job_id
    start(engine, job_id)
    return job_id


def history(engine: Engine, job_id: int) -> list[tuple[str, str, str]]:
    return [(h["Status"], h["MinorStatus"], h["Source"]) for h in jobs.history(engine, job_id)]


def stall(engine: Engine, settings: Settings, job_id: int) -> dt.datetime:
    now = later(STALLED_AFTER + 10)
    assert maintenance.mark_stalled(engine, settings, now=now) == [job_id]
    return now


# --- stalled jobs ------------------------------------------------------------------------------------------------
def test_running_job_without_heartbeat_becomes_stalled(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    job_id = running_job(engine, settings)
    [waiting] = submit(engine, settings, Site="SITE.nowhere.org")

    assert maintenance.mark_stalled(engine, settings, now=later(STALLED_AFTER - 10)) == []
    assert row(engine, job_id).Status == states.RUNNING
    assert maintenance.mark_stalled(engine, settings, now=later(STALLED_AFTER + 10)) == [job_id]

    job = row(engine, job_id)
    assert (job.Status, job.MinorStatus) == (states.STALLED, "Job stalled: pilot not running")
    assert history(engine, job_id)[-1] == (states.STALLED, "Job stalled: pilot not running", "StalledJobAgent")
    assert row(engine, waiting).Status == states.WAITING  # never running, so never stalled
    assert maintenance.mark_stalled(engine, settings, now=later(STALLED_AFTER + 20)) == []  # once is enough


def test_completing_job_gets_completing_timeout_before_it_stalls(wms: tuple[Engine, Settings]) -> None:
    """The wrapper sends no heartbeats while it uploads outputs (Completing): that may take longer than a heartbeat
    gap, so Completing jobs have their own, longer, timeout."""
    engine, settings = wms
    job_id = running_job(engine, settings)
    result = jobs.set_statuses(
        engine, {job_id: {dt.datetime.now(dt.timezone.utc): {"Status": "Completing",
                                                              "MinorStatus": "Uploading Output Sandbox"}}},
        token_for(engine, job_id),
    )
    assert result["success"][job_id]["Status"] == states.COMPLETING
    assert maintenance.mark_stalled(engine, settings, now=later(STALLED_AFTER + 10)) == []
    assert maintenance.mark_stalled(engine, settings, now=later(COMPLETING_TIMEOUT - 10)) == []
    assert row(engine, job_id).Status == states.COMPLETING
    assert maintenance.mark_stalled(engine, settings, now=later(COMPLETING_TIMEOUT + 10)) == [job_id]
    assert row(engine, job_id).Status == states.STALLED


def test_stalled_job_is_rescheduled_after_failed_after(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    job_id = running_job(engine, settings)
    stalled_at = stall(engine, settings, job_id)
    old_token = token_for(engine, job_id)

    soon = stalled_at + dt.timedelta(seconds=FAILED_AFTER - 10)
    assert maintenance.handle_stalled(engine, settings, now=soon) == []
    assert row(engine, job_id).Status == states.STALLED
    assert maintenance.handle_stalled(engine, settings, now=stalled_at + dt.timedelta(seconds=FAILED_AFTER + 10)) == [
        job_id
    ]

    job = row(engine, job_id)
    assert (job.Status, job.MinorStatus, job.RescheduleCounter) == (states.WAITING, "Pilot Agent Submission", 1)
    assert job.HeartBeatTime is None and job.StartExecTime is None
    statuses = [h[0] for h in history(engine, job_id)]
    assert statuses[-5:] == [states.FAILED, states.RESCHEDULED, states.RECEIVED, states.CHECKING, states.WAITING]
    with pytest.raises(AuthError) as refused:  # the pilot that lost the job can no longer touch it
        jobs.heartbeat(engine, {job_id: {"CPUConsumed": 1.0}}, old_token)
    assert refused.value.status == 403
    assert match(engine) == job_id  # back in its task queue


def test_stalled_job_fails_when_rescheduling_is_off(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    settings.reschedule_stalled = False
    job_id = running_job(engine, settings)
    stalled_at = stall(engine, settings, job_id)
    assert maintenance.handle_stalled(engine, settings, now=stalled_at + dt.timedelta(seconds=FAILED_AFTER + 10)) == [
        job_id
    ]
    job = row(engine, job_id)
    assert (job.Status, job.MinorStatus) == (states.FAILED, f"Stalling for more than {FAILED_AFTER} sec")
    assert job.RescheduleCounter == 0 and job.EndExecTime is not None
    assert history(engine, job_id)[-1][::2] == (states.FAILED, "StalledJobAgent")
    assert matcher.match(engine, matcher.Slot(site=SITE)) is None


def test_rescheduling_stops_at_max_rescheduling(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms  # max_rescheduling = 2
    job_id = running_job(engine, settings)
    for attempt in (1, 2, 3):
        stalled_at = stall(engine, settings, job_id)
        done = maintenance.handle_stalled(engine, settings, now=stalled_at + dt.timedelta(seconds=FAILED_AFTER + 10))
        assert done == [job_id]
        job = row(engine, job_id)
        if attempt <= settings.max_rescheduling:
            assert (job.Status, job.RescheduleCounter) == (states.WAITING, attempt)
            assert match(engine) == job_id
            start(engine, job_id)
    assert (job.Status, job.MinorStatus) == (states.FAILED, "Maximum of reschedulings reached")
    assert job.RescheduleCounter == settings.max_rescheduling
    assert history(engine, job_id)[-1][:2] == (states.FAILED, "Maximum of reschedulings reached")
    assert matcher.match(engine, matcher.Slot(site=SITE)) is None  # not queued any more


def test_heartbeat_brings_a_stalled_job_back_to_running(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    job_id = running_job(engine, settings)
    stalled_at = stall(engine, settings, job_id)
    assert jobs.heartbeat(engine, {job_id: {"CPUConsumed": 12.0}}, token_for(engine, job_id)) == []
    job = row(engine, job_id)
    assert (job.Status, job.MinorStatus) == (states.RUNNING, "Job Heartbeat")
    assert history(engine, job_id)[-1][:2] == (states.RUNNING, "Job Heartbeat")
    assert maintenance.handle_stalled(engine, settings, now=stalled_at + dt.timedelta(seconds=FAILED_AFTER + 10)) == []
    assert row(engine, job_id).Status == states.RUNNING


def test_job_matched_for_too_long_is_rescheduled(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    [job_id] = submit(engine, settings, Site=SITE)
    assert match(engine) == job_id  # ... and the pilot dies before starting it
    running = running_job(engine, settings)

    assert maintenance.reschedule_stuck_matched(engine, settings, now=later(MATCHED_TIMEOUT - 10)) == []
    assert row(engine, job_id).Status == states.MATCHED
    assert maintenance.reschedule_stuck_matched(engine, settings, now=later(MATCHED_TIMEOUT + 10)) == [job_id]
    job = row(engine, job_id)
    assert (job.Status, job.RescheduleCounter) == (states.WAITING, 1)
    assert (states.RESCHEDULED, "Job Rescheduled", "StalledJobAgent (matched too long)") in history(engine, job_id)
    assert row(engine, running).Status == states.RUNNING  # only Matched jobs are concerned
    assert match(engine) == job_id


# --- pilots -------------------------------------------------------------------------------------------------------
def test_silent_pilots_become_unknown_then_aborted(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    ids = pilots.add_pilots(engine, ["submitted", "running", "finished"], queue="q", site=SITE, ce="ce1",
                            grid_type="Local", vo="galaxy")
    pilots.register(engine, "running", {"hostname": "wn1"}, "galaxy")
    pilots.set_status(engine, "finished", "Done", matched_jobs=0)

    def status(stamp: str) -> tuple[str, str]:
        with read_transaction(engine) as conn:
            pilot = conn.execute(select(PilotAgents).where(PilotAgents.PilotID == ids[stamp])).one()
        return pilot.Status, pilot.StatusReason

    assert maintenance.age_pilots(engine, settings, now=later(PILOT_UNKNOWN_AFTER - 10)) == 0
    first = later(PILOT_UNKNOWN_AFTER + 10)
    assert maintenance.age_pilots(engine, settings, now=first) == 2
    assert status("submitted") == status("running") == (states.PILOT_UNKNOWN, "No news from the pilot")
    assert status("finished")[0] == states.PILOT_DONE

    assert maintenance.age_pilots(engine, settings, now=first + dt.timedelta(seconds=PILOT_UNKNOWN_AFTER - 10)) == 0
    assert maintenance.age_pilots(engine, settings, now=first + dt.timedelta(seconds=PILOT_UNKNOWN_AFTER + 10)) == 2
    assert status("submitted") == status("running") == (states.PILOT_ABORTED, "Unknown for too long")
    assert status("finished")[0] == states.PILOT_DONE


def test_a_pilot_whose_job_heartbeats_is_not_aged(wms: tuple[Engine, Settings]) -> None:
    """Pilots report nothing themselves while their job runs; the job's heartbeats show the pilot is alive."""
    engine, settings = wms
    ids = pilots.add_pilots(engine, ["busy", "silent"], queue="q", site=SITE, ce="ce1", grid_type="Local", vo="galaxy")
    for stamp in ids:
        pilots.register(engine, stamp, {"hostname": f"{stamp}.example.org"}, "galaxy")
    job_id = running_job(engine, settings, pilot_id=ids["busy"])
    silent_job = running_job(engine, settings, pilot_id=ids["silent"])
    jobs.heartbeat(engine, {job_id: {"CPUConsumed": 1.0}}, token_for(engine, job_id))
    # Both pilots last reported long ago; only the busy one's job still heartbeats (now).
    long_ago = utcnow() - dt.timedelta(seconds=2 * PILOT_UNKNOWN_AFTER)
    with write_transaction(engine) as conn:
        conn.execute(update(PilotAgents).values(LastUpdateTime=long_ago))
        conn.execute(update(Jobs).where(Jobs.JobID == silent_job).values(HeartBeatTime=long_ago))

    assert maintenance.age_pilots(engine, settings, now=later(1)) == 1
    with read_transaction(engine) as conn:
        statuses = dict(conn.execute(select(PilotAgents.PilotStamp, PilotAgents.Status)).all())
    assert statuses == {"busy": states.PILOT_RUNNING, "silent": states.PILOT_UNKNOWN}


# --- retention ------------------------------------------------------------------------------------------------------
def _sandbox(engine: Engine, name: str) -> str:
    pfn = f"/S3/sandboxes/galaxy/galaxy_user/alice/sha256:{name * 64}.tar.bz2"
    sandbox_metadata.register(
        engine, {"role": "runner", "owner": "alice", "group": "galaxy_user", "vo": "galaxy"}, pfn, 100
    )
    return pfn


def _rows_of(engine: Engine, job_id: int) -> dict[str, int]:
    counts = {}
    with read_transaction(engine) as conn:
        for table in (Jobs, JobJDLs, LoggingInfo, JobParameters, HeartBeatLoggingInfo, JobCommands, JobToPilotMapping):
            counts[table.__tablename__] = conn.execute(
                select(func.count()).select_from(table).where(table.JobID == job_id)
            ).scalar_one()
        counts["tq_Jobs"] = conn.execute(
            select(func.count()).select_from(TQJobs).where(TQJobs.JobId == job_id)
        ).scalar_one()
        counts["sb_EntityMapping"] = conn.execute(
            select(func.count()).select_from(SBEntityMapping).where(SBEntityMapping.EntityId == f"Job:{job_id}")
        ).scalar_one()
    return counts


def test_retention_removes_old_final_jobs_from_every_table(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    old_pfn, recent_pfn = _sandbox(engine, "a"), _sandbox(engine, "b")
    [old] = submit(engine, settings, Site=SITE, InputSandbox=[f"SB:SandboxSE|{old_pfn}"])
    [recent] = submit(engine, settings, Site=SITE, InputSandbox=[f"SB:SandboxSE|{recent_pfn}"])
    [waiting] = submit(engine, settings, Site="SITE.nowhere.org")
    pilot_id = pilots.add_pilots(engine, ["p1"], queue="q", site=SITE, ce="ce", grid_type="Local", vo="galaxy")["p1"]
    for job_id in (old, recent):
        assert match(engine, pilot_id) == job_id
        start(engine, job_id)
        jobs.heartbeat(engine, {job_id: {"CPUConsumed": 3.0, "StandardOutput": "working\n"}}, token_for(engine, job_id))
    # The runner kills both; the recent job's kill carries a later time, as if it had been killed weeks later.
    kills = {old: dt.datetime.now(dt.timezone.utc), recent: dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=20)}
    for job_id, when in kills.items():
        result = jobs.set_statuses(engine, {job_id: {when: {"Status": "Killed"}}}, ALICE)
        assert result["success"][job_id]["Status"] == states.KILLED

    before = _rows_of(engine, old)
    assert all(before[t] > 0 for t in before if t != "tq_Jobs"), before  # the test really populated every table
    deleted_bytes: list[str] = []
    now = later(settings.retention_days * 86400 + 3600)  # 30 days and an hour from now
    assert maintenance.clean_final_jobs(engine, settings, now=now, delete_sandbox=deleted_bytes.append) == 1

    assert _rows_of(engine, old) == dict.fromkeys(before, 0)
    kept = _rows_of(engine, recent)
    assert kept["Jobs"] == kept["JobJDLs"] == kept["sb_EntityMapping"] == kept["JobToPilotMapping"] == 1
    assert kept["LoggingInfo"] > 0 and kept["JobParameters"] > 0 and kept["HeartBeatLoggingInfo"] > 0
    assert row(engine, waiting).Status == states.WAITING  # old but not final: kept, and still queued
    assert _rows_of(engine, waiting)["tq_Jobs"] == 1
    with read_transaction(engine) as conn:
        sandboxes = set(conn.execute(select(SandBoxes.SEPFN)).scalars())
    assert sandboxes == {recent_pfn} and deleted_bytes == [old_pfn]
    assert maintenance.clean_final_jobs(engine, settings, now=now) == 0


def test_run_once_runs_every_step(wms: tuple[Engine, Settings]) -> None:
    engine, settings = wms
    job_id = running_job(engine, settings)
    report = maintenance.run_once(engine, settings)
    assert set(report) == {
        "stalled", "stalled_handled", "matched_rescheduled", "pilots_aged", "jobs_cleaned", "queues_deleted",
    }
    assert report["stalled"] == [] and report["jobs_cleaned"] == 0  # nothing is old yet
    assert row(engine, job_id).Status == states.RUNNING


# --- the maintenance lease: one leader among every worker of every host --------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease_row(engine: Engine, name: str = "test") -> Any:
    with read_transaction(engine) as conn:
        return conn.execute(select(Leases).where(Leases.Name == name)).one()


def test_the_lease_passes_on_only_when_its_holder_stops_renewing(
    wms: tuple[Engine, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = wms
    clock = FakeClock()
    a, b = (maintenance.Lease(engine, "test", 30, holder=name, clock=clock) for name in ("host-a", "host-b"))
    caplog.set_level(logging.INFO, logger=maintenance.__name__)
    assert a.hold() and not b.hold()
    for _ in range(5):  # renewed every 20 s: b never sees the same lease for 30 s
        clock.now += 20
        assert a.hold() and not b.hold()
    assert (lease_row(engine).Holder, lease_row(engine).Renewals) == ("host-a", 5)
    clock.now += 29  # a died: b saw its last renewal 29 s ago
    assert not b.hold()
    clock.now += 1
    assert b.hold() and lease_row(engine).Holder == "host-b"
    assert not a.hold() and b.hold()  # a came back from a long pause: it has lost the lease
    assert [r.getMessage() for r in caplog.records] == [
        "test lease taken by this process (host-a) from nobody",
        "test lease held by host-a; this process (host-b) stands by",
        "test lease taken by this process (host-b) from host-a",
        "test lease lost by this process (host-a) to host-b",
    ]


def test_a_lease_given_up_is_taken_at_the_next_try(wms: tuple[Engine, Settings]) -> None:
    engine, _ = wms
    clock = FakeClock()
    a, b = (maintenance.Lease(engine, "test", 30, holder=name, clock=clock) for name in ("host-a", "host-b"))
    assert a.hold() and not b.hold()
    a.release()
    assert lease_row(engine).Holder == "" and not a.held
    assert b.hold() and not a.hold()


def test_contenders_starting_together_elect_one(wms: tuple[Engine, Settings]) -> None:
    """Eight workers contend for a lease nobody has created yet: the primary key lets one insert it."""
    engine, _ = wms
    contenders = [maintenance.Lease(engine, "test", 30) for _ in range(8)]
    barrier = threading.Barrier(len(contenders))

    def contend(lease: maintenance.Lease) -> bool:
        barrier.wait()
        return lease.hold()

    with ThreadPoolExecutor(len(contenders)) as pool:
        held = list(pool.map(contend, contenders))
    assert held.count(True) == 1
    assert lease_row(engine).Holder == contenders[held.index(True)].holder
    assert [lease.hold() for lease in contenders] == held


def test_maintenance_threads_run_passes_only_while_they_lead(
    wms: tuple[Engine, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers' threads: passes come from the leader only, and the other takes over once the leader stops."""
    engine, settings = wms
    settings.maintenance_interval = 0.05
    passes: list[str] = []

    def holder() -> str:
        return lease_row(engine, maintenance.MAINTENANCE_LEASE).Holder

    monkeypatch.setattr(maintenance, "run_once", lambda *_: passes.append(threading.current_thread().name) or {})
    threads = [maintenance.leader(engine, settings) for _ in range(2)]
    for index, thread in enumerate(threads):
        assert thread is not None
        thread.name = f"worker-{index}"
        thread.start()
    try:
        wait_for(lambda: len(passes) >= 5, 10, "maintenance passes")
        first = holder()
        leading = next(t for t in threads if t.lease.holder == first)
        other = next(t for t in threads if t is not leading)
        assert set(passes) == {leading.name}
        leading.stop()
        assert not leading.is_alive() and holder() in ("", other.lease.holder)
        wait_for(lambda: other.name in passes, 10, "the other worker's first pass")
        assert holder() == other.lease.holder
    finally:
        for thread in threads:
            thread.stop()
    assert holder() == ""
    settings.maintenance_interval = 0
    assert maintenance.leader(engine, settings) is None
