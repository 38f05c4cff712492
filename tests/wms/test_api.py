"""The scheduler's HTTP API, over real HTTP against the real ``galaxy-dirac-wms serve`` process.

One server serves the whole module; every test works with its own owner names, site and pilot stamps, so tests do
not see (or match) each other's jobs. Tokens are minted with the server's own secret (the CLI path that does the same
is tested in test_cli.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
import requests
from sqlalchemy import select

from galaxy_dirac.wms.auth import create_token, verify_token
from galaxy_dirac.wms.db import JobToPilotMapping, make_engine, read_transaction
from galaxy_dirac.wms.sandboxes import make_ticket
from tests.conftest import WMSServer, fresh_database
from tests.jdl import jdl_text

MAX_SANDBOX = 64 * 1024
TIMEOUT = 30


# --- fixtures and helpers --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WMSServer]:
    srv = WMSServer(tmp_path_factory.mktemp("api") / "wms", maintenance_interval=0, max_sandbox_size=MAX_SANDBOX)
    srv.start()
    yield srv
    srv.stop()


@dataclass
class Api:
    """Requests against one server, with tokens of the test's own owner, group, site and pilot stamps.

    An adapter, not a second server wrapper: it keeps each test's jobs to its own owner and site on the module's
    shared :class:`WMSServer`, and hands back raw responses because these tests check refusals.
    """

    server: WMSServer
    owner: str
    site: str

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, role: str, owner: str = "", group: str = "galaxy_user", **claims: Any) -> str:
        return create_token(self.server.key, role=role, owner=owner or self.owner, group=group, **claims)

    def headers(self, role: str = "runner", owner: str = "", **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, owner, **claims)}"}

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        response = requests.request(method, f"{self.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text}"
        return response

    def jdl(self, **attrs: Any) -> str:
        attrs.setdefault("Site", self.site)  # every job of this module names its test's site: no cross-test matches
        return jdl_text(**attrs)

    def submit(self, n: int = 1, owner: str = "", **attrs: Any) -> list[int]:
        response = self.call("POST", "/api/jobs/jdl", self.headers("runner", owner), json=[self.jdl(**attrs)] * n)
        assert response.status_code in (200, 201), response.text
        return [j["JobID"] for j in response.json()]

    def jobs_of(self, owner: str = "", **extra: Any) -> list[dict[str, Any]]:
        """Every job of an owner, as an admin sees them."""
        search = [{"parameter": "Owner", "operator": "eq", "value": owner or self.owner}]
        response = self.call(
            "POST", "/api/jobs/search", self.headers("admin", "admin"), json={"search": search, **extra}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.call("GET", f"/api/x-embedded/jobs/{job_id}", self.headers("admin", "admin"))
        assert response.status_code == 200, response.text
        return response.json()

    def match(self, **slot: Any) -> requests.Response:
        slot.setdefault("Site", self.site)
        return self.call("POST", "/api/x-embedded/match", self.headers("pilot", "pilot"), json=slot)

    def match_token(self, **slot: Any) -> tuple[int, dict[str, str]]:
        response = self.match(**slot)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["JobID"], {"Authorization": f"Bearer {body['Token']}"}

    def status(self, headers: dict[str, str], job_id: int, **fields: Any) -> requests.Response:
        return self.call("PATCH", "/api/jobs/status", headers, json={str(job_id): {now(): fields}})

    def heartbeat(self, headers: dict[str, str], job_id: int, **fields: Any) -> requests.Response:
        return self.call("PATCH", "/api/jobs/heartbeat", headers, json={str(job_id): fields})

    def reschedule(self, headers: dict[str, str], *job_ids: int) -> requests.Response:
        return self.call("POST", "/api/jobs/reschedule", headers, json={"job_ids": list(job_ids)})

    def demand(self) -> int:
        """Waiting jobs of this test's owner in the task-queue demand."""
        response = self.call("GET", "/api/x-embedded/taskqueues/demand", self.headers("reader", "monitor"))
        assert response.status_code == 200, response.text
        return sum(q["WaitingJobs"] for q in response.json() if q["Owner"] == self.owner)

    def upload(self, headers: dict[str, str], data: bytes, fmt: str = "tar.bz2") -> tuple[str, dict[str, Any]]:
        """Ask for an upload target and PUT the bytes there; returns (pfn, the first answer)."""
        answer = self.call("POST", "/api/jobs/sandbox", headers, json=sandbox_info(data, fmt))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if body["url"] is not None:
            put = requests.put(body["url"], data=data, timeout=TIMEOUT)
            assert put.status_code == 204, put.text
        return body["pfn"], body

    def download(self, headers: dict[str, str], pfn: str) -> requests.Response:
        answer = self.call("GET", "/api/jobs/sandbox", headers, params={"pfn": pfn})
        if answer.status_code != 200:
            return answer
        assert answer.json()["expires_in"] > 0
        return requests.get(answer.json()["url"], timeout=TIMEOUT)


@pytest.fixture
def api(server: WMSServer) -> Api:
    tag = uuid.uuid4().hex[:10]
    return Api(server, owner=f"user{tag}", site=f"SITE.{tag}.org")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def sandbox_info(data: bytes, fmt: str = "tar.bz2") -> dict[str, Any]:
    return {"checksum_algorithm": "sha256", "checksum": hashlib.sha256(data).hexdigest(), "size": len(data),
            "format": fmt}


def bare(pfn: str) -> str:
    """``SB:SandboxSE|/S3/...`` → ``/S3/...``, the form DiracX lists a job's sandboxes in."""
    return pfn.split("|", 1)[-1]


def detail(response: requests.Response) -> str:
    return str(response.json()["detail"])


