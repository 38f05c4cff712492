"""The outbox keeps job results on disk until the scheduler has them, and delivers them once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat

from galaxy_dirac.pilot.http import Backoff
from galaxy_dirac.pilot.outbox import FAILED_OUTPUT_SANDBOX, Outbox


def make_outbox(directory) -> Outbox:
    return Outbox(str(directory), backoff=Backoff(base=0.05, cap=0.1))


def write_archive(outbox: Outbox, job_id: int, content: bytes = b"archive bytes") -> str:
    path = outbox.archive_path(job_id)
    with open(path, "wb") as stream:
        stream.write(content)
    return path


def test_updates_and_sandbox_are_delivered_in_order(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    outbox = make_outbox(tmp_path / "outbox")
    outbox.open_job(7, fake_scheduler.url, "job-token")
    outbox.status(7, "Running", "Application")
    outbox.status(7, "Completing", "Uploading Output Sandbox")
    archive = write_archive(outbox, 7)
    outbox.output_sandbox(7, archive, "ab" * 32, 13)
    outbox.status(7, "Done", "Execution Complete", "Exit code 0")
    assert outbox.flush()
    assert [(s["Status"], s["MinorStatus"]) for s in app.statuses] == [
        ("Running", "Application"),
        ("Completing", "Uploading Output Sandbox"),
        ("Done", "Execution Complete"),
    ]
    assert all(s["Source"] == "JobWrapper" for s in app.statuses)
    times = [s["time"] for s in app.statuses]
    assert times == sorted(times) and len(set(times)) == 3
    assert app.sandboxes["ab" * 32] == b"archive bytes"
    assert app.output_pfns[7].endswith("sha256:" + "ab" * 32 + ".tar.bz2")
    assert not os.path.exists(archive)
    assert not os.listdir(tmp_path / "outbox")
    auth = {r.headers.get("authorization") for r in fake_scheduler.requests if r.path.startswith("/api/")}
    assert auth == {"Bearer job-token"}


def test_undelivered_results_survive_the_pilot_and_are_delivered_once(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.down = True
    first = make_outbox(tmp_path / "outbox")
    first.open_job(8, fake_scheduler.url, "t8")
    first.status(8, "Completing", "Application Finished Successfully")
    write_archive(first, 8)
    first.output_sandbox(8, first.archive_path(8), "cd" * 32, 13)
    first.status(8, "Done", "Execution Complete")
    assert not first.flush()
    record = tmp_path / "outbox" / "job-8.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert len(json.loads(record.read_text())["steps"]) == 3
    assert app.statuses == []

    app.down = False
    second = make_outbox(tmp_path / "outbox")  # the next pilot in the same directory
    assert second.pending() == [8]
    assert second.flush()
    assert [s["Status"] for s in app.statuses] == ["Completing", "Done"]
    assert app.output_pfns[8].endswith("cd" * 32 + ".tar.bz2")
    assert not record.exists()
    assert make_outbox(tmp_path / "outbox").pending() == []


def test_unreachable_scheduler_keeps_updates(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    outbox = make_outbox(tmp_path / "outbox")
    outbox.open_job(9, dead, "t")
    outbox.status(9, "Done", "Execution Complete")
    assert not outbox.flush()
    assert outbox.pending() == [9]
    assert (tmp_path / "outbox" / "job-9.json").exists()


def test_resending_after_a_crash_repeats_the_identical_update(fake_scheduler, tmp_path):
    """A crash after sending but before forgetting resends the same (time, fields): the scheduler ignores it."""
    app = fake_scheduler.app_state
    outbox = make_outbox(tmp_path / "outbox")
    outbox.open_job(10, fake_scheduler.url, "t")
    outbox.status(10, "Done", "Execution Complete")
    saved = tmp_path / "saved.json"
    shutil.copy(tmp_path / "outbox" / "job-10.json", saved)
    assert outbox.flush()
    shutil.copy(saved, tmp_path / "outbox" / "job-10.json")
    assert make_outbox(tmp_path / "outbox").flush()
    assert len(app.statuses) == 2
    assert app.statuses[0] == app.statuses[1]


def test_refused_sandbox_turns_done_into_failed(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.refuse_sandbox = True
    outbox = make_outbox(tmp_path / "outbox")
    outbox.open_job(11, fake_scheduler.url, "t")
    outbox.output_sandbox(11, write_archive(outbox, 11), "ef" * 32, 13)
    outbox.status(11, "Done", "Execution Complete")
    assert outbox.flush()
    assert [(s["Status"], s["MinorStatus"]) for s in app.statuses] == [("Failed", FAILED_OUTPUT_SANDBOX)]
    assert "sandbox too large" in app.statuses[0]["ApplicationStatus"]
    assert (tmp_path / "outbox" / "rejected" / "job-11.jsonl").exists()
    assert not os.path.exists(outbox.archive_path(11))


def test_background_delivery_through_an_outage(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.down = True
    outbox = make_outbox(tmp_path / "outbox")
    outbox.start()
    try:
        outbox.open_job(12, fake_scheduler.url, "t")
        outbox.status(12, "Running", "Application")
        outbox.status(12, "Done", "Execution Complete")
        outbox.close_job(12)
        assert not outbox.wait_idle(0.5)
        app.down = False
        assert outbox.wait_idle(10)
    finally:
        outbox.stop()
    assert [s["Status"] for s in app.statuses] == ["Running", "Done"]


def test_discard_forgets_a_handed_back_job(fake_scheduler, tmp_path):
    outbox = make_outbox(tmp_path / "outbox")
    outbox.open_job(13, fake_scheduler.url, "t")
    outbox.status(13, "Running", "Job Initialization")
    write_archive(outbox, 13)
    outbox.output_sandbox(13, outbox.archive_path(13), "00" * 32, 13)
    outbox.discard(13)
    assert outbox.pending() == []
    assert not os.listdir(tmp_path / "outbox")
    assert outbox.flush()
    assert fake_scheduler.app_state.statuses == []


def test_leftovers_of_an_earlier_run_are_not_sent_with_a_new_runs_token(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.down = True
    old = make_outbox(tmp_path / "outbox")
    old.open_job(14, fake_scheduler.url, "run-0-token")
    old.status(14, "Done", "Execution Complete")
    assert not old.flush()
    app.down = False
    seen = len(fake_scheduler.requests)
    new = make_outbox(tmp_path / "outbox")
    new.open_job(14, fake_scheduler.url, "run-1-token")
    new.status(14, "Running", "Job Initialization")
    assert new.flush()
    assert [(s["Status"], s["MinorStatus"]) for s in app.statuses] == [("Running", "Job Initialization")]
    assert {r.headers["authorization"] for r in fake_scheduler.requests[seen:]} == {"Bearer run-1-token"}
    assert "superseded" in (tmp_path / "outbox" / "rejected" / "job-14.jsonl").read_text()
