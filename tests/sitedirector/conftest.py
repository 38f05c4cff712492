"""Helpers for the SiteDirector tests: a real scheduler with tokens, JDL text, a config writer."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from galaxy_dirac.wms.auth import create_token
from tests.conftest import WMSServer, wait_for  # noqa: F401 - re-exported to the tests here
from tests.jdl import jdl_text


def jdl(site: str, **attributes: Any) -> str:
    """A job for ``site`` with the defaults these tests rely on (echo, its output files, one hour of CPU)."""
    attributes = {"Executable": "/bin/echo", "Arguments": "hello", "StdOutput": "std.out", "StdError": "std.err",
                  "CPUTime": 3600, **attributes, "Site": site}  # fmt: skip
    return jdl_text(**attributes)


class Scheduler:
    """A running ``galaxy-dirac-wms serve`` (:class:`WMSServer`) with the tokens and calls these tests use."""

    def __init__(self, server: WMSServer) -> None:
        self.server = server
        self.url = server.url
        #: For pilots started by hand; a SiteDirector gets :attr:`director_token` and mints one per pilot.
        self.pilot_token = self.token("pilot")
        self.director_token = self.token("director")

    def token(self, role: str, owner: str = "", group: str = "") -> str:
        """What ``galaxy-dirac-wms token create`` does, in-process (a CLI start per token costs a second)."""
        return create_token(self.server.key, role=role, owner=owner, group=group, lifetime=3600)

    def submit(self, *jdls: str) -> list[int]:
        return self.server.submit(list(jdls))

    def job(self, job_id: int) -> dict:
        return self.server.job(job_id)

    def pilots(self, **params: Any) -> list[dict]:
        return self.server.api("GET", "/api/x-embedded/pilots", params=params)

    def demand(self) -> list[dict]:
        return self.server.api("GET", "/api/x-embedded/taskqueues/demand")


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