# --- authentication ---------------------------------------------------------------------------------------------------
def _bad_credentials(server: WMSServer) -> dict[str, tuple[dict[str, str], str]]:
    key = server.key
    other = create_token(b"another-servers-secret-0123456789abcdef", role="runner", owner="mallory")
    expired = create_token(key, role="runner", owner="mallory", lifetime=-60)
    wizard = jwt.encode(
        {"iss": "galaxy-dirac-wms", "sub": "mallory", "role": "wizard", "exp": int(time.time()) + 600}, key, "HS256"
    )
    return {
        "none": ({}, "Authorization header is missing"),
        "empty": ({"Authorization": "Bearer "}, "Authorization header is missing"),
        "basic": ({"Authorization": "Basic bWFsbG9yeTpwdw=="}, "Authorization header is missing"),
        "malformed": ({"Authorization": "Bearer not.a.jwt"}, "invalid token"),
        "badly signed": ({"Authorization": f"Bearer {other}"}, "signature does not verify"),
        "expired": ({"Authorization": f"Bearer {expired}"}, "token expired"),
        "unknown role": ({"Authorization": f"Bearer {wizard}"}, "unknown role"),
    }


@pytest.mark.parametrize("case", ["none", "empty", "basic", "malformed", "badly signed", "expired", "unknown role"])
def test_untrusted_tokens_are_401_with_a_clear_detail(api: Api, case: str) -> None:
    headers, expected = _bad_credentials(api.server)[case]
    for method, path, body in [
        ("POST", "/api/jobs/search", {}),
        ("POST", "/api/jobs/jdl", [api.jdl(JobName="intruder")]),
        ("POST", "/api/x-embedded/match", {"Site": api.site}),
        ("GET", "/api/x-embedded/taskqueues/demand", None),
    ]:
        response = api.call(method, path, headers, json=body)
        assert response.status_code == 401, (path, response.text)
        assert expected in detail(response), (path, detail(response))
        assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert api.jobs_of("mallory") == []


def test_pilot_token_may_not_submit_search_or_touch_jobs(api: Api) -> None:
    [job_id] = api.submit()
    pilot = api.headers("pilot", "pilot")
    for method, path, body in [
        ("POST", "/api/jobs/jdl", [api.jdl()]),
        ("POST", "/api/jobs/search", {}),
        ("POST", "/api/jobs/summary", {"grouping": ["Status"]}),
        ("PATCH", "/api/jobs/status", {str(job_id): {now(): {"Status": "Killed"}}}),
        ("PATCH", "/api/jobs/heartbeat", {str(job_id): {"CPUConsumed": 1.0}}),
    ]:
        response = api.call(method, path, pilot, json=body)
        assert response.status_code == 403, (path, response.text)
        assert "pilot" in detail(response)
    assert api.reschedule(pilot, job_id).status_code == 403
    assert [j["Status"] for j in api.jobs_of()] == ["Waiting"]
    assert len(api.jobs_of()) == 1  # the refused submission wrote nothing


def test_reader_searches_every_owner_but_may_not_submit_or_change(api: Api) -> None:
    [job_id] = api.submit()
    reader = api.headers("reader", "monitor")
    found = api.call("POST", "/api/jobs/search", reader,
                     json={"search": [{"parameter": "JobID", "operator": "eq", "value": job_id}]})
    assert found.status_code == 200 and [j["Owner"] for j in found.json()] == [api.owner]
    summary = api.call("POST", "/api/jobs/summary", reader,
                       json={"grouping": ["Owner"], "search": [{"parameter": "Owner", "operator": "eq",
                                                                "value": api.owner}]})
    assert summary.json() == [{"Owner": api.owner, "count": 1}]
    submit = api.call("POST", "/api/jobs/jdl", reader, json=[api.jdl()])
    assert submit.status_code == 403 and "reader" in detail(submit)
    kill = api.status(reader, job_id, Status="Killed")
    assert kill.status_code == 403 and "reader" in detail(kill)
    assert len(api.jobs_of("monitor")) == 0
    assert api.job(job_id)["Status"] == "Waiting"


def test_runner_sees_and_changes_only_its_own_jobs(api: Api) -> None:
    [job_id] = api.submit()
    alice, bob = api.headers(), api.headers("runner", owner=f"{api.owner}bob")
    by_id = {"search": [{"parameter": "JobID", "operator": "eq", "value": job_id}]}
    assert [j["JobID"] for j in api.call("POST", "/api/jobs/search", alice, json=by_id).json()] == [job_id]
    assert api.call("POST", "/api/jobs/search", bob, json=by_id).json() == []
    assert api.call("POST", "/api/jobs/summary", bob, json={"grouping": ["Owner"], **by_id}).json() == []

    kill = api.status(bob, job_id, Status="Killed")
    assert kill.status_code in (200, 403), kill.text
    if kill.status_code == 200:
        assert kill.json()["success"] == {}
        assert "another owner" in kill.json()["failed"][str(job_id)]["detail"]
    resched = api.reschedule(bob, job_id)
    assert resched.status_code in (200, 403), resched.text
    if resched.status_code == 200:
        assert str(job_id) in resched.json()["failed"] and resched.json()["success"] == {}
    for path in (f"/api/jobs/{job_id}/sandbox", f"/api/jobs/{job_id}/sandbox/input", f"/api/x-embedded/jobs/{job_id}"):
        response = api.call("GET", path, bob)
        assert response.status_code == 403 and "another owner" in detail(response), (path, response.text)

    job = api.job(job_id)
    assert (job["Status"], job["RescheduleCounter"]) == ("Waiting", 0)
    assert api.demand() == 1


