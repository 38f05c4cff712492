"""Contract tests: what a DiracX 0.7 server does, checked against every server in CONTRACT_SERVERS.

The `contract_server` tests hold any implementation (a real DiracX today, our embedded scheduler later) to the
behaviour our WMS client relies on, including the official diracx-client run from the DiracX side venv. The
`diracx_server` tests pin down DiracX-only details (pilot-side heartbeat, other users, token claims) that we
mirror on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pathlib
import subprocess
import tarfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List

import pytest
import requests

from tests.contract.diracx_server import ADMIN_GROUP, DiracxServer, write_credentials
from tests.jdl import jdl_text

SCRIPT = pathlib.Path(__file__).with_name("diracx_client_calls.py")

#: Columns every job row of POST /api/jobs/search carries when no `parameters` are given.
JOB_COLUMNS = {
    "JobID",
    "JobType",
    "JobGroup",
    "Site",
    "JobName",
    "Owner",
    "OwnerGroup",
    "VO",
    "SubmissionTime",
    "RescheduleTime",
    "LastUpdateTime",
    "StartExecTime",
    "HeartBeatTime",
    "EndExecTime",
    "Status",
    "MinorStatus",
    "ApplicationStatus",
    "UserPriority",
    "RescheduleCounter",
    "VerifiedFlag",
    "AccountedFlag",
}


def _session(token: str) -> requests.Session:
    """A requests session with the bearer token that ignores proxy settings (everything is on loopback)."""
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def _now(seconds: float = 0.0) -> str:
    """A timezone-aware ISO timestamp: DiracX rejects naive ones with 400."""
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def _jdls(tag: str, count: int) -> List[str]:
    """JDLs with identical attribute names (DiracX 0.7 fails a bulk submission whose JDLs differ in them)."""
    return [jdl_text(brackets=False, Executable="/bin/echo", JobName=f"{tag}-{i}", JobGroup=tag) for i in range(count)]


def _submit(session: requests.Session, url: str, tag: str, count: int) -> List[int]:
    response = session.post(f"{url}/api/jobs/jdl", json=_jdls(tag, count))
    assert response.status_code == 201, response.text
    return [job["JobID"] for job in response.json()]


def _job(session: requests.Session, url: str, job_id: int) -> Dict[str, Any]:
    response = session.post(
        f"{url}/api/jobs/search", json={"search": [{"parameter": "JobID", "operator": "eq", "value": job_id}]}
    )
    assert response.status_code == 200, response.text
    (row,) = response.json()
    return row


def _tarball(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_official_client(
    python: pathlib.Path, url: str, tokens: Dict[str, Any], workdir: pathlib.Path, valid_for: Any = None
) -> Dict[str, Any]:
    """Run diracx_client_calls.py in the DiracX side venv against `url`; return its JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    credentials = write_credentials(workdir / "credentials.json", tokens, valid_for=valid_for)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "DIRACX_URL": url,
        "DIRACX_CREDENTIALS_PATH": str(credentials),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    proc = subprocess.run(
        [str(python), str(SCRIPT), f"contract-{uuid.uuid4().hex[:8]}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"client script printed no JSON (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert result["ok"], json.dumps(result, indent=2) + "\n" + proc.stderr
    assert proc.returncode == 0
    result["credentials_after"] = json.loads(credentials.read_text())
    return result


# --------------------------------------------------------------------------------------------------------------
# Against every server in CONTRACT_SERVERS
# --------------------------------------------------------------------------------------------------------------


def test_official_client_calls(contract_server: Any, diracx_python: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The official diracx-client can submit, search, summarise and kill, and sees DiracX's shapes."""
    result = run_official_client(diracx_python, contract_server.url, contract_server.credentials, tmp_path)
    steps = result["steps"]

    submitted = steps["submit"]
    assert [set(job) for job in submitted] == [{"JobID", "Status", "MinorStatus", "TimeStamp"}] * 2
    queued, _ = contract_server.expect["queued"]
    assert all((job["Status"], job["MinorStatus"]) == contract_server.expect["queued"] for job in submitted)
    job_ids = [job["JobID"] for job in submitted]
    assert job_ids[1] > job_ids[0]

    rows = steps["search"]
    assert [row["JobID"] for row in rows] == job_ids
    assert rows[0]["JobName"].endswith("-1") and rows[1]["JobName"].endswith("-2")
    assert {row["Owner"] for row in rows} == {"alice"}
    assert {row["OwnerGroup"] for row in rows} == {"galaxy_user"}
    assert {row["VO"] for row in rows} == {"galaxy"}
    for row in steps["search_all_columns"]:
        assert set(row) >= JOB_COLUMNS, JOB_COLUMNS - set(row)
        assert row["RescheduleCounter"] == 0 and row["ApplicationStatus"] == "Unknown"

    assert steps["summary"] == [{"Status": queued, "count": 2}]
    assert steps["set_status"]["failed"] == {}
    assert steps["set_status"]["success"][str(job_ids[0])]["Status"] == "Killed"
    assert [(row["JobID"], row["Status"]) for row in steps["search_after_kill"]] == [
        (job_ids[0], "Killed"),
        (job_ids[1], queued),
    ]
    assert sorted(steps["summary_after_kill"], key=lambda r: r["Status"]) == [
        {"Status": "Killed", "count": 1},
        {"Status": queued, "count": 1},
    ]


def test_official_client_refreshes_expired_access_token(
    contract_server: Any, diracx_python: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """With `expires_on` in the past the client refreshes through token_endpoint and rewrites its credentials."""
    if not contract_server.credentials.get("refresh_token"):
        pytest.skip("this server issues no refresh token")
    result = run_official_client(diracx_python, contract_server.url, contract_server.credentials, tmp_path, valid_for=0)
    after = result["credentials_after"]
    assert after["access_token"] != contract_server.credentials["access_token"]
    assert after["expires_on"] > time.time() + 300
    assert after["refresh_token"]


def test_requests_without_a_valid_token_are_rejected(contract_server: Any) -> None:
    url = contract_server.url
    anonymous = requests.Session()
    anonymous.trust_env = False
    response = anonymous.post(f"{url}/api/jobs/search", json={})
    assert response.status_code == 401
    assert response.json() == {"detail": "Authorization header is missing"}
    assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert _session("not.a.jwt").post(f"{url}/api/jobs/search", json={}).status_code == 401
    payload = contract_server.token.split(".")
    tampered = ".".join([payload[0], payload[1][:-4] + "AAAA", payload[2]])
    assert _session(tampered).post(f"{url}/api/jobs/search", json={}).status_code == 401


def test_search_paginates_with_content_range(contract_server: Any) -> None:
    """206 + `Content-Range: jobs first-last/total` (0-based, inclusive) for a partial page, 416 past the end."""
    url, session = contract_server.url, _session(contract_server.token)
    tag = f"page-{uuid.uuid4().hex[:8]}"
    job_ids = _submit(session, url, tag, 3)
    body = {
        "parameters": ["JobID", "Status"],
        "search": [{"parameter": "JobGroup", "operator": "eq", "value": tag}],
        "sort": [{"parameter": "JobID", "direction": "asc"}],
    }
    first = session.post(f"{url}/api/jobs/search", params={"page": 1, "per_page": 2}, json=body)
    assert first.status_code == 206
    assert first.headers["Content-Range"] == "jobs 0-1/3"
    queued, _ = contract_server.expect["queued"]
    assert first.json() == [{"JobID": job_ids[0], "Status": queued}, {"JobID": job_ids[1], "Status": queued}]
    second = session.post(f"{url}/api/jobs/search", params={"page": 2, "per_page": 2}, json=body)
    assert (second.status_code, second.headers["Content-Range"]) == (206, "jobs 2-2/3")
    assert [row["JobID"] for row in second.json()] == [job_ids[2]]
    beyond = session.post(f"{url}/api/jobs/search", params={"page": 3, "per_page": 2}, json=body)
    assert (beyond.status_code, beyond.headers["Content-Range"], beyond.json()) == (416, "jobs */3", [])
    whole = session.post(f"{url}/api/jobs/search", params={"page": 1, "per_page": 3}, json=body)
    assert whole.status_code == 200 and "Content-Range" not in whole.headers

    desc = dict(body, sort=[{"parameter": "JobID", "direction": "desc"}])
    assert [r["JobID"] for r in session.post(f"{url}/api/jobs/search", json=desc).json()] == job_ids[::-1]
    vector = dict(body, search=[{"parameter": "JobID", "operator": "in", "values": job_ids[:2]}])
    assert [r["JobID"] for r in session.post(f"{url}/api/jobs/search", json=vector).json()] == job_ids[:2]
    like = dict(body, search=[{"parameter": "JobName", "operator": "like", "value": f"{tag}-%"}])
    assert len(session.post(f"{url}/api/jobs/search", json=like).json()) == 3
    distinct = {"parameters": ["JobGroup"], "search": body["search"], "distinct": True}
    assert session.post(f"{url}/api/jobs/search", json=distinct).json() == [{"JobGroup": tag}]
    summary = session.post(
        f"{url}/api/jobs/summary", json={"grouping": ["Status", "JobGroup"], "search": body["search"]}
    )
    assert summary.json() == [{"Status": queued, "JobGroup": tag, "count": 3}]


def test_search_rejects_malformed_specs(contract_server: Any) -> None:
    url, session = contract_server.url, _session(contract_server.token)
    scalar_with_values = {"search": [{"parameter": "JobID", "operator": "eq", "values": [1]}]}
    assert session.post(f"{url}/api/jobs/search", json=scalar_with_values).status_code == 422
    vector_with_value = {"search": [{"parameter": "JobID", "operator": "in", "value": 1}]}
    assert session.post(f"{url}/api/jobs/search", json=vector_with_value).status_code == 422
    bad_direction = {"sort": [{"parameter": "JobID", "direction": "up"}]}
    assert session.post(f"{url}/api/jobs/search", json=bad_direction).status_code == 422
    unknown = session.post(f"{url}/api/jobs/search", json={"parameters": ["NoSuchColumn"]})
    assert unknown.status_code == 400 and "NoSuchColumn" in unknown.json()["detail"]
    assert session.post(f"{url}/api/jobs/summary", json={}).status_code == 422
    naive = session.patch(f"{url}/api/jobs/status", json={"1": {"2026-01-01T00:00:00": {"Status": "Killed"}}})
    assert naive.status_code in (400, 403)  # 403 first when job 1 is not ours


def test_status_updates_follow_the_state_machine(contract_server: Any) -> None:
    """A refused transition keeps Status (DiracX still applies MinorStatus, we change nothing); kill is Killed."""
    url, session = contract_server.url, _session(contract_server.token)
    queued, _ = contract_server.expect["queued"]
    job_id = _submit(session, url, f"sm-{uuid.uuid4().hex[:8]}", 1)[0]
    time.sleep(0.01)
    ok = session.patch(
        f"{url}/api/jobs/status",
        json={str(job_id): {_now(): {"MinorStatus": "Checked by test", "Source": "Test"}}},
    )
    assert ok.status_code == 200 and ok.json()["failed"] == {}
    assert ok.json()["success"][str(job_id)]["Status"] == queued
    assert _job(session, url, job_id)["MinorStatus"] == "Checked by test"
    time.sleep(0.01)
    refused = session.patch(
        f"{url}/api/jobs/status", json={str(job_id): {_now(): {"Status": "Done", "Source": "Test"}}}
    )
    assert refused.status_code == 200
    assert _job(session, url, job_id)["Status"] == queued
    time.sleep(0.01)
    kill = session.patch(
        f"{url}/api/jobs/status",
        params={"force": "false"},
        json={str(job_id): {_now(): {"Status": "Killed", "MinorStatus": "Marked for termination", "Source": "User"}}},
    )
    assert kill.status_code == 200
    row = _job(session, url, job_id)
    assert (row["Status"], row["MinorStatus"]) == ("Killed", "Marked for termination")
    assert row["EndExecTime"] is not None


def test_reschedule_returns_to_received_and_counts(contract_server: Any) -> None:
    url, session = contract_server.url, _session(contract_server.token)
    job_id = _submit(session, url, f"resched-{uuid.uuid4().hex[:8]}", 1)[0]
    time.sleep(0.01)
    response = session.post(f"{url}/api/jobs/reschedule", json={"job_ids": [job_id]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["failed"] == {}
    success = body["success"][str(job_id)]
    expected = (*contract_server.expect["rescheduled"], 1)
    assert (success["Status"], success["MinorStatus"], success["RescheduleCounter"]) == expected
    row = _job(session, url, job_id)
    assert (row["Status"], row["MinorStatus"], row["RescheduleCounter"]) == expected
    assert row["RescheduleTime"] is not None


def test_sandbox_roundtrip(contract_server: Any) -> None:
    """Upload via the presigned POST, dedup by checksum, download URL, output sandbox assignment."""
    url, session = contract_server.url, _session(contract_server.token)
    blob = _tarball("hello.txt", f"hello {uuid.uuid4()}\n".encode())
    info = {
        "checksum_algorithm": "sha256",
        "checksum": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
        "format": "tar.bz2",
    }
    first = session.post(f"{url}/api/jobs/sandbox", json=info)
    assert first.status_code == 200, first.text
    upload = first.json()
    pfn = upload["pfn"]
    assert pfn == f"SB:SandboxSE|/S3/sandboxes/galaxy/galaxy_user/alice/sha256:{info['checksum']}.tar.bz2"
    assert upload["url"] and isinstance(upload["fields"], dict)
    sent = requests.post(upload["url"], data=upload["fields"], files={"file": ("sandbox.tar.bz2", blob)})
    assert sent.status_code in (200, 201, 204), sent.text
    again = session.post(f"{url}/api/jobs/sandbox", json=info).json()
    assert again == {"pfn": pfn, "url": None, "fields": {}}

    download = session.get(f"{url}/api/jobs/sandbox", params={"pfn": pfn})
    assert download.status_code == 200
    assert set(download.json()) == {"url", "expires_in"}
    assert requests.get(download.json()["url"]).content == blob

    jdl = jdl_text(brackets=False, Executable="/bin/cat", Arguments="hello.txt", JobName="sb", InputSandbox=[pfn])
    job = session.post(f"{url}/api/jobs/jdl", json=[jdl])
    assert job.status_code == 201
    job_id = job.json()[0]["JobID"]
    out = _tarball("std.out", f"out {uuid.uuid4()}\n".encode())
    out_info = dict(info, checksum=hashlib.sha256(out).hexdigest(), size=len(out))
    out_upload = session.post(f"{url}/api/jobs/sandbox", json=out_info).json()
    assert requests.post(out_upload["url"], data=out_upload["fields"], files={"file": ("o", out)}).ok
    assigned = session.patch(f"{url}/api/jobs/{job_id}/sandbox/output", json=out_upload["pfn"])
    assert assigned.status_code == 200 and assigned.json() is None
    short_pfn = out_upload["pfn"].split("|", 1)[1]
    assert session.get(f"{url}/api/jobs/{job_id}/sandbox/output").json() == [short_pfn]
    assert session.get(f"{url}/api/jobs/{job_id}/sandbox").json()["Output"] == [short_pfn]
    again = session.patch(f"{url}/api/jobs/{job_id}/sandbox/output", json=out_upload["pfn"])
    assert (again.status_code, again.json()) == contract_server.expect["reassign_output"]


# --------------------------------------------------------------------------------------------------------------
# DiracX-only details we mirror
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.diracx
def test_diracx_token_claims(diracx_server: DiracxServer) -> None:
    header, payload = (json.loads(base64.urlsafe_b64decode(p + "==")) for p in diracx_server.token.split(".")[:2])
    assert header["alg"] == "Ed25519" and header["typ"] == "JWT" and header["kid"]
    assert set(payload) == {
        "sub",
        "vo",
        "iss",
        "dirac_properties",
        "jti",
        "preferred_username",
        "dirac_group",
        "exp",
        "dirac_policies",
    }
    assert payload["sub"].startswith("galaxy:") and payload["vo"] == "galaxy"
    assert payload["dirac_group"] == "galaxy_user" and payload["dirac_properties"] == ["NormalUser"]
    assert payload["preferred_username"] == "alice" and payload["iss"] == diracx_server.url
    assert diracx_server.credentials["expires_in"] == 12 * 60 * 60  # token_minutes; DiracX default: 1200


@pytest.mark.diracx
def test_diracx_kill_is_delivered_by_heartbeat(diracx_server: DiracxServer) -> None:
    """Heartbeat returns pending commands once; a Matched job heartbeating becomes Running."""
    url, session = diracx_server.url, _session(diracx_server.token)
    job_id = _submit(session, url, f"hb-{uuid.uuid4().hex[:8]}", 1)[0]
    time.sleep(0.01)
    path = {_now(0.01 * i): {"Status": s, "Source": "Test"} for i, s in enumerate(("Checking", "Waiting", "Matched"))}
    assert session.patch(f"{url}/api/jobs/status", json={str(job_id): path}).status_code == 200
    time.sleep(0.05)
    beat = {
        "LoadAverage": 1.0,
        "MemoryUsed": 10.0,
        "Vsize": 20.0,
        "AvailableDiskSpace": 100.0,
        "CPUConsumed": 1.0,
        "WallClockTime": 2.0,
        "StandardOutput": "line 1\nline 2",
    }
    first = session.patch(f"{url}/api/jobs/heartbeat", json={str(job_id): beat})
    assert (first.status_code, first.json()) == (200, [])
    assert _job(session, url, job_id)["Status"] == "Running"
    kill = {str(job_id): {_now(): {"Status": "Killed", "MinorStatus": "Marked for termination", "Source": "User"}}}
    assert session.patch(f"{url}/api/jobs/status", json=kill).status_code == 200
    time.sleep(1.1)  # DiracX keys heartbeat records by (JobID, Name, second): two in one second give a 500
    second = session.patch(f"{url}/api/jobs/heartbeat", json={str(job_id): {"CPUConsumed": 2.0}})
    assert second.json() == [{"job_id": job_id, "command": "Kill", "arguments": ""}]
    time.sleep(1.1)
    assert session.patch(f"{url}/api/jobs/heartbeat", json={str(job_id): {"CPUConsumed": 3.0}}).json() == []
    extra = session.patch(f"{url}/api/jobs/heartbeat", json={str(job_id): {"Foo": 1}})
    assert extra.status_code == 422


@pytest.mark.diracx
def test_diracx_other_users_and_admins(diracx_server: DiracxServer) -> None:
    """Normal users see every job of their VO (GlobalJobsInfo) but may only manage their own; 403 otherwise."""
    url, alice = diracx_server.url, _session(diracx_server.token)
    job_id = _submit(alice, url, f"own-{uuid.uuid4().hex[:8]}", 1)[0]
    bob = _session(str(diracx_server.mint("bob")["access_token"]))
    assert _job(bob, url, job_id)["Owner"] == "alice"
    kill = {str(job_id): {_now(): {"Status": "Killed", "Source": "User"}}}
    assert bob.patch(f"{url}/api/jobs/status", json=kill).status_code == 403
    assert bob.get(f"{url}/api/jobs/{job_id}/sandbox").status_code == 403
    assert alice.patch(f"{url}/api/jobs/status", json={"999999999": kill[str(job_id)]}).status_code == 403
    assert alice.patch(f"{url}/api/jobs/status", params={"force": "true"}, json=kill).status_code == 403

    admin = _session(str(diracx_server.mint("alice", ADMIN_GROUP)["access_token"]))
    missing = admin.patch(f"{url}/api/jobs/status", json={"999999999": kill[str(job_id)]})
    assert missing.status_code == 404
    assert missing.json() == {"detail": {"success": {}, "failed": {"999999999": {"detail": "Not found"}}}}
    forced = admin.patch(
        f"{url}/api/jobs/status",
        params={"force": "true"},
        json={str(job_id): {_now(): {"Status": "Done", "Source": "Admin"}}},
    )
    assert forced.status_code == 200 and _job(alice, url, job_id)["Status"] == "Done"
