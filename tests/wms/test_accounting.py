"""Accounting plots over a synthetic month: every number behind every plot against an independent calculation."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import Engine

from galaxy_dirac import states
from galaxy_dirac.wms import accounting, cli
from galaxy_dirac.wms.db import create_schema, make_engine
from tests.wms.synthetic import GROUPS, MONTH_END, MONTH_START, SITES, Month, build_month

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402 - matplotlib brings Pillow

DAY = 86400
ENDED = {states.DONE, states.FAILED, states.KILLED}


@pytest.fixture(scope="module")
def month_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Month, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('acct') / 'wms.sqlite'}"
    engine = make_engine(url)
    create_schema(engine)
    month = build_month(engine, n_jobs=4000)
    yield engine, month, url
    engine.dispose()


def bucket_index(when: dt.datetime, lo: dt.datetime, bucket: int) -> int:
    return int((when - lo).total_seconds() // bucket)


def expected_wall(job: Any) -> float:
    if job.Wall is not None:
        return job.Wall
    return (job.End - job.Start).total_seconds() if job.Start else 0.0


def assert_series(actual: dict[str, list[float]], expected: dict[str, list[float]], tol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name, values in expected.items():
        assert actual[name] == pytest.approx(values, abs=tol), name


def check_png(data: dict[str, Any], width: int = 1200, height: int = 600) -> None:
    png = accounting.render_png(data, width, height)
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.format == "PNG" and image.size == (width, height)


def test_month_is_realistic(month_db: tuple[Engine, Month, str]) -> None:
    _, month, _ = month_db
    assert {j.Site for j in month.jobs} == set(SITES) and len(SITES) == 30
    assert {j.OwnerGroup for j in month.jobs} == set(GROUPS) and len(GROUPS) == 10
    statuses = {j.Status for j in month.jobs}
    assert {states.DONE, states.FAILED, states.KILLED, states.RUNNING} <= statuses
    assert sum(j.Reschedules > 0 for j in month.jobs) > 100
    assert any(j.Reschedules > 3 and j.Status == states.FAILED for j in month.jobs)
    assert any(p.Status == states.PILOT_FAILED for p in month.pilots)


def test_jobs_by_site_and_cumulative(month_db: tuple[Engine, Month, str]) -> None:
    engine, month, _ = month_db
    data = accounting.aggregate(engine, "jobs-by-site", MONTH_START, MONTH_END, DAY)
    assert len(data["buckets"]) == 31 and data["buckets"][0] == "2026-10-01T00:00:00Z"
    expected: dict[str, list[float]] = defaultdict(lambda: [0.0] * 31)
    done: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    wall: dict[str, float] = defaultdict(float)
    cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for job in month.jobs:
        if job.Status in ENDED and MONTH_START <= job.End < MONTH_END:
            expected[job.Site][bucket_index(job.End, MONTH_START, DAY)] += 1
            if job.Status == states.DONE:
                done[job.Site] += 1
            else:
                failed[job.Site] += 1
            wall[job.Site] += expected_wall(job)
            if job.CPU is not None:
                cpu[job.Site][0] += job.CPU
                cpu[job.Site][1] += job.Wall
    assert_series(data["series"], expected)
    totals = [sum(v) for v in data["series"].values()]
    assert totals == sorted(totals, reverse=True), "legend is ordered by total, as DIRAC does"
    table = {row["Site"]: row for row in data["table"]}
    assert set(table) == set(expected)
    for site, values in expected.items():
        row = table[site]
        assert (row["Max"], row["Min"], row["Current"]) == (max(values), min(values), values[-1])
        assert row["Average"] == pytest.approx(sum(values) / 31)
        assert (row["Done"], row["Failed"], row["Total"]) == (done[site], failed[site], done[site] + failed[site])
        assert row["FailedPercent"] == pytest.approx(100 * failed[site] / row["Total"])
        assert row["MeanWallClockHours"] == pytest.approx(wall[site] / row["Total"] / 3600)
        assert row["CPUEfficiencyPercent"] == pytest.approx(100 * cpu[site][0] / cpu[site][1], rel=1e-6)
    check_png(data)

    cumulative = accounting.aggregate(engine, "cumulative-jobs-by-site", MONTH_START, MONTH_END, DAY)
    running = {site: [sum(values[: i + 1]) for i in range(31)] for site, values in expected.items()}
    assert_series(cumulative["series"], running)
    assert sum(v[-1] for v in cumulative["series"].values()) == sum(
        1 for j in month.jobs if j.Status in ENDED and MONTH_START <= j.End < MONTH_END
    )
    check_png(cumulative, 800, 500)


@pytest.mark.parametrize("bucket", [DAY, 6 * 3600])
def test_running_jobs_by_group(month_db: tuple[Engine, Month, str], bucket: int) -> None:
    engine, month, _ = month_db
    data = accounting.aggregate(engine, "running-jobs-by-group", MONTH_START, MONTH_END, bucket)
    n = len(data["buckets"])
    assert n == 31 * DAY // bucket
    expected: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)
    for job in month.jobs:
        if job.Start is None:
            continue
        end = job.End or MONTH_END  # still running: counts up to the end of the period (now is later)
        for i in range(n):
            b0 = MONTH_START + dt.timedelta(seconds=i * bucket)
            b1 = b0 + dt.timedelta(seconds=bucket)
            overlap = (min(end, b1) - max(job.Start, b0)).total_seconds()
            if overlap > 0:
                expected[job.OwnerGroup][i] += overlap / bucket
    assert_series(data["series"], expected)
    assert data["stacked"] is True
    check_png(data)


def test_cumulative_walltime_by_group(month_db: tuple[Engine, Month, str]) -> None:
    engine, month, _ = month_db
    data = accounting.aggregate(engine, "cumulative-walltime-by-group", MONTH_START, MONTH_END, DAY)
    per_bucket: dict[str, list[float]] = defaultdict(lambda: [0.0] * 31)
    for job in month.jobs:
        if job.Status in ENDED and MONTH_START <= job.End < MONTH_END:
            per_bucket[job.OwnerGroup][bucket_index(job.End, MONTH_START, DAY)] += expected_wall(job) / 3600
    expected = {g: [sum(v[: i + 1]) for i in range(31)] for g, v in per_bucket.items()}
    assert_series(data["series"], expected, tol=1e-6)
    assert data["unit"] == "hours"
    check_png(data)


def test_pilots_per_ce(month_db: tuple[Engine, Month, str]) -> None:
    engine, month, _ = month_db
    data = accounting.aggregate(engine, "pilots-per-ce", MONTH_START, MONTH_END, DAY)
    submitted: dict[str, list[float]] = defaultdict(lambda: [0.0] * 31)
    failed: dict[str, list[float]] = defaultdict(lambda: [0.0] * 31)
    for pilot in month.pilots:
        submitted[pilot.CE][bucket_index(pilot.Submitted, MONTH_START, DAY)] += 1
        if pilot.Status in (states.PILOT_FAILED, states.PILOT_ABORTED) and pilot.LastUpdate < MONTH_END:
            failed[pilot.CE][bucket_index(pilot.LastUpdate, MONTH_START, DAY)] += 1
    assert_series(data["series"], submitted)
    for ce in submitted:
        failed.setdefault(ce, [0.0] * 31)
    assert_series(data["failed"], failed)
    table = {row["CE"]: row for row in data["table"]}
    for ce, values in submitted.items():
        assert table[ce]["Submitted"] == sum(values)
        assert table[ce]["Failed"] == sum(failed[ce])
    check_png(data)
    rows = list(csv.reader(io.StringIO(accounting.to_csv(data))))
    assert rows[0][0] == "bucket" and len(rows) == 32
    assert sum(int(r[1]) for r in rows[1:]) == sum(next(iter(data["series"].values())))
    assert any(h.startswith("failed:") for h in rows[0])


def test_csv_matches_json(month_db: tuple[Engine, Month, str]) -> None:
    engine, _, _ = month_db
    data = accounting.aggregate(engine, "jobs-by-site", MONTH_START, MONTH_END, DAY)
    rows = list(csv.DictReader(io.StringIO(accounting.to_csv(data))))
    assert [r["bucket"] for r in rows] == data["buckets"]
    for site, values in data["series"].items():
        assert [float(r[site]) for r in rows] == values


def test_period_parsing_and_limits() -> None:
    now = dt.datetime(2026, 11, 24, 12, 0)
    assert accounting.parse_duration("15m") == 900 and accounting.parse_duration("1w") == 7 * DAY
    assert accounting.parse_time("30d", now) == now - dt.timedelta(days=30)
    assert accounting.parse_time("2026-10-01T02:00:00+02:00") == dt.datetime(2026, 10, 1)
    starts = accounting.buckets_for(dt.datetime(2026, 10, 1, 5), dt.datetime(2026, 10, 3, 1), DAY)
    assert starts == [dt.datetime(2026, 10, d) for d in (1, 2, 3)]
    for bad in ("0", "1y", "abc"):
        with pytest.raises(accounting.AccountingError):
            accounting.parse_duration(bad)
    with pytest.raises(accounting.AccountingError, match="too many"):
        accounting.buckets_for(MONTH_START, MONTH_END, 60)
    with pytest.raises(accounting.AccountingError, match="empty"):
        accounting.buckets_for(MONTH_END, MONTH_START, DAY)


def test_empty_period_still_renders(month_db: tuple[Engine, Month, str]) -> None:
    engine, _, _ = month_db
    for kind in accounting.KINDS:
        data = accounting.aggregate(engine, kind, dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 8), DAY)
        assert data["series"] == {}
        check_png(data, 600, 300)


@pytest.mark.parametrize("fmt", ["png", "json", "csv"])
def test_cli_plot(month_db: tuple[Engine, Month, str], tmp_path: Path, fmt: str) -> None:
    _, _, url = month_db
    out = tmp_path / f"plot.{fmt}"
    argv = [
        "plot",
        "jobs-by-site",
        "--db",
        url,
        "--home",
        str(tmp_path / "home"),
        "--since",
        "2026-10-01",
        "--until",
        "2026-11-01",
        "--bucket",
        "1d",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 0
    if fmt == "png":
        with Image.open(out) as image:
            assert image.size == (1200, 600)
    elif fmt == "json":
        data = json.loads(out.read_text())
        assert data["kind"] == "jobs-by-site" and len(data["series"]) == 30
    else:
        assert out.read_text().startswith("bucket,")
    assert cli.main([*argv[:-2], "--bucket", "1s", "-o", str(out)]) == 2  # too many buckets: a clear error


def test_aggregate_cache_hands_out_copies(month_db: tuple[Engine, Month, str]) -> None:
    engine, _, _ = month_db
    first = accounting.aggregate(engine, "jobs-by-site", MONTH_START, MONTH_END, DAY)
    first["series"].clear()
    again = accounting.aggregate(engine, "jobs-by-site", MONTH_START, MONTH_END, DAY)
    assert again["series"] and again == accounting.aggregate(
        engine, "jobs-by-site", MONTH_START, MONTH_END, DAY, cache=False
    )
