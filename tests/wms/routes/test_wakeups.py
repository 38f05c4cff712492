"""Long polls hear what another host did through the database alone: one probe a second per API worker.

The "other host" is a separate process writing to the same database file with the scheduler's own functions, so
nothing in this process is bumped by it; the waiting match must still get the job within about a second, long before
its own re-read (``RECHECK_INTERVAL``) would have found it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from galaxy_dirac.wms.routes import pilots as pilot_routes
from tests.wms.helpers import make_settings

OTHER_HOST = textwrap.dedent(
    """
    import sys
    from galaxy_dirac.wms import jobs
    from galaxy_dirac.wms.auth import Principal
    from galaxy_dirac.wms.db import make_engine
    from tests.wms.helpers import jdl_text, make_settings
    from pathlib import Path

    home, url, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    engine = make_engine(url)
    alice = Principal("runner", "alice", "galaxy_user", "galaxy")
    if action == "submit":
        print(jobs.submit(engine, [jdl_text(Site="S.far")], alice, make_settings(home, url))[0]["JobID"])
    else:
        job_id = int(action)
        body = {job_id: {jobs.utcnow(): {"Status": "Killed", "MinorStatus": "by the other host", "Source": "test"}}}
        print(jobs.set_statuses(engine, body, alice))
    """
)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Any, str]]:
    url = f"sqlite:///{tmp_path / 'wms.sqlite'}"
    app = create_app(make_settings(tmp_path / "here", url, maintenance_interval=0))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app, url


def _other_host(tmp_path: Path, url: str, action: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", OTHER_HOST, str(tmp_path / "there"), url, action],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[3], check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_jobs_and_kills_from_another_host_wake_waiting_long_polls(api: tuple[TestClient, Any, str], tmp_path) -> None:
    client, app, url = api
    assert pilot_routes.RECHECK_INTERVAL >= 30  # what the test shows would otherwise take this long
    pilot = {"Authorization": f"Bearer {create_token(app.state.ctx.key, role='pilot', owner='pilot')}"}
    answers: list[Any] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            client.post("/api/x-embedded/match", headers=pilot, params={"wait": 60}, json={"Site": "S.far"})
        )
    )
    began = time.monotonic()
    waiting.start()
    time.sleep(1.5)  # the long poll is waiting, and the probes have their first reading
    job_id = int(_other_host(tmp_path, url, "submit"))
    waiting.join(70)
    assert answers and answers[0].status_code == 200 and answers[0].json()["JobID"] == job_id, answers
    assert time.monotonic() - began < 25
    job_token = {"Authorization": f"Bearer {answers[0].json()['Token']}"}

    commands: list[Any] = []
    poll = threading.Thread(
        target=lambda: commands.append(
            client.get(f"/api/x-embedded/jobs/{job_id}/commands", headers=job_token, params={"wait": 60})
        )
    )
    began = time.monotonic()
    poll.start()
    time.sleep(1.5)
    _other_host(tmp_path, url, str(job_id))
    poll.join(70)
    assert commands and [c["command"] for c in commands[0].json()] == ["Kill"], commands
    assert time.monotonic() - began < 25


@pytest.mark.postgres
def test_a_stopped_scheduler_leaves_no_session_on_its_database(tmp_path: Path) -> None:
    """The probes stop before the engine closes: right after shutdown the database may be dropped (as tests do,
    or an operator migrating it), which an idle session left by a late probe would refuse."""
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL, fresh_database

    with fresh_database("postgres") as url:
        app = create_app(make_settings(tmp_path, url, maintenance_interval=0))
        with TestClient(app):
            pass  # shut down while the probes' first queries are on their way
        admin = create_engine(PG_ADMIN_URL)
        try:
            with admin.connect() as conn:
                left = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :n"), {"n": url.rsplit("/", 1)[1]}
                ).scalar_one()
        finally:
            admin.dispose()
        assert left == 0