def test_job_token_acts_on_its_own_job_until_rescheduled(api: Api) -> None:
    first, second = api.submit(2)
    job_id, job = api.match_token()
    assert job_id == first  # oldest first within one task queue
    claims = verify_token(api.server.key, job["Authorization"].split()[1])
    assert (claims.role, claims.job_id, claims.owner, claims.run) == ("job", first, api.owner, 0)

    assert api.heartbeat(job, first, CPUConsumed=1.5, StandardOutput="hello\n").json() == []
    running = api.status(job, first, Status="Running", MinorStatus="Application", Source="JobWrapper")
    assert running.status_code == 200 and running.json()["success"][str(first)]["Status"] == "Running"
    assert api.job(first)["Parameters"]["StandardOutput"] == "hello\n"

    for response in (api.heartbeat(job, second, CPUConsumed=1.0), api.status(job, second, Status="Killed")):
        assert response.status_code == 403 and f"not job {second}" in detail(response), response.text
    for method, path, body in [("POST", "/api/jobs/search", {}), ("POST", "/api/jobs/jdl", [api.jdl()])]:
        assert api.call(method, path, job, json=body).status_code == 403
    assert api.call("POST", "/api/x-embedded/match", job, json={"Site": api.site}).status_code == 403
    assert api.job(second)["Status"] == "Waiting"

    rescheduled = api.reschedule(api.headers(), first)
    assert rescheduled.status_code == 200 and str(first) in rescheduled.json()["success"]
    for response in (api.heartbeat(job, first, CPUConsumed=2.0), api.status(job, first, Status="Done")):
        assert response.status_code == 403 and "rescheduled" in detail(response), response.text
    assert (api.job(first)["Status"], api.job(first)["RescheduleCounter"]) == ("Waiting", 1)


# --- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "attribute"),
    [
        ('[ Executable = "/bin/true"; JobName = ]', "JobName"),
        ('[ Executable = "/bin/true"; CPUTime = "abc"; ]', "CPUTime"),
        ('[ Executable = "/bin/true"; NumberOfProcessors = "many"; ]', "NumberOfProcessors"),
        ('[ Executable = "/bin/true"; Priority = {1, 2}; ]', "Priority"),
        ('[ Executable = "/bin/true"; MinRAM = 10; MaxRAM = 5; ]', "MaxRAM"),
        ('[ Executable = "/bin/true"; StdOutput = "/etc/passwd"; ]', "StdOutput"),
        ('[ JobName = "no executable"; ]', "Executable"),
        ('[ Executable = "/bin/true"; Parameters = 3; ]', "Parameters"),
        ('[ Executable = "/bin/true"; Parameters = {"a", "b"}; ParameterStart = 1; ]', "Parameters"),
    ],
)
def test_a_bad_jdl_in_a_list_refuses_the_whole_list(api: Api, bad: str, attribute: str) -> None:
    response = api.call("POST", "/api/jobs/jdl", api.headers(), json=[api.jdl(), bad, api.jdl()])
    assert response.status_code == 400, response.text
    assert detail(response).startswith("JDL #1: ") and attribute in detail(response), detail(response)
    if attribute == "Parameters":
        assert "parametric" in detail(response)
    assert api.jobs_of() == []
    assert api.demand() == 0


def test_syntax_error_names_the_jdl_and_position(api: Api) -> None:
    response = api.call("POST", "/api/jobs/jdl", api.headers(), json=[api.jdl(), api.jdl(), "junk"])
    assert response.status_code == 400
    assert detail(response).startswith("JDL #2: ") and "line 1, column" in detail(response)
    assert api.jobs_of() == []


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ([], 400, "no JDL given"),
        ({"Executable": "/bin/true"}, 422, "valid list"),
        ([1, 2], 422, "valid string"),
        ("[ Executable = \"/bin/true\"; ]", 422, "valid list"),
    ],
)
def test_submission_body_of_the_wrong_shape(api: Api, body: Any, status: int, expected: str) -> None:
    response = api.call("POST", "/api/jobs/jdl", api.headers(), json=body)
    assert response.status_code == status, response.text
    assert expected in detail(response)
    assert api.jobs_of() == []


def test_oversized_bodies_are_413_and_write_nothing(wms_server_factory: Any) -> None:
    server = wms_server_factory("small", maintenance_interval=0, max_request_size=2048)
    api = Api(server, owner="bigsender", site="SITE.small.org")
    headers = api.headers()
    many = [api.jdl(JobName=f"job{i:03d}") for i in range(60)]
    assert len(str(many)) > 2048
    response = api.call("POST", "/api/jobs/jdl", headers, json=many)
    assert response.status_code == 413 and "2048 bytes" in detail(response)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        data = json.dumps(many).encode()
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    chunked = api.call("POST", "/api/jobs/jdl", {**headers, "Content-Type": "application/json"}, data=chunks())
    assert chunked.status_code == 413, chunked.text
    assert "2048 bytes" in detail(chunked)
    assert api.jobs_of() == []
    assert len(api.submit(3)) == 3  # the same server still takes requests under the limit


def test_unknown_job_ids_are_404_or_failed_entries(api: Api) -> None:
    [known] = api.submit()
    unknown = known + 10**6
    runner, admin = api.headers(), api.headers("admin", "admin")

    only_unknown = api.status(runner, unknown, Status="Killed")
    assert only_unknown.status_code == 404 and f"job {unknown} not found" in detail(only_unknown)
    body = {str(known): {now(): {"MinorStatus": "still here"}}, str(unknown): {now(): {"Status": "Killed"}}}
    mixed = api.call("PATCH", "/api/jobs/status", runner, json=body)
    assert mixed.status_code == 200
    assert mixed.json()["failed"] == {str(unknown): {"detail": f"job {unknown} not found"}}
    assert mixed.json()["success"][str(known)]["MinorStatus"] == "still here"

    heartbeat = api.heartbeat(admin, unknown, CPUConsumed=1.0)
    assert heartbeat.status_code == 404 and "not found" in detail(heartbeat)
    resched = api.reschedule(runner, unknown)
    assert resched.status_code in (200, 404)
    if resched.status_code == 200:
        assert resched.json() == {"success": {}, "failed": {str(unknown): {"detail": f"job {unknown} not found"}}}
    for method, path, kwargs in [
        ("GET", f"/api/jobs/{unknown}/sandbox", {}),
        ("GET", f"/api/jobs/{unknown}/sandbox/input", {}),
        ("GET", f"/api/jobs/{unknown}/sandbox/output", {}),
        ("PATCH", f"/api/jobs/{unknown}/sandbox/output", {"json": "SB:SandboxSE|/S3/sandboxes/x/sha256:0.tar"}),
        ("GET", f"/api/x-embedded/jobs/{unknown}", {}),
    ]:
        response = api.call(method, path, runner, **kwargs)
        assert response.status_code == 404 and "not found" in detail(response), (path, response.text)


