"""Job lifecycle on every database backend: submit, statuses in time order, kill, heartbeat, reschedule."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from galaxy_dirac.wms import jobs, matcher, taskqueues
from galaxy_dirac.wms.auth import AuthError
from galaxy_dirac.wms.db import JobJDLs, Jobs, LoggingInfo, TQJobs, read_transaction

from .helpers import ADMIN, ALICE, BOB, at, jdl_text, job_token, make_db, make_settings, row, submit


@pytest.fixture
def env(tmp_path, db_url):
    engine = make_db(db_url)
    yield engine, make_settings(tmp_path, db_url)
    engine.dispose()


def _history(engine, job_id):
    return [(h["Status"], h["MinorStatus"], h["Source"]) for h in jobs.history(engine, job_id)]


def _match(engine, site="LCG.Test.org", processors=1):
    return matcher.match(engine, matcher.Slot(site=site, processors=processors))


def test_submit_queues_at_once_with_owner_from_token(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings, JobName="wc", CPUTime=100, Tags=["gpu"])
    r = row(engine, job_id)
    assert (r.Status, r.MinorStatus, r.Owner, r.OwnerGroup, r.VO) == (
        "Waiting",
        "Pilot Agent Submission",
        "alice",
        "galaxy_user",
        "galaxy",
    )
    assert [h[0] for h in _history(engine, job_id)] == ["Received", "Checking", "Waiting"]
    with read_transaction(engine) as conn:
        assert conn.execute(select(TQJobs.JobId)).scalars().all() == [job_id]
        stored = conn.execute(select(JobJDLs.JDL).where(JobJDLs.JobID == job_id)).scalar_one()
    assert 'Owner = "alice"' in stored and f"JobID = {job_id}" in stored
    with read_transaction(engine) as conn:
        demand = taskqueues.demand(conn)
    assert demand[0]["CPUTime"] == 360 and demand[0]["Tags"] == ["gpu"] and demand[0]["WaitingJobs"] == 1


def test_owner_attributes_in_jdl_are_refused(env) -> None:
    engine, settings = env
    with pytest.raises(jobs.BadRequest, match="Owner"):
        jobs.submit(engine, ['[Executable = "x"; Owner = "mallory";]'], ALICE, settings)


def test_bad_jdl_in_a_batch_writes_nothing(env) -> None:
    engine, settings = env
    texts = [jdl_text(), jdl_text(), '[Executable = "x"; NumberOfProcessors = "many";]']
    with pytest.raises(jobs.BadRequest, match=r"JDL #2: .*NumberOfProcessors"):
        jobs.submit(engine, texts, ALICE, settings)
    with pytest.raises(jobs.BadRequest, match="parametric"):
        jobs.submit(engine, ['[Executable = "x"; Parameters = 10;]'], ALICE, settings)
    with read_transaction(engine) as conn:
        assert conn.execute(select(func.count()).select_from(Jobs)).scalar_one() == 0


def test_status_updates_apply_in_timestamp_order_and_repeat_safely(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    assert _match(engine) == job_id
    wrapper = job_token(job_id)
    updates = {
        at(3): {"Status": "Done", "MinorStatus": "Execution Complete", "Source": "JobWrapper"},
        at(1): {"Status": "Running", "MinorStatus": "Application", "Source": "JobWrapper"},
        at(2): {"Status": "Completing", "MinorStatus": "Uploading Output Sandbox", "Source": "JobWrapper"},
    }
    result = jobs.set_statuses(engine, {job_id: updates}, wrapper)
    assert result["success"][job_id]["Status"] == "Done"
    r = row(engine, job_id)
    assert (r.Status, r.MinorStatus) == ("Done", "Execution Complete")
    assert r.StartExecTime is not None and r.EndExecTime is not None
    assert [h[0] for h in _history(engine, job_id)][-3:] == ["Running", "Completing", "Done"]
    count = len(_history(engine, job_id))
    # The wrapper re-sends its final status after an outage: nothing changes, no error, no new record.
    again = jobs.set_statuses(engine, {job_id: {at(3): updates[at(3)]}}, wrapper)
    assert job_id in again["success"]
    assert len(_history(engine, job_id)) == count


def test_late_update_is_recorded_but_not_applied(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    wrapper = job_token(job_id)
    jobs.set_statuses(engine, {job_id: {at(10): {"Status": "Running", "MinorStatus": "Application"}}}, wrapper)
    jobs.set_statuses(engine, {job_id: {at(5): {"MinorStatus": "Downloading InputSandbox"}}}, wrapper)
    assert row(engine, job_id).MinorStatus == "Application"
    assert _history(engine, job_id)[-1][1] == "Downloading InputSandbox"


def test_node_clock_behind_server_is_tolerated(env) -> None:
    """The matcher stamps Matched with the server's clock; a wrapper whose clock lags must still get Running."""
    import datetime as dt

    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    lagging = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=20)
    result = jobs.set_statuses(
        engine,
        {job_id: {lagging: {"Status": "Running", "MinorStatus": "Job Initialization"}}},
        job_token(job_id),
        clock_skew=settings.clock_skew,
    )
    assert result["success"][job_id]["Status"] == "Running"


