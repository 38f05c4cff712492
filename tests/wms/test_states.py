"""Every (from, to) pair of DIRAC's job state table, applied through the scheduler's status update path."""

from __future__ import annotations

import itertools

import pytest

from galaxy_dirac import states
from galaxy_dirac.wms import jobs
from galaxy_dirac.wms.db import LoggingInfo, read_transaction

from .helpers import ADMIN, at, job_token, make_db, make_settings, row, submit

#: DIRAC's JobsStateMachine, written out independently of galaxy_dirac.states as the reference for these tests.
DIRAC_TABLE = {
    "Submitting": {"Received", "Checking", "Deleted"},
    "Received": {"Checking", "Waiting", "Failed", "Deleted"},
    "Checking": {"Staging", "Waiting", "Rescheduled", "Failed", "Deleted"},
    "Staging": {"Waiting", "Failed", "Killed"},
    "Waiting": {"Matched", "Rescheduled", "Deleted"},
    "Matched": {"Running", "Failed", "Rescheduled", "Killed"},
    "Rescheduled": {"Waiting", "Received", "Deleted", "Failed"},
    "Running": {"Stalled", "Done", "Failed", "Rescheduled", "Completing", "Killed", "Received"},
    "Stalled": {"Running", "Failed", "Killed"},
    "Completing": {"Done", "Failed", "Completed", "Stalled", "Killed"},
    "Completed": {"Done", "Failed"},
    "Done": {"Deleted"},
    "Failed": {"Rescheduled", "Deleted"},
    "Killed": {"Deleted"},
    "Deleted": set(),
}

PAIRS = [(a, b) for a, b in itertools.product(states.JOB_STATES, repeat=2) if a != b]


def test_table_is_diracs() -> None:
    assert set(states.JOB_STATES) == set(DIRAC_TABLE)
    for current, allowed in DIRAC_TABLE.items():
        for new in states.JOB_STATES:
            assert states.is_allowed(current, new) == (new in allowed or new == current), (current, new)


def test_every_transition_through_status_updates(tmp_path) -> None:
    """Put one job in each source state (forced, as an admin may), then let its wrapper try each target state."""
    url = f"sqlite:///{tmp_path / 'wms.sqlite'}"
    engine, settings = make_db(url), make_settings(tmp_path, url)
    ids = submit(engine, settings, n=len(PAIRS))
    forced = {
        job_id: {at(0): {"Status": a, "MinorStatus": f"forced to {a}", "Source": "test"}}
        for job_id, (a, _) in zip(ids, PAIRS)
    }
    assert not jobs.set_statuses(engine, forced, ADMIN, force=True)["failed"]
    for job_id, (current, new) in zip(ids, PAIRS):
        before = row(engine, job_id)
        result = jobs.set_statuses(
            engine,
            {job_id: {at(10): {"Status": new, "MinorStatus": "tried", "Source": "JobWrapper"}}},
            job_token(job_id),
        )
        after = row(engine, job_id)
        if new in DIRAC_TABLE[current]:
            assert job_id in result["success"], (current, new, result)
            assert (after.Status, after.MinorStatus) == (new, "tried")
        else:
            assert job_id in result["failed"], (current, new, result)
            assert "not allowed" in result["failed"][job_id]["detail"]
            # No change at all: status, minor status and times stay.
            for column in (
                "Status",
                "MinorStatus",
                "ApplicationStatus",
                "LastUpdateTime",
                "StartExecTime",
                "EndExecTime",
            ):
                assert getattr(after, column) == getattr(before, column), (current, new, column)
            with read_transaction(engine) as conn:
                last = conn.execute(
                    LoggingInfo.__table__.select()
                    .where(LoggingInfo.JobID == job_id)
                    .order_by(LoggingInfo.SeqNum.desc())
                    .limit(1)
                ).one()
            assert last.Status == new
            assert last.StatusSource.startswith("JobWrapper (rejected:")


@pytest.mark.parametrize("status", sorted(states.FINAL_STATES - {states.DELETED}))
def test_final_states_accept_no_payload_updates(status: str) -> None:
    for new in (states.RUNNING, states.COMPLETING, states.MATCHED, states.WAITING):
        assert not states.is_allowed(status, new)