@pytest.mark.parametrize(
    "request_",
    [
        ("PATCH", "/api/jobs/status", {"json": {str(2**70): {"2030-01-01T00:00:00Z": {"Status": "Killed"}}}}),
        ("PATCH", "/api/jobs/heartbeat", {"json": {str(2**70): {"CPUConsumed": 1.0}}}),
        ("POST", "/api/jobs/reschedule", {"json": {"job_ids": [2**70]}}),
        ("GET", f"/api/jobs/{2**70}/sandbox", {}),
        ("GET", f"/api/x-embedded/jobs/{2**70}", {}),
        ("POST", "/api/jobs/search", {"json": {"search": [{"parameter": "JobID", "operator": "eq", "value": 10**30}]}}),
        ("POST", "/api/jobs/search?page=99999999999999999999", {"json": {}}),
        ("POST", "/api/x-embedded/match", {"json": {"Site": "x", "CPUTime": 10**20}}),
    ],
    ids=["status", "heartbeat", "reschedule", "sandbox", "details", "search-value", "search-page", "match-cputime"],
)
def test_integers_beyond_64_bits_are_refused_not_overflowed(api: Api, request_: tuple) -> None:
    method, path, kwargs = request_
    response = api.call(method, path, api.headers("admin", "admin"), **kwargs)
    if "search" in path and "value" in str(kwargs):
        assert response.status_code in (200, 400, 422) and response.json() in ([], response.json()), response.text
    else:
        assert response.status_code in (400, 404, 422), response.text


@pytest.mark.parametrize(
    ("body", "query", "expected"),
    [
        ({"search": [{"parameter": "Status", "operator": "resembles", "value": "x"}]}, "", "'resembles'"),
        ({"search": [{"parameter": "Colour", "operator": "eq", "value": "x"}]}, "", "'Colour'"),
        ({"search": [{"parameter": "JobID", "operator": "in", "value": 1}]}, "", "'values'"),
        ({"search": [{"parameter": "JobID", "operator": "eq"}]}, "", "'value'"),
        ({"search": [{"parameter": "JobID", "operator": "eq", "value": "seven"}]}, "", "not an integer"),
        ({"search": [{"parameter": "LastUpdateTime", "operator": "gt", "value": "yesterday"}]}, "", "ISO"),
        ({"search": [{"parameter": "JobID", "operator": "eq", "value": [1, 2]}]}, "", "value"),
        ({"search": [{"parameter": "JobID", "operator": "in", "values": [{"a": 1}]}]}, "", "values"),
        ({"sort": [{"parameter": "Colour"}]}, "", "'Colour'"),
        ({"sort": [{"parameter": "JobID", "direction": "sideways"}]}, "", "asc"),
        ({"parameters": ["JobID", "Colour"]}, "", "'Colour'"),
        ({}, "?page=0", "page"),
        ({}, "?per_page=100001", "per_page"),
    ],
)
def test_bad_search_requests_say_what_is_wrong(api: Api, body: dict, query: str, expected: str) -> None:
    """400 from the scheduler's own checks or 422 from the body models (DiracX answers 422 for malformed specs)."""
    response = api.call("POST", f"/api/jobs/search{query}", api.headers(), json=body)
    assert response.status_code in (400, 422), response.text
    assert expected in str(response.json()["detail"])


def test_bad_summary_requests(api: Api) -> None:
    for body, expected in [({"grouping": []}, "grouping"), ({"grouping": ["Colour"]}, "'Colour'"), ({}, "grouping")]:
        response = api.call("POST", "/api/jobs/summary", api.headers(), json=body)
        assert response.status_code in (400, 422) and expected in str(response.json()["detail"]), response.text


@pytest.mark.parametrize(
    "spec",
    [
        {"parameter": "Status", "operator": "gt", "value": True},
        {"parameter": "JobID", "operator": "lt", "value": False},
    ],
)
def test_search_values_unusable_with_the_operator_are_400(api: Api, spec: dict) -> None:
    response = requests.post(f"{api.url}/api/jobs/search", headers=api.headers(), json={"search": [spec]},
                             timeout=TIMEOUT)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("time_key", "fields", "status"),
    [
        ("not-a-time", {"Status": "Killed"}, 422),
        ("2024-13-45T99:00:00", {"Status": "Killed"}, 422),
        ("", {"Status": "Killed"}, 422),
        ("NOW", {"MinorStatus": "x"}, 422),
        ("2030-01-01T00:00:00Z", {"Colour": "red"}, 422),
        ("2030-01-01T00:00:00Z", {"Status": ["Killed"]}, 422),
    ],
)
def test_malformed_status_updates_are_refused(api: Api, time_key: str, fields: dict, status: int) -> None:
    [job_id] = api.submit()
    response = api.call("PATCH", "/api/jobs/status", api.headers(), json={str(job_id): {time_key: fields}})
    assert response.status_code == status, response.text
    job = api.job(job_id)
    assert (job["Status"], job["MinorStatus"]) == ("Waiting", "Pilot Agent Submission")
    assert len(job["History"]) == 3  # Received, Checking, Waiting: nothing was recorded


def test_unknown_status_is_a_failed_entry_and_changes_nothing(api: Api) -> None:
    [job_id] = api.submit()
    response = api.status(api.headers(), job_id, Status="Exploded", MinorStatus="boom")
    assert response.status_code == 200
    assert "unknown status 'Exploded'" in response.json()["failed"][str(job_id)]["detail"]
    job = api.job(job_id)
    assert (job["Status"], job["MinorStatus"]) == ("Waiting", "Pilot Agent Submission")
    assert "rejected" in job["History"][-1]["Source"]
    empty = api.call("PATCH", "/api/jobs/status", api.headers(), json={})
    assert empty.status_code == 400 and "no status updates" in detail(empty)


