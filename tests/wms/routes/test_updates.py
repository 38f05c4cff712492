"""The runner's long poll for its jobs' updates, in process: woken by a change of one of its own jobs only."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from tests.wms.helpers import jdl_text, make_settings


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'wms.sqlite'}", maintenance_interval=0))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app


def _headers(app: Any, role: str, owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(app.state.ctx.key, role=role, owner=owner, group='galaxy_user')}"}


def test_the_updates_long_poll_wakes_on_the_callers_own_jobs(api: tuple[TestClient, Any]) -> None:
    client, app = api
    alice, bob = _headers(app, "runner", "alice"), _headers(app, "runner", "bob")
    jobs = {}
    for name, headers in (("alice", alice), ("bob", bob)):
        jobs[name] = client.post("/api/jobs/jdl", headers=headers, json=[jdl_text()]).json()[0]["JobID"]
    start = client.get("/api/x-embedded/jobs/updates", headers=alice)  # no cursor yet: answered at once
    assert start.status_code == 200 and start.json()["JobIDs"] == [], start.text
    cursor = start.json()["Cursor"]

    def kill(headers: dict[str, str], job_id: int) -> None:
        time.sleep(0.5)
        body = {str(job_id): {"2100-01-01T00:00:00Z": {"Status": "Killed", "Source": "test"}}}
        assert client.patch("/api/jobs/status", headers=headers, json=body).status_code == 200

    killer = threading.Thread(target=kill, args=(bob, jobs["bob"]))
    killer.start()
    began = time.monotonic()
    quiet = client.get("/api/x-embedded/jobs/updates", headers=alice, params={"since": cursor, "wait": 2})
    killer.join()
    assert quiet.json() == {"JobIDs": [], "Cursor": cursor}  # bob's job is not alice's news
    assert time.monotonic() - began >= 1.9

    killer = threading.Thread(target=kill, args=(alice, jobs["alice"]))
    killer.start()
    began = time.monotonic()
    woken = client.get("/api/x-embedded/jobs/updates", headers=alice, params={"since": cursor, "wait": 60})
    killer.join()
    assert woken.json()["JobIDs"] == [jobs["alice"]], woken.text
    assert time.monotonic() - began < 30  # woken by the change, long before the wait is over
    assert woken.json()["Cursor"] > cursor
    again = client.get("/api/x-embedded/jobs/updates", headers=alice, params={"since": woken.json()["Cursor"]})
    assert again.json()["JobIDs"] == []  # the cursor moved past it
    # The cursor answered is the server's own form of the time, never the caller's text echoed back.
    odd = client.get("/api/x-embedded/jobs/updates", headers=alice, params={"since": "2100-01-01T01:00:00+01:00"})
    assert odd.json() == {"JobIDs": [], "Cursor": "2100-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("role", "params", "status"),
    [("pilot", {}, 403), ("job", {}, 403), ("runner", {"since": "yesterday"}, 400), ("runner", {"wait": 121}, 422)],
)
def test_the_updates_long_poll_refuses(api: tuple[TestClient, Any], role: str, params: dict, status: int) -> None:
    client, app = api
    claims = {"job_id": 1} if role == "job" else {}
    token = create_token(app.state.ctx.key, role=role, owner="alice", **claims)
    answer = client.get("/api/x-embedded/jobs/updates", headers={"Authorization": f"Bearer {token}"}, params=params)
    assert answer.status_code == status, answer.text
