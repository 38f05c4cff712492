"""Where a job ran, as the runner asks a real DiracX 0.7: ``WMSClient.consumption`` through DiracX's pilot search.

DiracX 0.7 has no route that maps a job to a pilot (its matcher does that inside the server), so the pilots and
their mapping are written into its PilotAgentsDB (SQLite) the way a DIRAC matcher leaves them; everything the
client reads goes over HTTP. The embedded scheduler's side is checked in a real Galaxy (tests/runner/test_tpv.py).
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import pytest

from galaxy_dirac.client import WMSClient
from tests.contract.diracx_server import VO
from tests.jdl import jdl_text

pytestmark = pytest.mark.diracx


def _add_pilot(db: str, job_id: int, stamp: str, reference: str, ce: str, queue: str, vo: str = VO) -> None:
    with sqlite3.connect(db) as conn:
        cursor = conn.execute(
            "INSERT INTO PilotAgents (InitialJobID, CurrentJobID, PilotJobReference, PilotStamp, DestinationSite,"
            " Queue, GridSite, VO, GridType, BenchMark, Status, StatusReason, AccountingSent)"
            " VALUES (?, ?, ?, ?, ?, ?, 'Local.test', ?, 'HTCondorCE', 0.0, 'Running', '', 'False')",
            (job_id, job_id, reference, stamp, ce, queue, vo),
        )
        conn.execute(
            "INSERT INTO JobToPilotMapping (PilotID, JobID, StartTime) VALUES (?, ?, '2026-01-01 00:00:00.000000')",
            (cursor.lastrowid, job_id),
        )


def test_consumption_names_the_ce_queue_and_pilot_of_the_last_pilot(diracx_server: Any) -> None:
    client = WMSClient(diracx_server.url, diracx_server.token, retries=1, backoff=0.1)
    tag = uuid.uuid4().hex[:8]
    jdls = [jdl_text(brackets=False, JobName=f"{tag}-{n}") for n in (1, 2)]
    job_id, other = (j["JobID"] for j in client.submit(jdls))
    assert client.consumption(job_id) == {}  # no pilot yet: nothing to tell, and no error
    db = str(diracx_server.workdir / "db" / "pilotagentsdb.db")
    _add_pilot(db, job_id, f"a{tag}", f"htcondorce://ce1/{tag}.0", "ce1.example.org", "long")
    _add_pilot(db, job_id, f"b{tag}", f"htcondorce://ce2/{tag}.0", "ce2.example.org", "short")  # rescheduled
    _add_pilot(db, other, f"c{tag}", "Unknown", "ce3.example.org", "Unknown")
    assert client.consumption(job_id) == {
        "Pilot_Reference": f"htcondorce://ce2/{tag}.0",
        "GridCE": "ce2.example.org",
        "CEQueue": "short",
    }
    # A pilot without a reference is named by its stamp; an unknown queue is left out.
    assert client.consumption(other) == {"Pilot_Reference": f"c{tag}", "GridCE": "ce3.example.org"}
