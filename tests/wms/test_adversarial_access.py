"""Nobody reads what isn't theirs: sandboxes across owners, across jobs of one owner, and across reschedules; a
pilot's own token changes nothing but that pilot.

In process (the real app and database, no server process), on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
from fastapi.testclient import TestClient

from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from tests.wms.helpers import jdl_text, make_settings


class Api:
    def __init__(self, client: TestClient, app: Any) -> None:
        self.client, self.app = client, app

    def headers(self, role: str = "runner", owner: str = "alice", **claims: Any) -> dict[str, str]:
        token = create_token(self.app.state.ctx.key, role=role, owner=owner, group="galaxy_user", **claims)
        return {"Authorization": f"Bearer {token}"}

    def ask_upload(self, headers: dict[str, str], data: bytes) -> Any:
        info = {"checksum_algorithm": "sha256", "checksum": hashlib.sha256(data).hexdigest(), "size": len(data),
                "format": "tar.bz2"}
        return self.client.post("/api/jobs/sandbox", headers=headers, json=info)

    def upload(self, headers: dict[str, str], data: bytes) -> str:
        answer = self.ask_upload(headers, data)
        assert answer.status_code == 200, answer.text
        if answer.json()["url"] is not None:
            put = self.client.put(answer.json()["url"], content=data)
            assert put.status_code == 204, put.text
        return answer.json()["pfn"]

    def ticket(self, headers: dict[str, str], pfn: str) -> Any:
        return self.client.get("/api/jobs/sandbox", headers=headers, params={"pfn": pfn})

    def download(self, headers: dict[str, str], pfn: str) -> Any:
        answer = self.ticket(headers, pfn)
        return self.client.get(answer.json()["url"]) if answer.status_code == 200 else answer

    def submit(self, **attrs: Any) -> int:
        body = [jdl_text(**{"Site": "S.x", **attrs})]
        response = self.client.post("/api/jobs/jdl", headers=self.headers(), json=body)
        assert response.status_code == 201, response.text
        return response.json()[0]["JobID"]

    def match(self) -> tuple[int, dict[str, str]]:
        response = self.client.post("/api/x-embedded/match", headers=self.headers("pilot", "pilot"),
                                    json={"Site": "S.x"})
        assert response.status_code == 200, response.text
        return response.json()["JobID"], {"Authorization": f"Bearer {response.json()['Token']}"}


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[Api]:
    app = create_app(make_settings(tmp_path, db_url, maintenance_interval=0))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, app)


def test_knowing_another_owners_checksum_gives_no_access(api: Api) -> None:
    secret = os.urandom(5000)
    alice_pfn = api.upload(api.headers(), secret)
    mallory = api.headers("runner", "mallory")

    answer = api.ask_upload(mallory, secret)
    assert answer.status_code == 200 and answer.json()["url"] is not None  # no "already there": prove it first
    mallory_pfn = answer.json()["pfn"]
    assert "/mallory/" in mallory_pfn
    assert api.ticket(mallory, mallory_pfn).status_code == 404  # asking registered nothing
    assert api.ticket(mallory, alice_pfn).status_code == 403
    lie = api.client.put(answer.json()["url"], content=os.urandom(5000))  # the right size, not the bytes
    assert lie.status_code == 400 and "sha256" in lie.json()["detail"]
    assert api.ticket(mallory, mallory_pfn).status_code == 404
    submit = api.client.post("/api/jobs/jdl", headers=mallory, json=[jdl_text(InputSandbox=[mallory_pfn])])
    assert submit.status_code == 400 and "input sandbox not found" in submit.json()["detail"]

    # Holding the bytes is proof enough: then the pfn is the uploader's own, and dedup works within that owner.
    assert api.client.put(answer.json()["url"], content=secret).status_code == 204
    assert api.download(mallory, mallory_pfn).content == secret
    assert api.ask_upload(mallory, secret).json()["url"] is None
    assert api.ask_upload(api.headers(), secret).json()["url"] is None


def test_a_job_token_reads_only_its_own_jobs_sandboxes(api: Api) -> None:
    alice = api.headers()
    own_input = api.upload(alice, os.urandom(3000))
    others = api.upload(alice, os.urandom(3100))  # alice's, but not this job's
    other_job_input = api.upload(alice, os.urandom(3200))
    job_id = api.submit(InputSandbox=[own_input])
    other_job = api.submit(InputSandbox=[other_job_input], Site="elsewhere")
    matched, job = api.match()
    assert matched == job_id

    assert api.download(job, own_input).status_code == 200
    for pfn in (others, other_job_input):
        response = api.ticket(job, pfn)
        assert response.status_code == 403 and f"job {job_id}" in response.json()["detail"], response.text
    # It may not take the owner's other sandbox as its output (and so read it) by naming it.
    stolen = api.client.patch(f"/api/jobs/{job_id}/sandbox/output", headers=job, json=others)
    assert stolen.status_code == 403, stolen.text
    assert api.client.get(f"/api/jobs/{job_id}/sandbox/output", headers=alice).json() == []
    # ...nor skip the upload of bytes that only its owner has.
    again = api.ask_upload(job, bytes(api.download(alice, others).content))
    assert again.json()["url"] is not None

    output = os.urandom(2500)
    output_pfn = api.upload(job, output)
    assert api.client.patch(f"/api/jobs/{job_id}/sandbox/output", headers=job, json=output_pfn).status_code == 200
    assert api.download(job, output_pfn).content == output
    assert api.download(alice, output_pfn).content == output
    assert api.client.get(f"/api/jobs/{other_job}/sandbox", headers=job).status_code == 403


def test_a_job_token_from_before_a_reschedule_gets_no_sandbox_access(api: Api) -> None:
    alice = api.headers()
    own_input = api.upload(alice, os.urandom(3000))
    job_id = api.submit(InputSandbox=[own_input])
    _, old = api.match()
    early_download = api.ticket(old, own_input).json()["url"]
    output = os.urandom(1500)
    early_upload = api.ask_upload(old, output).json()["url"]
    assert early_upload is not None

    assert api.client.post("/api/jobs/reschedule", headers=alice, json={"job_ids": [job_id]}).status_code == 200
    for response in (
        api.ticket(old, own_input),
        api.ask_upload(old, os.urandom(100)),
        api.client.get(early_download),
        api.client.put(early_upload, content=output),
        api.client.get(f"/api/jobs/{job_id}/sandbox/input", headers=old),
    ):
        assert response.status_code == 403 and "rescheduled" in response.json()["detail"], response.text
    matched, new = api.match()
    assert matched == job_id
    assert api.download(new, own_input).status_code == 200
    assert api.client.get(early_download).status_code == 403  # still dead for the old attempt


def test_a_pilot_token_acts_for_its_own_pilot_only(api: Api) -> None:
    """Each pilot the director submits carries its own token: a compromised worker node can neither speak for
    another pilot (mark it Failed, match in its name) nor take another site's jobs, nor mint tokens."""
    director = api.headers("director", "sitedirector")
    minted = api.client.post("/api/x-embedded/pilots/tokens", headers=director,
                             json={"stamps": ["pilotA", "pilotB"], "site": "S.x", "lifetime": 10**9})
    assert minted.status_code == 200, minted.text
    tokens = minted.json()["tokens"]
    claims = jwt.decode(tokens["pilotA"], options={"verify_signature": False})
    assert (claims["role"], claims["pilot_stamp"], claims["pilot_site"]) == ("pilot", "pilotA", "S.x")
    assert claims["exp"] - claims["iat"] <= api.app.state.ctx.settings.pilot_token_lifetime  # capped
    assert claims["exp"] > time.time() + 60
    a, b = ({"Authorization": f"Bearer {tokens[s]}"} for s in ("pilotA", "pilotB"))
    assert api.client.post("/api/x-embedded/pilots", headers=director, json={"stamps": ["pilotA", "pilotB"]}).is_success

    def post(headers: dict[str, str], path: str, body: Any) -> Any:
        return api.client.post(path, headers=headers, json=body)

    assert post(b, "/api/x-embedded/pilots/register", {"stamp": "pilotB", "site": "S.x"}).status_code == 200
    refusals = [
        post(a, "/api/x-embedded/pilots/register", {"stamp": "pilotB", "site": "S.x"}),
        post(a, "/api/x-embedded/pilots/register", {"stamp": "pilotA", "site": "S.other"}),
        api.client.patch("/api/x-embedded/pilots/pilotB", headers=a, json={"status": "Failed"}),
        post(a, "/api/x-embedded/match", {"Site": "S.x", "PilotStamp": "pilotB"}),
        post(a, "/api/x-embedded/match", {"Site": "S.other", "PilotStamp": "pilotA"}),
        post(a, "/api/x-embedded/pilots/tokens", {"stamps": ["pilotC"]}),
        post(a, "/api/x-embedded/pilots", {"stamps": ["pilotC"]}),
        post(a, "/api/x-embedded/monitoring/sitedirector", []),
        api.client.get("/api/x-embedded/pilots", headers=a, params={"stamp": "pilotB"}),
        post(director, "/api/x-embedded/match", {"Site": "S.x"}),  # the director runs no jobs
        post(api.headers(), "/api/x-embedded/pilots/tokens", {"stamps": ["pilotC"]}),
    ]
    for response in refusals:
        assert response.status_code == 403, (response.request.url, response.text)
    assert api.client.get("/api/x-embedded/pilots", headers=b).json()[0]["Status"] == "Running"
    mine = api.client.get("/api/x-embedded/pilots", headers=a)
    assert [p["PilotStamp"] for p in mine.json()] == ["pilotA"]

    job_id = api.submit()
    matched = post(a, "/api/x-embedded/match", {"Site": "S.x"})  # no stamp given: recorded as its own
    assert matched.status_code == 200 and matched.json()["JobID"] == job_id, matched.text
    job_claims = jwt.decode(matched.json()["Token"], options={"verify_signature": False})
    assert (job_claims["role"], job_claims["pilot_stamp"]) == ("job", "pilotA")
    details = api.client.get(f"/api/x-embedded/jobs/{job_id}", headers=api.headers())
    assert details.json()["Pilots"] == ["pilotA"]
    assert api.client.patch("/api/x-embedded/pilots/pilotA", headers=a, json={"status": "Done"}).status_code == 200
    assert api.client.get("/api/x-embedded/pilots", headers=b).json()[0]["Status"] == "Running"


@pytest.mark.parametrize("stamps", [[], ["a b"], ["x" * 33], ["$(reboot)"], [""]])
def test_pilot_tokens_only_for_stamps_a_wrapper_can_carry(api: Api, stamps: list[str]) -> None:
    answer = api.client.post("/api/x-embedded/pilots/tokens", headers=api.headers("director", "sitedirector"),
                             json={"stamps": stamps})
    assert answer.status_code == 422, answer.text
