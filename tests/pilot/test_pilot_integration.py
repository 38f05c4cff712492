"""The real scheduler (``galaxy-dirac-wms serve``) and real pilot processes (the zipapp, ``python -I -S``) on loopback.

Each test starts pilots as separate processes against a scheduler subprocess on a free port. Tests sharing the
module's scheduler keep out of each other's way by giving their jobs and pilots a site of their own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from galaxy_dirac.archive import sha256_file
from galaxy_dirac.pilot.build import build_zipapp
from galaxy_dirac.pilot.watchdog import live
from tests.conftest import WMSServer, wait_for
from tests.jdl import jdl_text

from .conftest import FileStore, LocalServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pilots need /proc")

SECRET = "pilot-integration-tests-" + "s" * 32
HEARTBEAT = 1.0


def pid_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Pilot:
    """One pilot process: the zipapp under an isolated interpreter (so only the standard library is available)."""

    def __init__(self, pyz: Path, scheduler: WMSServer, workdir: Path, site: str, *extra: str) -> None:
        self.workdir = workdir
        self.stamp = uuid.uuid4().hex
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_")}
        env["GALAXY_DIRAC_PILOT_TOKEN"] = scheduler.token("pilot")
        self.log_path = workdir / "pilot.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                str(pyz),
                "--url",
                scheduler.url,
                "--site",
                site,
                "--ce",
                "ce.loopback",
                "--queue",
                "test",
                "--stamp",
                self.stamp,
                "--workdir",
                str(workdir),
                "--memory",
                "4000",
                "--cpu-time",
                "86400",
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--kill-grace",
                "2",
                "--idle-backoff",
                "0.2",
                "--idle-backoff-max",
                "1",
                "--match-wait",
                "1",
                "--log-level",
                "DEBUG",
                *extra,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pilot still running after {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    return build_zipapp(tmp_path_factory.mktemp("pyz") / "pilot.pyz")


@pytest.fixture
def cleanup():
    """Kills pilots and payloads left behind by a failing test (payloads run in sessions of their own)."""
    pilots: List[Pilot] = []
    pid_files: List[Path] = []
    yield pilots, pid_files
    for pilot in pilots:
        pilot.kill()
    for path in pid_files:
        for line in path.read_text().split() if path.exists() else []:
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(line), signal.SIGKILL)


@pytest.fixture(scope="module")
def wms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WMSServer]:
    server = WMSServer(tmp_path_factory.mktemp("wms"), secret=SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def site(request) -> str:
    return f"LCG.{request.node.name.replace('_', '')[:40]}.org"


def jdl(site: str, **attributes: Any) -> str:
    attributes.setdefault("StdOutput", "std.out")
    attributes.setdefault("StdError", "std.err")
    attributes.setdefault("CPUTime", 3600)
    attributes["Site"] = site
    return jdl_text(**attributes)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def wrapper_history(job: Dict[str, Any]) -> List[tuple]:
    return [(h["Status"], h["MinorStatus"]) for h in job["History"] if h["Source"] == "JobWrapper"]


# -- tests ---------------------------------------------------------------------------------------------------------


def test_job_runs_to_done_with_sandboxes_and_staging(wms, pyz, site, tmp_path, cleanup):
    files = FileStore()
    galaxy = LocalServer(files)
    try:
        data = os.urandom(200_000)
        files.files["/api/jobs/1/files/input.dat"] = data
        files.plan["/api/jobs/1/files/input.dat"] = ["503", "drop"]
        manifest = {
            "inputs": [
                {"url": galaxy.url + "/api/jobs/1/files/input.dat", "path": "inputs/input.dat", "size": len(data)}
            ],
            "outputs": [{"url": galaxy.url + "/api/jobs/1/files/out.dat", "path": "outputs/out.dat", "method": "PUT"}],
        }
        script = b"#!/bin/sh\nset -e\nmkdir -p outputs\nsha256sum inputs/input.dat | cut -c1-64 > outputs/out.dat\n"
        script += b'echo "hello from job $DIRACJOBID on $DIRAC_JOB_PROCESSORS core(s)"\ncat greeting.txt > result.txt\n'
        pfn = wms.upload_sandbox(
            {
                "job.sh": script,
                "greeting.txt": b"hi there\n",
                "galaxy_dirac_manifest.json": json.dumps(manifest).encode(),
            },
            tmp_path,
        )
        job_id = wms.submit(
            [jdl(site, Executable="job.sh", InputSandbox=[pfn], OutputSandbox=["std.out", "std.err", "result.txt"])]
        )[0]
        pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--max-empty-matches", "2")
        cleanup[0].append(pilot)
        job = wms.wait_status(job_id, ("Done", "Failed"), 60)
        assert job["Status"] == "Done", json.dumps(job, indent=1)
        assert pilot.wait() == 0, pilot.log()
    finally:
        galaxy.close()

    assert wrapper_history(job) == [
        ("Running", "Job Initialization"),
        ("Running", "Downloading InputSandbox"),
        ("Running", "Input Data Resolution"),
        ("Running", "Application"),
        ("Completing", "Application Finished Successfully"),
        ("Completing", "Uploading Output Sandbox"),
        ("Completing", "Uploading Output Data"),
        ("Done", "Execution Complete"),
    ]
    outputs = wms.output_sandbox(job_id, tmp_path)
    assert outputs["result.txt"] == b"hi there\n"
    assert outputs["std.out"] == f"hello from job {job_id} on 1 core(s)\n".encode()
    assert files.uploads["/api/jobs/1/files/out.dat"] == hashlib.sha256(data).hexdigest().encode() + b"\n"
    ranges = [r.headers.get("range") for r in galaxy.requests if r.path.endswith("input.dat")]
    assert ranges[:2] == [None, None] and ranges[2] == f"bytes={len(data) // 2}-", ranges
    row = wms.pilot_row(pilot.stamp)
    assert row["Status"] == "Done" and row["MatchedJobs"] == 1, row
    assert not (tmp_path / "pilot" / f"job-{job_id}").exists()
    # The job's consumption (from its heartbeats) is kept for its owner.
    used = wms.job(job_id)["HeartBeat"]
    assert {"CPUConsumed", "MaxMemoryUsed", "WallClockTime"} <= set(used), used


def test_kill_reaches_the_payload_within_one_heartbeat(wms, pyz, site, tmp_path, cleanup):
    pid_file = tmp_path / "payload.pid"
    cleanup[1].append(pid_file)
    job_id = wms.submit([jdl(site, Executable="/bin/sh", Arguments=f"-c 'echo $$ > {pid_file}; exec sleep 120'")])[0]
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--max-empty-matches", "1")
    cleanup[0].append(pilot)
    wms.wait_status(job_id, ("Running",), 60, minor="Application")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the payload's pid"))
    assert pid_alive(pid)
    time.sleep(HEARTBEAT / 3)
    started = time.monotonic()
    wms.api("PATCH", "/api/jobs/status", json={str(job_id): {now(): {"Status": "Killed", "Source": "test"}}})
    wait_for(lambda: not pid_alive(pid), HEARTBEAT + 5, "the payload to die")
    elapsed = time.monotonic() - started
    assert elapsed <= HEARTBEAT + 1.0, f"kill took {elapsed:.2f} s with a {HEARTBEAT} s heartbeat"
    assert pilot.wait() == 0, pilot.log()
    job = wms.job(job_id)
    assert job["Status"] == "Killed", job
    assert not [h for h in wrapper_history(job) if h[0] in ("Done", "Failed", "Completing")]


def test_kill_reaches_the_payload_long_before_the_next_heartbeat(wms, pyz, site, tmp_path, cleanup):
    """The wrapper long-polls for its job's commands: a Kill does not wait for a ten-minute heartbeat."""
    pid_file = tmp_path / "payload.pid"
    cleanup[1].append(pid_file)
    job_id = wms.submit([jdl(site, Executable="/bin/sh", Arguments=f"-c 'echo $$ > {pid_file}; exec sleep 300'")])[0]
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--max-empty-matches", "1", "--heartbeat-interval", "600")
    cleanup[0].append(pilot)
    wms.wait_status(job_id, ("Running",), 60, minor="Application")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the payload's pid"))
    time.sleep(1)  # the first heartbeat has gone; the next is ten minutes away
    wms.api("PATCH", "/api/jobs/status", json={str(job_id): {now(): {"Status": "Killed", "Source": "test"}}})
    wait_for(lambda: not pid_alive(pid), 60, "the payload to die")
    assert pilot.wait() == 0, pilot.log()
    assert wms.job(job_id)["Status"] == "Killed"


