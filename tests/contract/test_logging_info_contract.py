"""The `LoggingInfo` search pseudo-parameter (DiracX 0.7): rows carry the job's status history.

What DiracX does (read from diracx-logic 0.7 `jobs.query.search` and checked against the real server): asking for
`LoggingInfo` alone returns every column plus the history; with other parameters it returns `JobID`, those and the
history; each record is `{Status, MinorStatus, ApplicationStatus, StatusTime, Source}` in time order; searching,
sorting or grouping on `LoggingInfo` is refused with 400.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any, Dict, List, Optional

from tests.contract.test_diracx_contract import JOB_COLUMNS, _now, _session, _submit

RECORD_KEYS = {"Status", "MinorStatus", "ApplicationStatus", "StatusTime", "Source"}


def _search(session: Any, url: str, job_id: int, parameters: Optional[List[str]], **extra: Any) -> Any:
    body: Dict[str, Any] = {"search": [{"parameter": "JobID", "operator": "eq", "value": job_id}], **extra}
    if parameters is not None:
        body["parameters"] = parameters
    return session.post(f"{url}/api/jobs/search", json=body)


def test_search_with_logging_info(contract_server: Any) -> None:
    url, session = contract_server.url, _session(contract_server.token)
    job_id = _submit(session, url, f"li-{uuid.uuid4().hex[:8]}", 1)[0]
    time.sleep(0.02)
    reason = f"killed by contract test {uuid.uuid4().hex[:6]}"
    kill = session.patch(
        f"{url}/api/jobs/status",
        json={str(job_id): {_now(): {"Status": "Killed", "MinorStatus": reason, "Source": "ContractTest"}}},
    )
    assert kill.status_code == 200 and kill.json()["failed"] == {}, kill.text

    everything = _search(session, url, job_id, ["LoggingInfo"])
    assert everything.status_code == 200, everything.text
    (row,) = everything.json()
    assert set(row) == JOB_COLUMNS | {"LoggingInfo"}
    history = row["LoggingInfo"]
    assert history and all(set(record) == RECORD_KEYS for record in history)
    assert history[0]["Status"] == "Received"
    assert (history[-1]["Status"], history[-1]["MinorStatus"], history[-1]["Source"]) == (
        "Killed",
        reason,
        "ContractTest",
    )
    assert "idem" not in {record["ApplicationStatus"] for record in history}
    times = [datetime.fromisoformat(record["StatusTime"].replace("Z", "+00:00")) for record in history]
    assert times == sorted(times) and all(record["StatusTime"].endswith("Z") for record in history)

    some = _search(session, url, job_id, ["Status", "LoggingInfo"])
    assert some.status_code == 200, some.text
    assert some.json() == [{"JobID": job_id, "Status": "Killed", "LoggingInfo": history}]
    only_id = _search(session, url, job_id, ["JobID", "LoggingInfo"])
    assert only_id.json() == [{"JobID": job_id, "LoggingInfo": history}]
    without = _search(session, url, job_id, ["JobID", "Status"])
    assert without.json() == [{"JobID": job_id, "Status": "Killed"}]


def test_logging_info_is_not_a_column(contract_server: Any) -> None:
    url, session = contract_server.url, _session(contract_server.token)
    job_id = _submit(session, url, f"ln-{uuid.uuid4().hex[:8]}", 1)[0]
    on_it = session.post(
        f"{url}/api/jobs/search",
        json={"search": [{"parameter": "LoggingInfo", "operator": "eq", "value": "Received"}]},
    )
    assert on_it.status_code == 400
    sorted_by = _search(session, url, job_id, ["LoggingInfo"], sort=[{"parameter": "LoggingInfo", "direction": "asc"}])
    assert sorted_by.status_code == 400
    grouped = session.post(f"{url}/api/jobs/summary", json={"grouping": ["LoggingInfo"], "search": []})
    assert grouped.status_code == 400
