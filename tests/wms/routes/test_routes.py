"""The routers in process, with their dependencies replaced: no server, no token signing, one database file.

The real-server tests (``tests/wms/test_api.py``) show the wire; these show that each route takes who is calling and
what it works on from its injected dependencies, and that policy answers before any logic runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from galaxy_dirac.wms import routes
from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import Principal
from galaxy_dirac.wms.context import Context
from galaxy_dirac.wms.routes import deps
from tests.wms.helpers import jdl_text, make_settings

ALICE = Principal("runner", "alice", "galaxy_user", "galaxy")
PILOT_A = Principal("pilot", "pilot", "galaxy_pilot", "galaxy", pilot_stamp="pilotA", pilot_site="S.x")


class App:
    """The app with ``caller`` overridden: ``as_(principal)`` decides who the next requests come from."""

    def __init__(self, app: Any, client: TestClient) -> None:
        self.app, self.client = app, client

    def as_(self, principal: Principal) -> TestClient:
        self.app.dependency_overrides[deps.caller] = lambda: principal
        return self.client


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'wms.sqlite'}", maintenance_interval=0))
    with TestClient(application, raise_server_exceptions=False) as client:
        yield App(application, client)
    application.dependency_overrides.clear()


def test_every_api_route_belongs_to_a_router_of_its_concern(app: App) -> None:
    in_routers = {(r.path, m.lower()) for router in routes.ROUTERS for r in router.routes for m in r.methods}
    published = {(path, m) for path, item in app.client.get("/api/openapi.json").json()["paths"].items() for m in item}
    assert published and published <= in_routers
    assert not [r for r in app.app.routes if isinstance(r, APIRoute)]  # none added to the app itself
    assert {type(r).__name__ for router in routes.ROUTERS for r in router.routes} == {"WMSRoute"}


def test_the_caller_comes_from_the_dependency_not_from_a_header(app: App) -> None:
    client = app.as_(ALICE)
    submitted = client.post("/api/jobs/jdl", json=[jdl_text(Site="S.x")])
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()[0]["JobID"]
    assert client.post("/api/x-embedded/match", json={"Site": "S.x"}).status_code == 403  # a runner runs no jobs

    pilot = app.as_(PILOT_A)
    for absurd in ({"processors": 10**30}, {"processors": 0}, {"memory_mb": -1}):
        refused = pilot.post("/api/x-embedded/pilots/register", json={"stamp": "pilotA", "site": "S.x", **absurd})
        assert refused.status_code == 422, (absurd, refused.text)
    assert pilot.post("/api/x-embedded/pilots/register", json={"stamp": "pilotA", "site": "S.x"}).status_code == 200
    assert pilot.post("/api/x-embedded/match", json={"Site": "S.y"}).status_code == 403
    assert pilot.patch("/api/x-embedded/pilots/pilotB", json={"status": "Failed"}).status_code == 403
    matched = pilot.post("/api/x-embedded/match", json={"Site": "S.x"})
    assert matched.status_code == 200 and matched.json()["JobID"] == job_id, matched.text
    details = app.as_(Principal("reader", "monitor", "", "galaxy")).get(f"/api/x-embedded/jobs/{job_id}")
    assert details.json()["Pilots"] == ["pilotA"] and details.json()["Status"] == "Matched"


def test_the_context_is_injected_too(app: App, tmp_path: Path) -> None:
    """A route works on whatever context it is given: here a second database, so the first one sees nothing."""
    other = Context(make_settings(tmp_path / "other", f"sqlite:///{tmp_path / 'other.sqlite'}", maintenance_interval=0))
    try:
        app.app.dependency_overrides[deps.context] = lambda: other
        client = app.as_(ALICE)
        assert client.post("/api/jobs/jdl", json=[jdl_text()]).status_code == 201
        assert len(client.post("/api/jobs/search", json={}).json()) == 1
        del app.app.dependency_overrides[deps.context]
        assert client.post("/api/jobs/search", json={}).json() == []
    finally:
        other.close()


@pytest.mark.parametrize(
    ("principal", "status"),
    [
        (ALICE, 403),
        (PILOT_A, 403),
        (Principal("reader", "m", "", "galaxy"), 200),
        (Principal("admin", "a", "", ""), 200),
    ],  # noqa: E501
)
def test_monitoring_is_for_readers_and_admins(app: App, principal: Principal, status: int) -> None:
    assert app.as_(principal).get("/api/x-embedded/monitoring/facets").status_code == status


def test_without_override_a_missing_token_is_401(app: App) -> None:
    answer = app.client.post("/api/jobs/search", json={})
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
