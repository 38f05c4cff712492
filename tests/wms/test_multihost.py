"""Two scheduler hosts on one PostgreSQL: two real ``galaxy-dirac-wms serve`` processes with homes (sandbox
directories) of their own, one database and one signing secret. Each job is matched once whichever host the pilots
ask, one process leads the maintenance loop, and when it is killed the other takes the lease and does its work."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import threading
import time
import uuid
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import Engine, select

from galaxy_dirac import states
from galaxy_dirac.wms import maintenance
from galaxy_dirac.wms.db import Jobs, Leases, LoggingInfo, make_engine, read_transaction
from tests.conftest import WMSServer, fresh_database, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: Seconds between maintenance passes (and lease renewals); a dead leader is replaced after about 3 of them.
INTERVAL = 1.0
STALLED_AFTER = 2


class Host:
    """One scheduler host as its clients see it: its server, and bearer headers for a runner and a pilot."""

    def __init__(self, server: WMSServer, owner: str) -> None:
        self.server = server
        self.runner = {"Authorization": f"Bearer {server.token('runner', owner, 'galaxy_user')}"}
        self.pilot = {"Authorization": f"Bearer {server.token('pilot')}"}

    def post(self, path: str, headers: dict[str, str], body: Any) -> requests.Response:
        return requests.post(f"{self.server.url}{path}", headers=headers, json=body, timeout=30)

    def submit(self, site: str, n: int) -> list[int]:
        jdls = [f'[ Executable = "/bin/true"; JobName = "mh-{i}"; Site = "{site}"; ]' for i in range(n)]
        answer = self.post("/api/jobs/jdl", self.runner, jdls)
        assert answer.status_code in (200, 201), answer.text
        return [job["JobID"] for job in answer.json()]

    def match(self, site: str) -> dict[str, Any] | None:
        answer = self.post("/api/x-embedded/match", self.pilot, {"Site": site})
        assert answer.status_code in (200, 204), answer.text
        return answer.json() if answer.status_code == 200 else None

    def holds(self, holder: str) -> bool:
        """Is ``holder`` (a lease's holder id: host:pid:random) this host's server process?"""
        assert self.server.process is not None
        return holder.split(":")[1] == str(self.server.process.pid)

    def log(self) -> str:
        return self.server.log_path.read_text()


@pytest.fixture
def db() -> Iterator[str]:
    with fresh_database("postgres") as url:
        yield url


@pytest.fixture
def engine(db: str) -> Iterator[Engine]:
    engine = make_engine(db)
    yield engine
    engine.dispose()


@pytest.fixture
def hosts(db: str, wms_server_factory: Any) -> Iterator[tuple[Host, Host]]:
    """Two hosts; stopped before the database is dropped."""
    shared = {"secret": secrets.token_urlsafe(48), "maintenance_interval": INTERVAL, "stalled_after": STALLED_AFTER}
    owner = f"mh{uuid.uuid4().hex[:8]}"
    servers = [wms_server_factory(name, db=db, **shared) for name in ("host-a", "host-b")]
    assert servers[0].home != servers[1].home
    try:
        yield Host(servers[0], owner), Host(servers[1], owner)
    finally:
        for server in servers:
            server.stop()


def lease(engine: Engine) -> Any:
    with read_transaction(engine) as conn:
        return conn.execute(select(Leases).where(Leases.Name == maintenance.MAINTENANCE_LEASE)).first()


def test_each_job_is_matched_once_across_hosts(hosts: tuple[Host, Host]) -> None:
    """Jobs submitted through both hosts, eight pilots matching through both at once: every job once."""
    site = f"MH.{uuid.uuid4().hex[:8]}.org"
    submitted = hosts[0].submit(site, 40) + hosts[1].submit(site, 40)
    matched: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def pilot(host: Host) -> None:
        start.wait()
        empty = 0
        while empty < 3:  # a few empty answers in a row: nothing is left
            job = host.match(site)
            if job is None:
                empty += 1
                continue
            empty = 0
            with lock:
                matched.append(job["JobID"])

    pilots = [threading.Thread(target=pilot, args=(hosts[i % 2],)) for i in range(8)]
    for thread in pilots:
        thread.start()
    for thread in pilots:
        thread.join(120)
    assert not any(thread.is_alive() for thread in pilots)
    assert len(matched) == len(set(matched)) == len(submitted)
    assert sorted(matched) == sorted(submitted)


def test_one_maintenance_leader_and_failover_when_it_dies(hosts: tuple[Host, Host], engine: Engine) -> None:
    """One leader across the hosts, renewing every interval; SIGKILLed, the other host takes the lease within a
    few intervals and runs the maintenance agents: a job that stops heartbeating after the kill becomes Stalled."""
    row = wait_for(lambda: lease(engine), 10, "the maintenance lease")
    first, renewals = row.Holder, row.Renewals
    time.sleep(3 * INTERVAL)
    row = lease(engine)
    assert row.Holder == first and row.Renewals >= renewals + 2  # renewed, never passed on
    leader, survivor = hosts if hosts[0].holds(first) else hosts[::-1]
    assert leader.holds(first) and not survivor.holds(first)
    assert "maintenance lease taken by this process" in leader.log()
    assert "maintenance lease taken by this process" not in survivor.log()
    assert f"maintenance lease held by {first}; this process" in survivor.log()

    assert leader.server.process is not None
    os.kill(leader.server.process.pid, signal.SIGKILL)
    leader.server.process.wait(30)
    killed = time.monotonic()

    # A job that runs on the survivor's side and then goes silent.
    site = f"MH.{uuid.uuid4().hex[:8]}.org"
    (job_id,) = survivor.submit(site, 1)
    job = survivor.match(site)
    assert job is not None and job["JobID"] == job_id
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    running = requests.patch(
        f"{survivor.server.url}/api/jobs/status",
        headers={"Authorization": f"Bearer {job['Token']}"},
        json={str(job_id): {now: {"Status": states.RUNNING, "MinorStatus": "Application", "Source": "JobWrapper"}}},
        timeout=30,
    )
    assert running.status_code == 200, running.text

    taken = wait_for(lambda: (r := lease(engine)) is not None and r.Holder != first and r, 30, "the survivor's lease")
    took = time.monotonic() - killed
    assert survivor.holds(taken.Holder)
    assert took <= (maintenance.LEASE_INTERVALS + 3) * INTERVAL, took
    assert f"maintenance lease taken by this process ({taken.Holder}) from {first}" in survivor.log()

    def status() -> str:
        with read_transaction(engine) as conn:
            return conn.execute(select(Jobs.Status).where(Jobs.JobID == job_id)).scalar_one()

    wait_for(lambda: status() == states.STALLED, STALLED_AFTER + 10 * INTERVAL, "the job to be marked Stalled")
    with read_transaction(engine) as conn:
        sources = conn.execute(
            select(LoggingInfo.StatusSource).where(LoggingInfo.JobID == job_id, LoggingInfo.Status == states.STALLED)
        ).scalars()
        assert list(sources) == ["StalledJobAgent"]
    wait_for(lambda: f"'stalled': [{job_id}]" in survivor.log(), 10, "the survivor's maintenance report")