def test_memory_and_wall_clock_limits_are_enforced(wms, pyz, site, tmp_path, cleanup):
    hog = "-c 'import time; b = bytearray(range(256)) * (300 * 4096); time.sleep(120)'"
    memory_job = wms.submit([jdl(site, Executable="python3", Arguments=hog, MaxRAM=100)])[0]
    wall_job = wms.submit([jdl(site, Executable="/bin/sleep", Arguments="120", MaxWallClockTime=2)])[0]
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--processors", "2", "--max-empty-matches", "2")
    cleanup[0].append(pilot)
    memory = wms.wait_status(memory_job, ("Failed", "Done"), 60)
    wall = wms.wait_status(wall_job, ("Failed", "Done"), 60)
    assert (memory["Status"], memory["MinorStatus"]) == ("Failed", "Memory limit exceeded"), memory
    assert "MaxRAM 100 MB" in memory["ApplicationStatus"]
    assert (wall["Status"], wall["MinorStatus"]) == ("Failed", "Wall clock time limit exceeded"), wall
    assert pilot.wait() == 0, pilot.log()


def test_multicore_pilot_runs_two_single_core_jobs_at_once(wms, pyz, site, tmp_path, cleanup):
    job_ids = []
    for n in range(2):
        marks = tmp_path / f"job{n}"
        command = (
            f"-c 'date +%s.%N > {marks}.start; echo $DIRAC_JOB_PROCESSORS > {marks}.procs; "
            f"sleep 3; date +%s.%N > {marks}.end'"
        )
        job_ids.append(wms.submit([jdl(site, Executable="/bin/sh", Arguments=command, NumberOfProcessors=1)])[0])
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--processors", "2", "--max-empty-matches", "2")
    cleanup[0].append(pilot)
    for job_id in job_ids:
        assert wms.wait_status(job_id, ("Done", "Failed"), 60)["Status"] == "Done"
    assert pilot.wait() == 0, pilot.log()
    spans = [[float((tmp_path / f"job{n}.{e}").read_text()) for e in ("start", "end")] for n in range(2)]
    assert max(start for start, _ in spans) < min(end for _, end in spans), f"jobs ran one after the other: {spans}"
    assert [(tmp_path / f"job{n}.procs").read_text().strip() for n in range(2)] == ["1", "1"]
    assert wms.pilot_row(pilot.stamp)["MatchedJobs"] == 2