# --- search pagination, sort, summary ---------------------------------------------------------------------------------
def test_search_pages_with_content_range(api: Api) -> None:
    ids = api.submit(5)
    runner = api.headers()
    body = {"search": [{"parameter": "Owner", "operator": "eq", "value": api.owner}], "parameters": ["JobID"]}
    seen = []
    for page, expected_range in [(1, "jobs 0-1/5"), (2, "jobs 2-3/5"), (3, "jobs 4-4/5")]:
        response = api.call("POST", f"/api/jobs/search?page={page}&per_page=2", runner, json=body)
        assert response.status_code == 206, response.text
        assert response.headers["Content-Range"] == expected_range
        seen += [j["JobID"] for j in response.json()]
    assert seen == ids
    past = api.call("POST", "/api/jobs/search?page=4&per_page=2", runner, json=body)
    assert past.status_code == 416 and past.headers["Content-Range"] == "jobs */5"
    assert past.json() == [] or "past the last" in detail(past)  # DiracX answers an empty list, no rows either way
    whole = api.call("POST", "/api/jobs/search?per_page=5", runner, json=body)
    assert whole.status_code == 200 and "Content-Range" not in whole.headers
    assert [j["JobID"] for j in whole.json()] == ids
    assert whole.json()[0] == {"JobID": ids[0]}  # only the parameters asked for


def test_search_sort_and_distinct(api: Api) -> None:
    ids = {}
    for name in ("bravo", "charlie", "alpha", "bravo"):
        ids.setdefault(name, []).extend(api.submit(JobName=name))
    mine = [{"parameter": "Owner", "operator": "eq", "value": api.owner}]
    asc = api.call("POST", "/api/jobs/search", api.headers(),
                   json={"search": mine, "sort": [{"parameter": "JobName", "direction": "asc"}],
                         "parameters": ["JobName", "JobID"]}).json()
    assert [(j["JobName"], j["JobID"]) for j in asc] == [
        ("alpha", ids["alpha"][0]), ("bravo", ids["bravo"][0]), ("bravo", ids["bravo"][1]),
        ("charlie", ids["charlie"][0]),
    ]
    desc = api.call("POST", "/api/jobs/search", api.headers(),
                    json={"search": mine, "sort": [{"parameter": "JobID", "direction": "desc"}]}).json()
    assert [j["JobID"] for j in desc] == sorted(sum(ids.values(), []), reverse=True)
    distinct = api.call("POST", "/api/jobs/search", api.headers(),
                        json={"search": mine, "parameters": ["JobName"], "distinct": True,
                              "sort": [{"parameter": "JobName", "direction": "desc"}]}).json()
    assert distinct == [{"JobName": "charlie"}, {"JobName": "bravo"}, {"JobName": "alpha"}]
    like = api.call("POST", "/api/jobs/search", api.headers(),
                    json={"search": [*mine, {"parameter": "JobName", "operator": "like", "value": "%a%lie"}]}).json()
    assert [j["JobID"] for j in like] == ids["charlie"]
    not_in = api.call("POST", "/api/jobs/search", api.headers(),
                      json={"search": [*mine, {"parameter": "JobName", "operator": "not in",
                                               "values": ["bravo", "charlie"]}]}).json()
    assert [j["JobID"] for j in not_in] == ids["alpha"]


def test_summary_groups_and_counts(api: Api) -> None:
    ids = api.submit(2, JobName="one") + api.submit(1, JobName="two")
    assert api.status(api.headers(), ids[0], Status="Killed").status_code == 200
    mine = [{"parameter": "Owner", "operator": "eq", "value": api.owner}]
    by_status = api.call("POST", "/api/jobs/summary", api.headers(),
                         json={"grouping": ["Status"], "search": mine}).json()
    assert by_status == [{"Status": "Killed", "count": 1}, {"Status": "Waiting", "count": 2}]
    both = api.call("POST", "/api/jobs/summary", api.headers(),
                    json={"grouping": ["JobName", "Status"], "search": mine}).json()
    assert both == [
        {"JobName": "one", "Status": "Killed", "count": 1},
        {"JobName": "one", "Status": "Waiting", "count": 1},
        {"JobName": "two", "Status": "Waiting", "count": 1},
    ]
    unfiltered = api.call("POST", "/api/jobs/summary", api.headers(), json={"grouping": ["Owner"]}).json()
    assert unfiltered == [{"Owner": api.owner, "count": 3}]  # a runner's summary covers its own jobs only


# --- sandboxes --------------------------------------------------------------------------------------------------------
def test_sandbox_put_upload_dedup_and_download(api: Api) -> None:
    data = os.urandom(3000)
    alice = api.headers()
    pfn, first = api.upload(alice, data)
    assert first["url"] is not None and "/api/x-embedded/sandboxes/upload/" in first["url"]
    assert pfn == (f"SB:SandboxSE|/S3/sandboxes/galaxy/galaxy_user/{api.owner}/"
                   f"sha256:{hashlib.sha256(data).hexdigest()}.tar.bz2")
    again = api.call("POST", "/api/jobs/sandbox", alice, json=sandbox_info(data))
    assert again.status_code == 200 and again.json()["url"] is None and again.json()["pfn"] == pfn
    download = api.download(alice, pfn)
    assert download.status_code == 200 and download.content == data

    # The same bytes from another owner: a pfn of their own, readable only once they uploaded the bytes themselves
    # (dedup within one owner, as DiracX: knowing a checksum must not give access to another owner's sandbox).
    bob = api.headers("runner", f"{api.owner}bob")
    bob_answer = api.call("POST", "/api/jobs/sandbox", bob, json=sandbox_info(data)).json()
    assert bob_answer["url"] is not None and bob_answer["pfn"] != pfn and f"/{api.owner}bob/" in bob_answer["pfn"]
    assert api.download(bob, bob_answer["pfn"]).status_code == 404
    assert requests.put(bob_answer["url"], data=data, timeout=TIMEOUT).status_code == 204
    assert api.download(bob, bob_answer["pfn"]).content == data
    assert api.download(bob, pfn).status_code == 403


