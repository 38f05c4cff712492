"""Monitoring queries and routes: paging and filters against the synthetic month, one job in full, auth, EXPLAIN."""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from galaxy_dirac import states
from galaxy_dirac.wms import jobs, monitoring
from galaxy_dirac.wms.api import create_app
from galaxy_dirac.wms.auth import create_token
from tests.wms.helpers import ADMIN, make_settings, submit
from tests.wms.synthetic import MONTH_END, MONTH_START, Month, build_month


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Engine, Month, Any]]:
    tmp = tmp_path_factory.mktemp("mon")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'wms.sqlite'}", maintenance_interval=0)
    app = create_app(settings)
    engine = app.state.ctx.engine
    month = build_month(engine, n_jobs=3000)
    # A few jobs through the scheduler's own submit, so task queues have demand.
    submit(engine, settings, 7, ADMIN, JobGroup="live", CPUTime=3600)
    with TestClient(app) as test_client:
        yield test_client, engine, month, app


def headers(app: Any, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(app.state.ctx.key, role=role, owner='op')}"}


def test_list_jobs_filters_and_pages(client: tuple[TestClient, Engine, Month, Any]) -> None:
    _, engine, month, _ = client
    failed = sorted((j.JobID for j in month.jobs if j.Status == states.FAILED), reverse=True)
    page1 = monitoring.list_jobs(engine, {"status": "Failed"}, per_page=25)
    page2 = monitoring.list_jobs(engine, {"status": "Failed"}, page=2, per_page=25)
    assert page1["total"] == len(failed)
    assert [j["JobID"] for j in page1["jobs"] + page2["jobs"]] == failed[:50]
    site, group = month.jobs[0].Site, month.jobs[0].OwnerGroup
    both = monitoring.list_jobs(engine, {"site": site, "group": group, "status": ["Done", "Failed"]}, per_page=1000)
    expected = {
        j.JobID for j in month.jobs if j.Site == site and j.OwnerGroup == group and j.Status in ("Done", "Failed")
    }
    assert {j["JobID"] for j in both["jobs"]} == expected and both["total"] == len(expected)
    oldest = monitoring.list_jobs(engine, sort="SubmissionTime", descending=False, per_page=1)["jobs"][0]
    assert oldest["JobID"] == min(month.jobs, key=lambda j: (j.Submit, j.JobID)).JobID
    with pytest.raises(ValueError):
        monitoring.list_jobs(engine, {"nope": "x"})
    with pytest.raises(ValueError):
        monitoring.list_jobs(engine, sort="JDL")


def test_facets_count_everything(client: tuple[TestClient, Engine, Month, Any]) -> None:
    _, engine, month, _ = client
    facets = monitoring.facets(engine)
    counts = {f["value"]: f["count"] for f in facets["status"]}
    expected = Counter(j.Status for j in month.jobs)
    expected[states.WAITING] += 7
    assert counts == dict(expected)
    assert facets["total"] == len(month.jobs) + 7
    assert len(facets["site"]) == 31  # 30 sites and ANY for the live jobs


def test_job_detail_has_history_heartbeats_pilots(client: tuple[TestClient, Engine, Month, Any]) -> None:
    _, engine, month, _ = client
    job = next(j for j in month.jobs if j.Reschedules and j.Wall is not None and j.Status == states.DONE)
    detail = monitoring.job_detail(engine, job.JobID)
    statuses = [h["Status"] for h in detail["History"]]
    assert statuses[0] == states.RECEIVED and statuses[-1] == states.DONE
    assert statuses.count(states.RESCHEDULED) == job.Reschedules
    assert detail["HeartBeats"] and detail["HeartBeats"][-1]["WallClockTime"] == pytest.approx(job.Wall)
    assert detail["Pilots"] and detail["Pilots"][0]["GridSite"] == job.Site
    assert "Executable" in detail["JDL"] and detail["Sandboxes"] == {"Input": [], "Output": []}
    with pytest.raises(jobs.NotFound):
        monitoring.job_detail(engine, 10**9)


