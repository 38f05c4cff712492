"""The one time format: what every component writes, every component reads."""

from __future__ import annotations

import datetime as dt

import pytest

from galaxy_dirac.pilot.build import payload_sources, pilot_sources
from galaxy_dirac.times import format_time, parse_time, to_naive_utc


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-12-01T16:30:00Z", dt.datetime(2026, 12, 1, 16, 30)),
        ("2026-12-01T16:30:00.250000Z", dt.datetime(2026, 12, 1, 16, 30, 0, 250000)),
        ("2026-12-01T18:30:00+02:00", dt.datetime(2026, 12, 1, 16, 30)),
        ("2026-12-01T16:30:00", dt.datetime(2026, 12, 1, 16, 30)),  # naive means UTC
        (" 2026-12-01 16:30:00z ", dt.datetime(2026, 12, 1, 16, 30)),
    ],
)
def test_every_form_reads_as_the_same_utc_moment(text: str, expected: dt.datetime) -> None:
    assert to_naive_utc(parse_time(text)) == expected
    assert format_time(parse_time(text)) == expected.isoformat() + "Z"


def test_written_times_read_back() -> None:
    moment = dt.datetime(2026, 12, 1, 16, 30, 1, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert format_time(moment) == "2026-12-01T21:30:01.000005Z"
    assert parse_time(format_time(moment)) == moment


def test_bad_text_and_unrepresentable_times_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_time("yesterday")
    with pytest.raises(OverflowError):
        to_naive_utc(parse_time("9999-12-31T23:59:59-23:59"))


def test_both_zipapps_ship_it() -> None:
    for sources in (pilot_sources(), payload_sources()):
        assert "galaxy_dirac/times.py" in dict(sources)