def test_sandbox_multipart_upload(api: Api) -> None:
    data = os.urandom(2000)
    answer = api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(data, "tar.gz")).json()
    assert answer["fields"] and answer["url"]
    upload = requests.post(answer["url"], data=answer["fields"], files={"file": ("sb.tar.gz", data)}, timeout=TIMEOUT)
    assert upload.status_code == 204, upload.text
    assert api.download(api.headers(), answer["pfn"]).content == data
    assert api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(data, "tar.gz")).json()["url"] is None


def test_sandbox_with_the_wrong_checksum_is_never_usable(api: Api) -> None:
    data, lie = os.urandom(1000), os.urandom(1000)
    answer = api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(lie)).json()
    put = requests.put(answer["url"], data=data, timeout=TIMEOUT)
    assert put.status_code == 400 and "sha256" in detail(put)
    submit = api.call("POST", "/api/jobs/jdl", api.headers(), json=[api.jdl(InputSandbox=[answer["pfn"]])])
    assert submit.status_code == 400 and "input sandbox not found" in detail(submit)
    assert api.jobs_of() == []
    assert api.download(api.headers(), answer["pfn"]).status_code == 404
    # Asking again still wants an upload: nothing was stored under that checksum.
    assert api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(lie)).json()["url"] is not None


def test_sandbox_size_limits(api: Api) -> None:
    too_big = sandbox_info(b"x")
    too_big["size"] = MAX_SANDBOX + 1
    response = api.call("POST", "/api/jobs/sandbox", api.headers(), json=too_big)
    assert response.status_code == 413 and str(MAX_SANDBOX) in detail(response)

    data = os.urandom(500)
    answer = api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(data)).json()
    longer = requests.put(answer["url"], data=data + b"more", timeout=TIMEOUT)
    assert longer.status_code == 413, longer.text
    shorter = requests.put(answer["url"], data=data[:-1], timeout=TIMEOUT)
    assert shorter.status_code == 400, shorter.text
    assert api.download(api.headers(), answer["pfn"]).status_code == 404
    assert requests.put(answer["url"], data=data, timeout=TIMEOUT).status_code == 204  # the ticket still works


def test_sandbox_tickets_cannot_be_tampered_with_or_reused_after_expiry(api: Api) -> None:
    data = os.urandom(700)
    answer = api.call("POST", "/api/jobs/sandbox", api.headers(), json=sandbox_info(data)).json()
    base, ticket = answer["url"].rsplit("/", 1)
    body, signature = ticket.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    other_key = make_ticket(b"another-secret", answer["fields"]["key"], "upload", 600, {"size": len(data)})
    key = api.server.key
    principal = {"role": "runner", "owner": api.owner, "group": "galaxy_user", "vo": "galaxy"}
    expired = make_ticket(key, answer["fields"]["key"], "upload", 60,
                          {"size": len(data), "pfn": answer["pfn"].split("|", 1)[1], "principal": principal},
                          now=time.time() - 3600)
    download_ticket = make_ticket(key, answer["fields"]["key"], "download", 600)
    for bad, expected in [
        (f"{body}.{flipped}", "signature"),
        (f"{body[:-4]}AAAA.{signature}", "signature"),
        (other_key, "signature"),
        (expired, "expired"),
        (download_ticket, "'download'"),
        ("garbage", "malformed"),
    ]:
        response = requests.put(f"{base}/{bad}", data=data, timeout=TIMEOUT)
        assert response.status_code == 400 and expected in detail(response), (bad, response.text)
    assert api.download(api.headers(), answer["pfn"]).status_code == 404
    bad_download = requests.get(f"{api.url}/api/x-embedded/sandboxes/download/{body}.{flipped}", timeout=TIMEOUT)
    assert bad_download.status_code == 400


def test_sandboxes_through_a_job_lifetime(api: Api) -> None:
    alice = api.headers()
    inputs = os.urandom(4000)
    input_pfn, _ = api.upload(alice, inputs)
    [job_id] = api.submit(InputSandbox=[input_pfn])
    [other_job] = api.submit()
    assert api.call("GET", f"/api/jobs/{job_id}/sandbox/input", alice).json() == [bare(input_pfn)]
    assert api.call("GET", f"/api/jobs/{job_id}/sandbox", alice).json() == {"Input": [bare(input_pfn)], "Output": []}

    matched, job = api.match_token()
    assert matched == job_id
    assert api.call("GET", f"/api/jobs/{job_id}/sandbox/input", job).json() == [bare(input_pfn)]
    assert api.download(job, input_pfn).content == inputs

    outputs = os.urandom(2500)
    output_pfn, _ = api.upload(job, outputs)
    assert f"/{api.owner}/" in output_pfn  # stored under the job's owner
    refused = api.call("PATCH", f"/api/jobs/{other_job}/sandbox/output", job, json=output_pfn)
    assert refused.status_code == 403
    assigned = api.call("PATCH", f"/api/jobs/{job_id}/sandbox/output", job, json=output_pfn)
    assert assigned.status_code == 200, assigned.text
    assert api.call("GET", f"/api/jobs/{other_job}/sandbox/output", alice).json() == []

    listed = api.call("GET", f"/api/jobs/{job_id}/sandbox/output", alice).json()
    assert listed == [bare(output_pfn)]
    assert api.download(alice, listed[0]).content == outputs  # the listed form is a valid pfn too
    assert api.download(alice, output_pfn).content == outputs
    bob = api.headers("runner", f"{api.owner}bob")
    for pfn in (input_pfn, output_pfn):
        assert api.download(bob, pfn).status_code == 403
    assert api.call("GET", f"/api/jobs/{job_id}/sandbox/output", bob).status_code == 403
    stolen = api.call("PATCH", f"/api/jobs/{job_id}/sandbox/output", bob, json=output_pfn)
    assert stolen.status_code == 403


