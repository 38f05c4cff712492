"""Small pieces of the job wrapper: the payload's environment, JDL value coercion, clock offsets."""

from __future__ import annotations

import datetime as dt
import os

from galaxy_dirac.pilot.wrapper import as_list, as_number, clock_offset, job_environment


def test_payload_environment_hides_the_pilot_token():
    job = {"MaxRAM": 2048, "Environment": ["A=1", "B=x=y"], "ExecutionEnvironment": "C=3"}
    base = {"PATH": os.defpath, "GALAXY_DIRAC_PILOT_TOKEN": "secret", "GALAXY_DIRAC_PILOT_URL": "u"}
    env = job_environment(job, 42, 3, base)
    assert not any(name.startswith("GALAXY_DIRAC_PILOT_") for name in env)
    assert env["PATH"] == os.defpath
    assert env["DIRAC_JOB_PROCESSORS"] == env["OMP_NUM_THREADS"] == env["GALAXY_SLOTS"] == "3"
    assert env["DIRACJOBID"] == "42" and env["GALAXY_MEMORY_MB"] == "2048"
    assert (env["A"], env["B"], env["C"]) == ("1", "x=y", "3")


def test_jdl_values_are_coerced_leniently():
    assert as_list(None) == [] and as_list("") == [] and as_list("a") == ["a"] and as_list(["a", "", 3]) == ["a", "3"]
    assert as_number("3600") == 3600.0 and as_number(2) == 2.0 and as_number("x") is None and as_number(True) is None


def test_clock_offset_from_server_time():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert clock_offset((now + dt.timedelta(minutes=7)).isoformat(), now) == 420.0
    assert clock_offset("2026-01-01T11:59:00Z", now) == -60.0
    assert clock_offset("2026-01-01T12:00:00.3", now) == 0.0
    assert clock_offset(None, now) == 0.0 and clock_offset("garbage", now) == 0.0
