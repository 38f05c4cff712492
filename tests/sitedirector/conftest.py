"""Helpers for the SiteDirector tests: a real scheduler with tokens, JDL text, a config writer."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from galaxy_dirac.wms.auth import create_token
from galaxy_dirac.wms.config import Settings
from tests.conftest import WMSServer, wait_for  # noqa: F401 - re-exported to the tests here


def jdl(site: str, **attributes: Any) -> str:
    attributes.setdefault("Executable", "/bin/echo")
    attributes.setdefault("Arguments", "hello")
    attributes.setdefault("StdOutput", "std.out")
    attributes.setdefault("StdError", "std.err")
    attributes.setdefault("CPUTime", 3600)
    attributes["Site"] = site
    body = "\n".join(f"  {k} = {json.dumps(v) if isinstance(v, str) else v};" for k, v in attributes.items())
    return "[\n" + body + "\n]"


class Scheduler:
    """A running ``galaxy-dirac-wms serve`` plus runner/admin clients and director/pilot tokens."""

    def __init__(self, server: WMSServer) -> None:
        self.server = server
        self.url = server.url
        #: For pilots started by hand; a SiteDirector gets :attr:`director_token` and mints one per pilot.
        self.pilot_token = self.token("pilot")
        self.director_token = self.token("director")
        self.runner = requests.Session()
        self.runner.headers["Authorization"] = f"Bearer {self.token('runner', 'alice', 'galaxy_user')}"
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"Bearer {self.token('admin', 'admin', 'galaxy_admin')}"

    def token(self, role: str, owner: str = "", group: str = "") -> str:
        """What ``galaxy-dirac-wms token create`` does, in-process (a CLI start per token costs a second)."""
        settings = Settings(home=str(self.server.home))
        return create_token(settings.signing_key(), role=role, owner=owner, group=group, vo=settings.vo, lifetime=3600)

    def _check(self, resp: requests.Response) -> Any:
        assert resp.status_code < 300, f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    def submit(self, *jdls: str) -> list[int]:
        resp = self.runner.post(f"{self.url}/api/jobs/jdl", json=list(jdls), timeout=30)
        return [j["JobID"] for j in self._check(resp)]

    def job(self, job_id: int) -> dict:
        return self._check(self.admin.get(f"{self.url}/api/x-embedded/jobs/{job_id}", timeout=30))

    def pilots(self, **params: Any) -> list[dict]:
        return self._check(self.admin.get(f"{self.url}/api/x-embedded/pilots", params=params, timeout=30))

    def demand(self) -> list[dict]:
        return self._check(self.admin.get(f"{self.url}/api/x-embedded/taskqueues/demand", timeout=30))


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    """One real scheduler per test module (a start costs seconds); tests keep apart with :func:`uid` names."""
    server = WMSServer(tmp_path_factory.mktemp("wms"), maintenance_interval=1).start()
    try:
        yield Scheduler(server)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def short_match_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pilots started by these tests hold an empty match open for 1 s, not the default long poll (20 s)."""
    monkeypatch.setenv("GALAXY_DIRAC_PILOT_MATCH_WAIT", "1")


@pytest.fixture
def uid() -> str:
    """A per-test suffix for queue and site names, so tests sharing a scheduler never see each other's work."""
    return uuid.uuid4().hex[:8]


def write_config(path: Path, sched: Scheduler, queues: list[dict], **top: Any) -> Path:
    doc = {
        "scheduler": {"url": sched.url, "token": sched.director_token},
        "cycle_interval": 1,
        "work_dir": str(path.parent / "work"),
        "pilot": {"max_idle": 5, "max_empty_matches": 1, "heartbeat_interval": 1},
        "queues": queues,
        **top,
    }
    path.write_text(yaml.safe_dump(doc))
    return path