def test_submitting_another_owners_sandbox_is_refused(api: Api) -> None:
    pfn, _ = api.upload(api.headers(), os.urandom(300))
    bob = f"{api.owner}bob"
    response = api.call("POST", "/api/jobs/jdl", api.headers("runner", bob), json=[api.jdl(InputSandbox=[pfn])])
    assert response.status_code == 403 and "another owner" in detail(response)
    assert api.jobs_of(bob) == []


# --- kill -------------------------------------------------------------------------------------------------------------
def test_kill_reaches_the_running_job_at_its_next_heartbeat_exactly_once(api: Api) -> None:
    [job_id] = api.submit()
    matched, job = api.match_token()
    assert matched == job_id
    running = api.status(job, job_id, Status="Running", MinorStatus="Application", Source="JobWrapper")
    assert running.json()["success"][str(job_id)]["Status"] == "Running"
    assert api.heartbeat(job, job_id, CPUConsumed=1.0).json() == []

    kill = api.status(api.headers(), job_id, Status="Killed")
    assert kill.status_code == 200 and kill.json()["success"][str(job_id)]["Status"] == "Killed"
    commands = api.heartbeat(job, job_id, CPUConsumed=2.0).json()
    assert [(c["job_id"], c["command"]) for c in commands] == [(job_id, "Kill")]
    assert not commands[0]["arguments"]
    assert api.heartbeat(job, job_id, CPUConsumed=3.0).json() == []
    assert api.job(job_id)["Status"] == "Killed"


def test_a_waiting_command_poll_returns_the_kill_as_it_is_queued_and_only_to_its_job(api: Api) -> None:
    [job_id, other] = api.submit(2)
    tokens = {}
    for _ in range(2):
        matched, token = api.match_token()
        tokens[matched] = token
    job = tokens[job_id]
    api.status(job, job_id, Status="Running", MinorStatus="Application", Source="JobWrapper")
    path = f"/api/x-embedded/jobs/{job_id}/commands"
    assert api.call("GET", path, job).json() == []  # nothing pending: an immediate empty answer
    assert api.call("GET", path, tokens[other]).status_code in (403, 404)  # another job's token
    assert api.call("GET", f"/api/x-embedded/jobs/{other}/commands", api.headers()).status_code == 403  # a runner
    for wait in ("1000", "nan", "inf", "-1", "x"):
        assert api.call("GET", path, job, params={"wait": wait}).status_code == 422, wait

    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(api.call, "GET", path, job, params={"wait": 60})
        time.sleep(0.5)
        assert not poll.done()
        assert api.status(api.headers(), job_id, Status="Killed").status_code == 200
        answer = poll.result(timeout=30)  # well before the 60 s the poll may wait
    assert [(c["job_id"], c["command"]) for c in answer.json()] == [(job_id, "Kill")]
    assert api.heartbeat(job, job_id, CPUConsumed=1.0).json() == []  # handed out once, not again by heartbeat


def test_the_command_poll_refuses_a_job_token_from_before_a_reschedule(api: Api) -> None:
    [job_id] = api.submit()
    matched, stale = api.match_token()
    assert matched == job_id
    api.status(stale, job_id, Status="Running", MinorStatus="Application", Source="JobWrapper")
    assert api.reschedule(api.headers(), job_id).status_code == 200
    refused = api.call("GET", f"/api/x-embedded/jobs/{job_id}/commands", stale, params={"wait": 5})
    assert refused.status_code in (403, 404), refused.text


def test_killing_waiting_jobs_removes_them_from_the_demand(api: Api) -> None:
    first, second = api.submit(2)
    assert api.demand() == 2
    assert api.status(api.headers(), first, Status="Killed").json()["success"][str(first)]["Status"] == "Killed"
    assert api.demand() == 1
    api.status(api.headers(), second, Status="Killed")
    assert api.demand() == 0
    assert api.match().status_code == 204  # nothing left to hand out
    assert {j["Status"] for j in api.jobs_of()} == {"Killed"}


# --- pilots -----------------------------------------------------------------------------------------------------------
def test_pilot_registry_match_links_and_empty_pilots(api: Api) -> None:
    pilot = api.headers("pilot", "pilot")
    busy, idle = f"b{uuid.uuid4().hex[:12]}", f"i{uuid.uuid4().hex[:12]}"
    added = api.call("POST", "/api/x-embedded/pilots", pilot,
                     json={"stamps": [busy, idle], "queue": "q1", "site": api.site, "ce": "ce.example.org",
                           "grid_type": "HTCondorCE", "references": {busy: "htcondor://ce/1.0"}})
    assert added.status_code == 200, added.text
    assert set(added.json()) == {busy, idle}

    def pilot_row(stamp: str) -> dict[str, Any]:
        rows = api.call("GET", "/api/x-embedded/pilots", pilot, params={"stamp": stamp}).json()
        assert len(rows) == 1
        return rows[0]

    assert pilot_row(busy)["Status"] == "Submitted"
    assert pilot_row(busy)["PilotJobReference"] == "htcondor://ce/1.0"
    registration = {"site": api.site, "ce": "ce.example.org", "queue": "q1", "hostname": "wn1.example.org"}
    registered = api.call("POST", "/api/x-embedded/pilots/register", pilot, json={"stamp": busy, **registration})
    assert registered.json() == {"PilotID": added.json()[busy], "PilotStamp": busy}
    assert pilot_row(busy)["Status"] == "Running"

    [job_id] = api.submit()
    matched, _ = api.match_token(PilotStamp=busy)
    assert matched == job_id
    row = pilot_row(busy)
    assert (row["MatchedJobs"], row["CurrentJobID"]) == (1, job_id)
    engine = make_engine(f"sqlite:///{(api.server.home / 'wms.sqlite').absolute()}")
    try:
        with read_transaction(engine) as conn:
            links = conn.execute(select(JobToPilotMapping.PilotID).where(JobToPilotMapping.JobID == job_id)).all()
    finally:
        engine.dispose()
    assert [link[0] for link in links] == [added.json()[busy]]

    api.call("POST", "/api/x-embedded/pilots/register", pilot, json={"stamp": idle, **registration})
    assert api.match(PilotStamp=idle).status_code == 204
    done = api.call("PATCH", f"/api/x-embedded/pilots/{idle}", pilot, json={"status": "Done", "matched_jobs": 0})
    assert done.status_code == 200
    assert done.json()["Status"] == "Done" and "Empty pilot" in done.json()["StatusReason"]
    busy_done = api.call("PATCH", f"/api/x-embedded/pilots/{busy}", pilot, json={"status": "Done", "matched_jobs": 1})
    assert "Empty" not in busy_done.json()["StatusReason"]
    assert {r["PilotStamp"] for r in api.call("GET", "/api/x-embedded/pilots", pilot,
                                              params={"stamp": [busy, idle], "status": "Done"}).json()} == {busy, idle}


