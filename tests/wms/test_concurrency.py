"""Exactly-once matching with concurrent pilot processes, on SQLite, PostgreSQL and MariaDB.

Each worker is a separate OS process with its own engine and connections, as API workers and pilots are in
production; they race for the same task queues until every job is gone.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest
from sqlalchemy import func, select

from galaxy_dirac.wms import matcher, pilots
from galaxy_dirac.wms.db import Jobs, JobToPilotMapping, LoggingInfo, TQJobs, make_engine, read_transaction

from .helpers import make_db, make_settings, submit

WORKERS = 6
JOBS = 600


def _drain(db_url: str, stamp: str, start: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    engine = make_engine(db_url)
    pilot_id = pilots.register(engine, stamp, {"site": "LCG.Race.org"}, "galaxy")
    start.wait(30)
    taken = []
    slot = matcher.Slot(site="LCG.Race.org", processors=2, tags=["A", "B"], pilot_stamp=stamp)
    while True:
        job_id = matcher.match(engine, slot, pilot_id=pilot_id)
        if job_id is None:
            break
        taken.append(job_id)
    engine.dispose()
    out.put((stamp, taken))


@pytest.mark.slow
def test_each_job_goes_to_exactly_one_pilot(tmp_path, db_url) -> None:
    engine = make_db(db_url)
    settings = make_settings(tmp_path, db_url)
    # Several task queues, so workers also race across queues, not only within one.
    ids = []
    for tags in ([], ["A"], ["B"]):
        ids += submit(engine, settings, n=JOBS // 6, Tags=tags)
        ids += submit(engine, settings, n=JOBS // 6, Tags=tags, NumberOfProcessors=2)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(db_url, f"race-{i}", start, out)) for i in range(WORKERS)]
    for proc in procs:
        proc.start()
    start.set()
    results = dict(out.get(timeout=240) for _ in procs)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    taken = [job_id for per_pilot in results.values() for job_id in per_pilot]
    duplicates = [job for job, n in Counter(taken).items() if n > 1]
    assert duplicates == []
    assert sorted(taken) == sorted(ids)
    assert sum(1 for per_pilot in results.values() if per_pilot) >= 2, "the race never happened"
    with read_transaction(engine) as conn:
        assert conn.execute(select(func.count()).select_from(TQJobs)).scalar_one() == 0
        statuses = dict(conn.execute(select(Jobs.Status, func.count()).group_by(Jobs.Status)).all())
        assert statuses == {"Matched": len(ids)}
        mappings = conn.execute(select(JobToPilotMapping.JobID)).scalars().all()
        assert sorted(mappings) == sorted(ids)
        matched_records = conn.execute(
            select(func.count()).select_from(LoggingInfo).where(LoggingInfo.Status == "Matched")
        ).scalar_one()
        assert matched_records == len(ids)
    engine.dispose()