def test_kill_waiting_job_leaves_task_queue(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    result = jobs.set_statuses(engine, {job_id: {at(1): {"Status": "Killed", "Source": "runner"}}}, ALICE)
    assert result["success"][job_id]["Status"] == "Killed"
    assert row(engine, job_id).MinorStatus == "Killed by user"
    with read_transaction(engine) as conn:
        assert conn.execute(select(func.count()).select_from(TQJobs)).scalar_one() == 0
    assert _match(engine) is None


def test_kill_running_job_sends_one_kill_command(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    wrapper = job_token(job_id)
    jobs.set_statuses(engine, {job_id: {at(1): {"Status": "Running", "MinorStatus": "Application"}}}, wrapper)
    assert jobs.heartbeat(engine, {job_id: {"CPUConsumed": 1.0}}, wrapper) == []
    jobs.set_statuses(engine, {job_id: {at(2): {"Status": "Killed", "Source": "runner"}}}, ALICE)
    assert row(engine, job_id).MinorStatus == "Marked for termination"
    assert jobs.heartbeat(engine, {job_id: {"CPUConsumed": 2.0}}, wrapper) == [
        {"job_id": job_id, "command": "Kill", "arguments": ""}
    ]
    assert jobs.heartbeat(engine, {job_id: {"CPUConsumed": 3.0}}, wrapper) == []
    # Killing a final job changes nothing.
    result = jobs.set_statuses(engine, {job_id: {at(3): {"Status": "Killed"}}}, ALICE)
    assert job_id in result["success"] or "not allowed" in str(result["failed"])


def test_heartbeat_records_data_and_revives_stalled(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    wrapper = job_token(job_id)
    jobs.set_statuses(engine, {job_id: {at(1): {"Status": "Running"}}}, wrapper)
    jobs.set_statuses(engine, {job_id: {at(2): {"Status": "Stalled", "Source": "StalledJobAgent"}}}, ADMIN)
    jobs.heartbeat(
        engine,
        {job_id: {"CPUConsumed": 4.5, "MemoryUsed": 120.0, "WallClockTime": 9.0, "StandardOutput": "line 1\nline 2"}},
        wrapper,
    )
    r = row(engine, job_id)
    assert r.Status == "Running" and r.HeartBeatTime is not None
    assert jobs.parameters(engine, job_id)["StandardOutput"] == "line 1\nline 2"


def test_heartbeat_summary_keeps_latest_values_and_peak_memory(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    wrapper = job_token(job_id)
    for cpu, memory in ((1.0, 300.0), (2.5, 900.0), (4.0, 200.0)):
        jobs.heartbeat(engine, {job_id: {"CPUConsumed": cpu, "MemoryUsed": memory, "WallClockTime": cpu * 2}}, wrapper)
    summary = jobs.heartbeat_summary(engine, job_id)
    assert summary["CPUConsumed"] == 4.0 and summary["WallClockTime"] == 8.0
    assert summary["MemoryUsed"] == 200.0 and summary["MaxMemoryUsed"] == 900.0


def test_reschedule_counts_and_fails_past_the_maximum(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    for attempt in range(1, settings.max_rescheduling + 1):
        assert _match(engine) == job_id
        old_token = job_token(job_id, run=attempt - 1)
        result = jobs.reschedule(engine, [job_id], ALICE, settings)
        assert result["success"][job_id]["RescheduleCounter"] == attempt
        assert row(engine, job_id).Status == "Waiting"
        # The pilot that lost the job can no longer change it.
        with pytest.raises(AuthError, match="rescheduled"):
            jobs.set_statuses(engine, {job_id: {at(attempt): {"Status": "Done"}}}, old_token)
    assert _match(engine) == job_id
    result = jobs.reschedule(engine, [job_id], ALICE, settings)
    assert result["failed"][job_id]["detail"] == "Maximum of reschedulings reached"
    r = row(engine, job_id)
    assert (r.Status, r.MinorStatus) == ("Failed", "Maximum of reschedulings reached")
    assert _match(engine) is None


def test_runner_cannot_touch_other_owners_jobs(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    result = jobs.set_statuses(engine, {job_id: {at(1): {"Status": "Killed"}}}, BOB)
    assert "another owner" in result["failed"][job_id]["detail"]
    assert row(engine, job_id).Status == "Waiting"
    rows, total = jobs.search(engine, BOB)
    assert (rows, total) == ([], 0)
    with pytest.raises(AuthError):
        jobs.set_statuses(engine, {job_id: {at(1): {"Status": "Done"}}}, job_token(job_id + 1))


def test_search_operators_sort_and_summary(env) -> None:
    engine, settings = env
    ids = submit(engine, settings, n=5, JobGroup="g1") + submit(engine, settings, n=3, JobGroup="g2")
    jobs.set_statuses(engine, {ids[0]: {at(1): {"Status": "Killed"}}}, ALICE)
    rows, total = jobs.search(
        engine,
        ALICE,
        parameters=["JobID", "JobGroup"],
        search=[
            {"parameter": "JobGroup", "operator": "eq", "value": "g1"},
            {"parameter": "Status", "operator": "not in", "values": ["Killed"]},
        ],
        sort=[{"parameter": "JobID", "direction": "desc"}],
        per_page=2,
    )
    assert total == 4 and [r["JobID"] for r in rows] == [ids[4], ids[3]]
    rows, _ = jobs.search(
        engine,
        ALICE,
        parameters=["JobID"],
        search=[
            {"parameter": "JobID", "operator": "gt", "value": ids[5]},
            {"parameter": "JobGroup", "operator": "like", "value": "g%"},
        ],
    )
    assert [r["JobID"] for r in rows] == ids[6:]
    assert jobs.summary(engine, ALICE, ["JobGroup", "Status"]) == [
        {"JobGroup": "g1", "Status": "Killed", "count": 1},
        {"JobGroup": "g1", "Status": "Waiting", "count": 4},
        {"JobGroup": "g2", "Status": "Waiting", "count": 3},
    ]
    with pytest.raises(jobs.BadRequest, match="unknown job parameter"):
        jobs.search(engine, ALICE, parameters=["Password"])
    with pytest.raises(jobs.BadRequest, match="unknown search operator"):
        jobs.search(engine, ALICE, search=[{"parameter": "JobID", "operator": "matches", "value": "1"}])
    rows, _ = jobs.search(
        engine,
        ALICE,
        parameters=["JobID"],
        search=[{"parameter": "SubmissionTime", "operator": "gt", "value": "2000-01-01T00:00:00Z"}],
    )
    assert len(rows) == 8


def test_history_has_diracs_sources(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings)
    _match(engine)
    with read_transaction(engine) as conn:
        sources = (
            conn.execute(
                select(LoggingInfo.StatusSource).where(LoggingInfo.JobID == job_id).order_by(LoggingInfo.SeqNum)
            )
            .scalars()
            .all()
        )
    assert sources[:3] == ["JobManager", "JobSanity", "TaskQueue"] and sources[3].startswith("Matcher")