def test_pilot_routes_refuse_other_roles_and_bad_bodies(api: Api) -> None:
    runner, job_pilot = api.headers(), api.headers("pilot", "pilot")
    stamp = uuid.uuid4().hex[:16]
    for method, path, body in [
        ("POST", "/api/x-embedded/pilots", {"stamps": [stamp]}),
        ("POST", "/api/x-embedded/pilots/register", {"stamp": stamp}),
        ("PATCH", f"/api/x-embedded/pilots/{stamp}", {"status": "Done"}),
        ("POST", "/api/x-embedded/match", {"Site": api.site}),
        ("GET", "/api/x-embedded/pilots", None),
        ("GET", "/api/x-embedded/taskqueues/demand", None),
    ]:
        response = api.call(method, path, runner, json=body)
        assert response.status_code == 403 and "runner" in detail(response), (path, response.text)
    for body, expected in [
        ({"stamps": []}, "no pilot stamps"),
        ({"stamps": ["x" * 33]}, "1 to 32 characters"),
        ({"stamps": [stamp], "queue": "q" * 200}, "queue"),
    ]:
        response = api.call("POST", "/api/x-embedded/pilots", job_pilot, json=body)
        assert response.status_code == 400 and expected in detail(response), response.text
    twice = api.call("POST", "/api/x-embedded/pilots", job_pilot, json={"stamps": [stamp, stamp]})
    assert twice.status_code == 200 and list(twice.json()) == [stamp]
    bad_status = api.call("PATCH", f"/api/x-embedded/pilots/{stamp}", job_pilot, json={"status": "Sleeping"})
    assert bad_status.status_code == 400 and "Sleeping" in detail(bad_status)
    unknown = api.call("PATCH", "/api/x-embedded/pilots/nosuchpilot", job_pilot, json={"status": "Done"})
    assert unknown.status_code == 404
    long_site = api.call("POST", "/api/x-embedded/pilots/register", job_pilot, json={"stamp": stamp, "site": "s" * 200})
    assert long_site.status_code == 400 and "site" in detail(long_site)
    assert api.call("POST", "/api/x-embedded/match", job_pilot, json={"GridCE": "x"}).status_code == 422


# --- OpenAPI ----------------------------------------------------------------------------------------------------------
def test_openapi_lists_the_diracx_routes(api: Api) -> None:
    response = requests.get(f"{api.url}/api/openapi.json", timeout=TIMEOUT)
    assert response.status_code == 200
    paths = response.json()["paths"]
    expected = {
        "/api/jobs/jdl": "post",
        "/api/jobs/search": "post",
        "/api/jobs/summary": "post",
        "/api/jobs/status": "patch",
        "/api/jobs/heartbeat": "patch",
        "/api/jobs/reschedule": "post",
        "/api/jobs/sandbox": "get",
        "/api/jobs/{job_id}/sandbox": "get",
        "/api/jobs/{job_id}/sandbox/{sandbox_type}": "get",
        "/api/jobs/{job_id}/sandbox/output": "patch",
        "/api/x-embedded/match": "post",
        "/api/x-embedded/taskqueues/demand": "get",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), path
    assert "post" in paths["/api/jobs/sandbox"]


# --- PostgreSQL: what only a strict server reveals --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with fresh_database("postgres") as url:
        srv = WMSServer(Path(tmp_path_factory.mktemp("pgapi")) / "wms", url, maintenance_interval=0)
        srv.start()
        try:
            yield Api(srv, owner="pguser", site="SITE.pg.org")
        finally:
            srv.stop()


@pytest.mark.postgres
def test_nul_characters_never_give_500_on_postgresql(pg_api: Api) -> None:
    [job_id] = pg_api.submit()
    _, job = pg_api.match_token()
    refused = pg_api.status(job, job_id, Status="Running", MinorStatus="bad\x00minor")
    assert refused.status_code == 400 and "NUL" in detail(refused)
    after = pg_api.job(job_id)
    assert after["Status"] == "Matched" and len(after["History"]) == 4  # nothing of the refused update was written
    # A payload printing NUL bytes must not break its heartbeats (the tail is stored with U+FFFD instead).
    assert pg_api.heartbeat(job, job_id, StandardOutput="out\x00put").status_code == 200
    assert pg_api.job(job_id)["Parameters"]["StandardOutput"] == "out\ufffdput"
    register = pg_api.call("POST", "/api/x-embedded/pilots/register", pg_api.headers("pilot", "pilot"),
                           json={"stamp": "nul\x00stamp"})
    assert register.status_code == 400
    assert pg_api.call("GET", "/api/jobs/sandbox", pg_api.headers(), params={"pfn": "a\x00b"}).status_code in (400, 404)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "spec",
    [
        {"parameter": "Status", "operator": "eq", "value": 5},
        {"parameter": "JobID", "operator": "like", "value": 3},
        {"parameter": "LastUpdateTime", "operator": "gt", "value": 5},
        {"parameter": "VerifiedFlag", "operator": "eq", "value": "yes"},
    ],
)
def test_search_values_of_another_type_on_postgresql(pg_api: Api, spec: dict) -> None:
    response = requests.post(f"{pg_api.url}/api/jobs/search", headers=pg_api.headers(), json={"search": [spec]},
                             timeout=TIMEOUT)
    assert response.status_code in (200, 400), response.text