def test_hostile_input_sandbox_is_refused(wms, pyz, site, tmp_path, cleanup):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, kind in (("ok.txt", tarfile.REGTYPE), ("../../../escaped.txt", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, 5
            tar.addfile(info, io.BytesIO(b"evil\n"))
    archive = tmp_path / "hostile.tar.bz2"
    archive.write_bytes(buffer.getvalue())
    sha, size = sha256_file(archive)
    pfn = wms.upload_archive(archive, sha, size)
    job_id = wms.submit([jdl(site, Executable="/bin/true", InputSandbox=[pfn])])[0]
    pilot = Pilot(pyz, wms, tmp_path / "a" / "b" / "c" / "pilot", site, "--max-empty-matches", "1")
    cleanup[0].append(pilot)
    job = wms.wait_status(job_id, ("Failed", "Done"), 60)
    assert (job["Status"], job["MinorStatus"]) == ("Failed", "Input sandbox rejected"), job
    assert "'..'" in job["ApplicationStatus"]
    assert pilot.wait() == 0, pilot.log()
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not list(tmp_path.rglob("ok.txt"))


def test_empty_pilot_is_reported(wms, pyz, site, tmp_path, cleanup):
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--max-empty-matches", "2")
    cleanup[0].append(pilot)
    assert pilot.wait() == 0, pilot.log()
    row = wms.pilot_row(pilot.stamp)
    assert row["Status"] == "Done" and row["MatchedJobs"] == 0, row
    assert "no job ever matched" in row["StatusReason"]


def test_sigkilled_pilots_job_is_rescheduled_and_completed_by_another(wms_server_factory, pyz, site, tmp_path, cleanup):
    wms = wms_server_factory("wms", secret=SECRET, stalled_after=3, failed_after=1, maintenance_interval=0.5)
    pids = tmp_path / "payload.pids"
    cleanup[1].append(pids)
    marker = tmp_path / "first-attempt"
    # The first attempt would run for minutes and leaves a stray in a session of its own; the second finishes.
    script = (
        f"if [ -e {marker} ]; then echo finished > result.txt; exit 0; fi; touch {marker}; "
        f"echo $$ >> {pids}; setsid sleep 300 & echo $! >> {pids}; sleep 300"
    )
    job_id = wms.submit([jdl(site, Executable="/bin/sh", Arguments=f"-c '{script}'", OutputSandbox=["result.txt"])])[0]
    first = Pilot(pyz, wms, tmp_path / "first", site, "--max-empty-matches", "1")
    cleanup[0].append(first)
    wms.wait_status(job_id, ("Running",), 60, minor="Application")
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 10, "the payload to start")
    first.kill()  # SIGKILL to the pilot's process group only: the payload runs in a session of its own
    payload = [int(pid) for pid in pids.read_text().split()]
    wait_for(lambda: not live(payload), 15, "the payload of the killed pilot to be killed by its guard")

    wms.wait_status(job_id, ("Waiting",), 30)
    second = Pilot(pyz, wms, tmp_path / "second", site, "--max-empty-matches", "2")
    cleanup[0].append(second)
    job = wms.wait_status(job_id, ("Done", "Failed"), 60)
    assert job["Status"] == "Done", job
    assert second.wait() == 0, second.log()
    statuses = [h["Status"] for h in job["History"]]
    assert "Stalled" in statuses and "Rescheduled" in statuses, statuses
    assert job["RescheduleCounter"] == 1
    assert wms.output_sandbox(job_id, tmp_path) == {"result.txt": b"finished\n"}
    assert wms.pilot_row(second.stamp)["MatchedJobs"] == 1


def test_result_survives_a_scheduler_restart(wms_server_factory, pyz, site, tmp_path, cleanup):
    wms = wms_server_factory("wms", secret=SECRET)
    go = tmp_path / "go"
    command = f"-c 'while [ ! -e {go} ]; do sleep 0.1; done; echo kept > result.txt'"
    job_id = wms.submit([jdl(site, Executable="/bin/sh", Arguments=command, OutputSandbox=["result.txt"])])[0]
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--max-empty-matches", "3", "--outbox-timeout", "120")
    cleanup[0].append(pilot)
    wms.wait_status(job_id, ("Running",), 60, minor="Application")

    wms.stop()
    go.touch()
    record = tmp_path / "pilot" / "outbox" / f"job-{job_id}.json"

    def final_status_on_disk() -> bool:
        if not record.exists():
            return False
        steps = json.loads(record.read_text())["steps"]
        return any(s["op"] == "status" and s["update"].get("Status") == "Done" for s in steps)

    wait_for(final_status_on_disk, 30, "the pilot to keep the final status on disk")
    assert (tmp_path / "pilot" / "outbox" / f"job-{job_id}-output.tar.bz2").exists()
    assert pilot.process.poll() is None, pilot.log()

    wms.start()
    job = wms.wait_status(job_id, ("Done", "Failed"), 60)
    assert job["Status"] == "Done", job
    assert pilot.wait() == 0, pilot.log()
    done = [h for h in job["History"] if h["Status"] == "Done"]
    assert len(done) == 1, job["History"]
    assert wms.output_sandbox(job_id, tmp_path) == {"result.txt": b"kept\n"}
    assert not record.exists()
    assert wms.pilot_row(pilot.stamp)["MatchedJobs"] == 1


def test_sigterm_hands_running_jobs_back(wms, pyz, site, tmp_path, cleanup):
    pid_file = tmp_path / "payload.pid"
    cleanup[1].append(pid_file)
    job_id = wms.submit([jdl(site, Executable="/bin/sh", Arguments=f"-c 'echo $$ > {pid_file}; exec sleep 120'")])[0]
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site)
    cleanup[0].append(pilot)
    wms.wait_status(job_id, ("Running",), 60, minor="Application")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the payload's pid"))
    pilot.process.send_signal(signal.SIGTERM)
    assert pilot.wait(30) == 0, pilot.log()
    assert not pid_alive(pid)
    job = wms.job(job_id)
    assert (job["Status"], job["RescheduleCounter"]) == ("Waiting", 1), job
    row = wms.pilot_row(pilot.stamp)
    assert row["MatchedJobs"] == 1 and "stopped by signal" in row["StatusReason"], row
    wms.api("PATCH", "/api/jobs/status", json={str(job_id): {now(): {"Status": "Killed", "Source": "test"}}})


def test_long_polling_pilot_gets_a_job_queued_while_it_waits(wms, pyz, site, tmp_path, cleanup):
    """An idle pilot holds its match request open (``--match-wait``); a job queued meanwhile reaches it at once,
    not at the end of the wait nor after a back-off."""
    pilot = Pilot(pyz, wms, tmp_path / "pilot", site, "--match-wait", "30", "--max-empty-matches", "5")
    cleanup[0].append(pilot)
    registered = {"stamp": pilot.stamp, "status": "Running"}
    wait_for(lambda: wms.api("GET", "/api/x-embedded/pilots", params=registered), 30, "pilot registration")
    time.sleep(1.0)  # the pilot is now inside its first long poll
    job_id = wms.submit([jdl(site, Executable="/bin/true")])[0]
    queued = time.monotonic()
    wms.wait_status(job_id, ("Matched", "Running", "Completing", "Done"), timeout=25)
    assert time.monotonic() - queued < 25, "the long poll did not wake up for the new job"
    assert wms.wait_status(job_id, ("Done",), timeout=30)["Status"] == "Done"
