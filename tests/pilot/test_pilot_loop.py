"""A whole pilot, in-process, against a fake scheduler: the job wrapper's sequence, staging, sandboxes, hand-backs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time

from galaxy_dirac.archive import create_archive, safe_extract
from galaxy_dirac.pilot.pilot import Pilot, parse_args
from galaxy_dirac.pilot.slot import detect_container_runtimes

PROTOCOL_SEQUENCE = [
    ("Running", "Job Initialization"),
    ("Running", "Downloading InputSandbox"),
    ("Running", "Application"),
    ("Completing", "Application Finished Successfully"),
    ("Completing", "Uploading Output Sandbox"),
    ("Done", "Execution Complete"),
]


def pilot_options(url: str, workdir, *extra: str):
    return parse_args(
        [
            "--url",
            url,
            "--token",
            "pilot-token",
            "--site",
            "LCG.Test.org",
            "--ce",
            "ce.test",
            "--processors",
            "2",
            "--memory",
            "4000",
            "--workdir",
            str(workdir),
            "--heartbeat-interval",
            "0.5",
            "--kill-grace",
            "1",
            "--max-empty-matches",
            "2",
            "--idle-backoff",
            "0.05",
            "--outbox-timeout",
            "10",
            *extra,
        ],
        {},
    )


def add_input_sandbox(app, tmp_path, files: dict) -> str:
    source = tmp_path / "isb-src"
    source.mkdir(exist_ok=True)
    pairs = []
    for name, content in files.items():
        (source / name).write_bytes(content)
        pairs.append((name, source / name))
    sha, _size = create_archive(tmp_path / "isb.tar.bz2", pairs)
    app.sandboxes[sha] = (tmp_path / "isb.tar.bz2").read_bytes()
    return f"SB:SandboxSE|/S3/b/vo/g/o/sha256:{sha}.tar.bz2"


def match(job_id: int, **job) -> dict:
    job.setdefault("StdOutput", "std.out")
    job.setdefault("StdError", "std.err")
    return {"JobID": job_id, "JDL": "[]", "Job": job, "Token": f"job-token-{job_id}", "TokenExpires": "never"}


def statuses(app, job_id: int) -> list:
    return [(s["Status"], s["MinorStatus"]) for s in app.statuses if s["job_id"] == job_id]


def test_job_runs_to_done_with_sandboxes_and_manifest(fake_scheduler, file_server, tmp_path):
    app = fake_scheduler.app_state
    data = b"input data " * 1000
    file_server.store.files["/galaxy/in.dat"] = data
    file_server.store.plan["/galaxy/in.dat"] = ["503"]
    manifest = {
        "inputs": [
            {
                "url": file_server.url + "/galaxy/in.dat",
                "path": "inputs/in.dat",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        ],
        "outputs": [
            {"url": file_server.url + "/galaxy/out", "path": "result.txt", "method": "POST", "fields": {"k": "v"}},
            {"url": file_server.url + "/galaxy/opt", "path": "maybe.txt", "optional": True},
        ],
    }
    script = b'#!/bin/sh\necho "procs=$DIRAC_JOB_PROCESSORS slots=$GALAXY_SLOTS x=$X token=$GALAXY_DIRAC_PILOT_TOKEN"\n'
    script += b"wc -c < inputs/in.dat > result.txt\necho oops >&2\n"
    pfn = add_input_sandbox(
        app, tmp_path, {"run.sh": script, "galaxy_dirac_manifest.json": json.dumps(manifest).encode()}
    )
    app.matches.append(
        match(
            5,
            Executable="run.sh",
            Arguments="",
            InputSandbox=[pfn, "run.sh"],
            OutputSandbox=["std.out", "std.err", "result.txt", "absent.txt"],
            Environment=["X=42"],
            NumberOfProcessors=2,
        )
    )
    pilot = Pilot(pilot_options(fake_scheduler.url, tmp_path / "pilot"))
    assert pilot.run() == 0

    assert statuses(app, 5) == PROTOCOL_SEQUENCE[:2] + [("Running", "Input Data Resolution")] + PROTOCOL_SEQUENCE[
        2:5
    ] + [("Completing", "Uploading Output Data"), ("Done", "Execution Complete")]
    assert file_server.store.uploads["/galaxy/out"] == {"k": "v", "file": ("result.txt", b"11000\n")}
    assert "/galaxy/opt" not in file_server.store.uploads

    out_sha = app.output_pfns[5].split("sha256:")[1].split(".")[0]
    (tmp_path / "osb.tar.bz2").write_bytes(app.sandboxes[out_sha])
    assert sorted(safe_extract(tmp_path / "osb.tar.bz2", tmp_path / "osb")) == ["result.txt", "std.err", "std.out"]
    assert (tmp_path / "osb" / "std.out").read_text() == "procs=2 slots=2 x=42 token=\n"
    assert (tmp_path / "osb" / "std.err").read_text() == "oops\n"

    assert app.registrations[0]["site"] == "LCG.Test.org" and app.registrations[0]["processors"] == 2
    first = app.match_requests[0]
    assert first["NumberOfProcessors"] == 2 and "2Processors" in first["Tags"] and first["GridCE"] == "ce.test"
    assert app.pilot_reports[-1]["matched_jobs"] == 1 and app.pilot_reports[-1]["status"] == "Done"
    assert not (tmp_path / "pilot" / "job-5").exists()
    assert not [p for p in (tmp_path / "pilot" / "outbox").iterdir() if p.is_file()]
    assert all(
        r.headers.get("authorization") == "Bearer job-token-5"
        for r in fake_scheduler.requests
        if r.path.startswith("/api/jobs/")
    )


def test_application_error_fails_the_job(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.matches.append(match(6, Executable="/bin/sh", Arguments="-c 'echo bad; exit 3'", OutputSandbox=["std.out"]))
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path)).run() == 0
    assert statuses(app, 6)[-3:] == [
        ("Completing", "Application Finished With Errors"),
        ("Completing", "Uploading Output Sandbox"),
        ("Failed", "Application Finished With Errors"),
    ]
    assert app.statuses[-1]["ApplicationStatus"] == "Exit code 3"
    assert 6 in app.output_pfns


def test_hostile_input_sandbox_is_refused(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    app.sandboxes[sha] = buffer.getvalue()
    pfn = f"SB:SandboxSE|/S3/b/vo/g/o/sha256:{sha}.tar.bz2"
    app.matches.append(match(7, Executable="/bin/true", InputSandbox=[pfn]))
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path / "w")).run() == 0
    assert statuses(app, 7)[-1] == ("Failed", "Input sandbox rejected")
    assert "'..'" in app.statuses[-1]["ApplicationStatus"]
    assert not list(tmp_path.rglob("escaped.txt"))


def test_unavailable_input_sandbox_hands_the_job_back(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    pfn = "SB:SandboxSE|/S3/b/vo/g/o/sha256:" + "0" * 64 + ".tar.bz2"
    app.matches.append(match(8, Executable="/bin/true", InputSandbox=[pfn]))
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path)).run() == 0
    assert app.reschedules == [8]
    assert not [s for s in statuses(app, 8) if s[0] in ("Done", "Failed")]


def test_kill_command_stops_the_payload_and_reports_nothing_more(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    app.kill.add(9)
    app.matches.append(match(9, Executable="/bin/sleep", Arguments="30"))
    started = time.monotonic()
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path)).run() == 0
    assert time.monotonic() - started < 10
    assert statuses(app, 9)[-1] == ("Running", "Application")
    assert app.heartbeats


def test_two_single_core_jobs_share_a_two_core_pilot(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    for job_id in (10, 11):
        marker = tmp_path / f"m{job_id}"
        command = f"-c 'date +%s.%N > {marker}.start; sleep 1; date +%s.%N > {marker}.end'"
        app.matches.append(match(job_id, Executable="/bin/sh", Arguments=command))
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path / "w")).run() == 0
    spans = [tuple(float((tmp_path / f"m{j}.{e}").read_text()) for e in ("start", "end")) for j in (10, 11)]
    assert max(s for s, _ in spans) < min(e for _, e in spans), "jobs did not overlap"
    assert app.match_requests[1]["NumberOfProcessors"] == 1
    assert app.match_requests[1]["Tags"] == detect_container_runtimes() + ["1Processors"]  # and the node's runtimes


def test_empty_pilot_reports_no_match(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path)).run() == 0
    assert len(app.match_requests) == 2
    report = app.pilot_reports[-1]
    assert report["matched_jobs"] == 0 and report["reason"].startswith("no job ever matched")


def test_drain_file_and_stop_request(fake_scheduler, tmp_path):
    app = fake_scheduler.app_state
    (tmp_path / "DRAIN").touch()
    assert Pilot(pilot_options(fake_scheduler.url, tmp_path)).run() == 0
    assert app.match_requests == [] and "drain file found" in app.pilot_reports[-1]["reason"]

    (tmp_path / "DRAIN").unlink()
    app.matches.append(match(12, Executable="/bin/sleep", Arguments="30"))
    pilot = Pilot(pilot_options(fake_scheduler.url, tmp_path))
    threading.Timer(1.0, pilot.request_stop).start()
    started = time.monotonic()
    assert pilot.run() == 0
    assert time.monotonic() - started < 10
    assert app.reschedules == [12]
    assert "stopped by signal" in app.pilot_reports[-1]["reason"]