def test_pilots_and_taskqueues(client: tuple[TestClient, Engine, Month, Any]) -> None:
    _, engine, month, _ = client
    summary = monitoring.pilot_summary(engine)
    assert sum(s["Total"] for s in summary) == len(month.pilots)
    by_ce = Counter(p.CE for p in month.pilots if p.Status == states.PILOT_FAILED)
    assert {s["CE"]: s["States"].get(states.PILOT_FAILED, 0) for s in summary if s["CE"] in by_ce} == dict(by_ce)
    failed = monitoring.list_pilots(engine, {"status": states.PILOT_FAILED}, per_page=5)
    assert failed["total"] == sum(by_ce.values()) and "CVMFS" in failed["pilots"][0]["StatusReason"]
    demand = monitoring.taskqueue_demand(engine)
    assert sum(q["WaitingJobs"] for q in demand) == 7


def _plan(engine: Engine, sql: str, params: dict[str, Any]) -> str:
    with engine.connect() as conn:
        return " | ".join(row[-1] for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"), params))


def test_main_queries_use_indexes(client: tuple[TestClient, Engine, Month, Any]) -> None:
    """The page's queries must not scan the Jobs table row by row (SQLite's plan says SEARCH ... USING INDEX)."""
    _, engine, _, _ = client
    plans = {
        "jobs by status": _plan(
            engine, "SELECT JobID FROM Jobs WHERE Status = :s ORDER BY JobID DESC LIMIT 50 OFFSET 0", {"s": "Failed"}
        ),
        "count by status": _plan(engine, "SELECT count(*) FROM Jobs WHERE Status = :s", {"s": "Failed"}),
        "jobs by site": _plan(
            engine, "SELECT JobID FROM Jobs WHERE Site = :s ORDER BY JobID DESC LIMIT 50", {"s": "x"}
        ),
        "ended jobs": _plan(
            engine,
            "SELECT JobID FROM Jobs WHERE EndExecTime >= :a AND EndExecTime < :b",
            {"a": MONTH_START, "b": MONTH_END},
        ),
        "heartbeats of a job": _plan(
            engine, "SELECT Value FROM HeartBeatLoggingInfo WHERE JobID = :j AND Name = 'WallClockTime'", {"j": 1}
        ),
        "pilots submitted": _plan(
            engine, "SELECT count(*) FROM PilotAgents WHERE SubmissionTime >= :a", {"a": MONTH_START}
        ),
    }
    for name, plan in plans.items():
        assert "USING" in plan and "INDEX" in plan, f"{name}: {plan}"
        assert "SCAN Jobs" not in plan.replace("USING COVERING INDEX", ""), f"{name}: {plan}"
    facet_plan = _plan(engine, "SELECT Site, count(*) FROM Jobs GROUP BY Site", {})
    assert "COVERING INDEX" in facet_plan, facet_plan


def test_routes_need_admin_or_reader(client: tuple[TestClient, Engine, Month, Any]) -> None:
    http, _, _, app = client
    assert http.get("/api/x-embedded/monitoring/jobs").status_code == 401
    assert http.get("/api/x-embedded/monitoring/jobs", headers=headers(app, "runner")).status_code == 403
    assert http.get("/metrics", headers=headers(app, "pilot")).status_code == 403
    for role in ("reader", "admin"):
        assert http.get("/api/x-embedded/monitoring/facets", headers=headers(app, role)).status_code == 200
    page = http.get("/monitor")
    assert page.status_code == 200 and "monitor.js" in page.text
    assert http.get("/", follow_redirects=False).headers["location"] == "/monitor"
    assert "sessionStorage" in http.get("/monitor/static/monitor.js").text
    assert http.get("/monitor/static/monitor.css").status_code == 200


def test_routes_return_pages_details_and_plots(client: tuple[TestClient, Engine, Month, Any]) -> None:
    http, _, month, app = client
    h = headers(app, "reader")
    answer = http.get("/api/x-embedded/monitoring/jobs", params={"status": "Killed", "per_page": 10}, headers=h).json()
    assert answer["total"] == sum(j.Status == states.KILLED for j in month.jobs) and len(answer["jobs"]) == 10
    job_id = answer["jobs"][0]["JobID"]
    detail = http.get(f"/api/x-embedded/monitoring/jobs/{job_id}", headers=h).json()
    assert detail["History"][-1]["Status"] == states.KILLED
    assert http.get("/api/x-embedded/monitoring/jobs/999999999", headers=h).status_code == 404
    assert http.get("/api/x-embedded/monitoring/jobs", params={"sort": "JDL"}, headers=h).status_code == 400
    assert http.get("/api/x-embedded/monitoring/pilots", params={"status": "Failed"}, headers=h).json()["total"] > 0
    assert http.get("/api/x-embedded/monitoring/pilots/summary", headers=h).json()
    assert http.get("/api/x-embedded/monitoring/taskqueues", headers=h).json()[0]["WaitingJobs"] == 7
    period = {"since": "2026-10-01", "until": "2026-11-01", "bucket": "1d"}
    png = http.get(
        "/api/x-embedded/accounting/jobs-by-site",
        params={**period, "format": "png", "width": 900, "height": 450},
        headers=h,
    )
    assert png.headers["content-type"] == "image/png"
    from PIL import Image

    assert Image.open(io.BytesIO(png.content)).size == (900, 450)
    data = http.get("/api/x-embedded/accounting/jobs-by-site", params=period, headers=h).json()
    ended = sum(1 for j in month.jobs if j.Status in ("Done", "Failed", "Killed") and MONTH_START <= j.End < MONTH_END)
    assert sum(sum(v) for v in data["series"].values()) == ended
    csv_text = http.get("/api/x-embedded/accounting/pilots-per-ce", params={**period, "format": "csv"}, headers=h).text
    assert csv_text.startswith("bucket,")
    bad = http.get("/api/x-embedded/accounting/nope", params=period, headers=h)
    assert bad.status_code == 400 and "unknown plot" in bad.json()["detail"]


def test_sitedirector_decisions(client: tuple[TestClient, Engine, Month, Any]) -> None:
    http, _, _, app = client
    assert http.get("/api/x-embedded/monitoring/sitedirector", headers=headers(app, "reader")).json() == []
    decisions = [
        {"queue": "q-site01", "submit": 5, "matching": 12, "skipped": 0},
        {"queue": "q-site02", "submit": 0, "matching": 0, "skipped": 2},
    ]
    assert (
        http.post("/api/x-embedded/monitoring/sitedirector", json=decisions, headers=headers(app, "reader")).status_code
        == 403
    )
    answer = http.post("/api/x-embedded/monitoring/sitedirector", json=decisions, headers=headers(app, "pilot"))
    assert answer.json() == {"recorded": 2}
    http.post(
        "/api/x-embedded/monitoring/sitedirector",
        json=[{"queue": "q-site01", "submit": 1}],
        headers=headers(app, "pilot"),
    )
    last = {
        d["Queue"]: d
        for d in http.get("/api/x-embedded/monitoring/sitedirector", headers=headers(app, "reader")).json()
    }
    assert last["q-site01"]["submit"] == 1 and last["q-site02"]["skipped"] == 2
    assert dt.datetime.fromisoformat(last["q-site01"]["DecisionTime"].rstrip("Z")) > dt.datetime(2026, 1, 1)


def test_the_schema_has_the_accounting_indexes_and_creating_it_twice_is_harmless(tmp_path: Path) -> None:
    from galaxy_dirac.wms.db import create_schema, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    create_schema(engine)
    create_schema(engine)
    with engine.connect() as conn:
        names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'"))}
    assert {"gd_Jobs_EndExecTime", "gd_HeartBeat_JobID_Name"} <= names
