"""DIRAC's matching rules, on every database backend (the eligibility query is SQL and differs per dialect)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from galaxy_dirac.wms import jobs, matcher, taskqueues
from galaxy_dirac.wms.matcher import Slot

from .helpers import ADMIN, BOB, make_db, make_settings, row, submit


@pytest.fixture
def env(tmp_path, db_url):
    engine = make_db(db_url)
    yield engine, make_settings(tmp_path, db_url)
    engine.dispose()


@pytest.mark.parametrize(
    ("cpu", "segment"),
    [(1, 360), (360, 360), (361, 1800), (3600, 3600), (86400, 86400), (86401, 172800), (10**8, int(12.5 * 86400))],
)
def test_cpu_time_segments(cpu: int, segment: int) -> None:
    assert taskqueues.fit_cpu_time(cpu) == segment


def test_slot_offers_processor_tags() -> None:
    assert Slot(site="S", processors=1).offered_tags() == ["1Processors"]
    assert Slot(site="S", processors=3, tags=["GPU"]).offered_tags() == [
        "1Processors",
        "2Processors",
        "3Processors",
        "GPU",
        "MultiProcessor",
    ]


# (job attributes, slot, matches?)
RULES = [
    ({}, Slot(site="LCG.A.fr"), True),
    ({"Site": "LCG.A.fr"}, Slot(site="LCG.A.fr"), True),
    ({"Site": "LCG.A.fr"}, Slot(site="LCG.B.de"), False),
    ({"Site": ["LCG.A.fr", "LCG.B.de"]}, Slot(site="LCG.B.de"), True),
    ({"BannedSites": ["LCG.A.fr"]}, Slot(site="LCG.A.fr"), False),
    ({"BannedSites": ["LCG.A.fr"]}, Slot(site="LCG.B.de"), True),
    ({"GridCE": "ce1.a.fr"}, Slot(site="LCG.A.fr", grid_ce="ce1.a.fr"), True),
    ({"GridCE": "ce1.a.fr"}, Slot(site="LCG.A.fr", grid_ce="ce2.a.fr"), False),
    ({"Tags": ["GPU"]}, Slot(site="S"), False),
    ({"Tags": ["GPU"]}, Slot(site="S", tags=["GPU", "Singularity"]), True),
    ({"Tags": ["GPU", "Singularity"]}, Slot(site="S", tags=["GPU"]), False),
    ({"NumberOfProcessors": 4}, Slot(site="S", processors=2), False),
    ({"NumberOfProcessors": 4}, Slot(site="S", processors=4), True),
    ({"NumberOfProcessors": 4}, Slot(site="S", processors=8), True),
    ({"NumberOfProcessors": 1}, Slot(site="S", processors=8), True),
    ({"CPUTime": 3000}, Slot(site="S", cpu_time=3600), True),  # segment 3600 ≤ 3600
    ({"CPUTime": 3601}, Slot(site="S", cpu_time=3600), False),  # segment 21600 > 3600
    ({"CPUTime": 3601}, Slot(site="S"), True),  # a slot without a declared limit takes anything
    ({"MinRAM": 4096}, Slot(site="S", max_ram=2048), False),
    ({"MinRAM": 4096}, Slot(site="S", max_ram=8192), True),
    ({"Platform": "el9"}, Slot(site="S", platforms=["el8"]), False),
    ({"Platform": "el9"}, Slot(site="S", platforms=["el8", "el9"]), True),
    ({"Platform": "el9"}, Slot(site="S"), False),
    (
        {"Site": "S", "Tags": ["GPU"], "NumberOfProcessors": 2, "MinRAM": 1000},
        Slot(site="S", tags=["GPU"], processors=2, max_ram=1000),
        True,
    ),
]


@pytest.mark.parametrize(("attrs", "slot", "expected"), RULES, ids=[str(i) for i in range(len(RULES))])
def test_matching_rules(env, attrs, slot, expected) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings, **attrs)
    assert matcher.match(engine, slot) == (job_id if expected else None)
    assert row(engine, job_id).Status == ("Matched" if expected else "Waiting")


def test_oldest_first_within_a_queue_and_priority_before_age(env) -> None:
    engine, settings = env
    low = submit(engine, settings, n=3, Priority=1)
    high = submit(engine, settings, n=2, Priority=5)
    matched = [matcher.match(engine, Slot(site="S")) for _ in range(5)]
    assert matched == high + low
    assert matcher.match(engine, Slot(site="S")) is None


def test_matched_job_records_site_and_pilot(env) -> None:
    from galaxy_dirac.wms import pilots

    engine, settings = env
    (job_id,) = submit(engine, settings)
    pilot_id = pilots.register(engine, "stamp-1", {"site": "LCG.A.fr"}, "galaxy")
    assert matcher.match(engine, Slot(site="LCG.A.fr", pilot_stamp="stamp-1"), pilot_id=pilot_id) == job_id
    assert row(engine, job_id).Site == "LCG.A.fr"
    assert pilots.jobs_of_pilot(engine, pilot_id) == [job_id]
    (pilot,) = pilots.list_pilots(engine, stamps=["stamp-1"])
    assert (pilot["MatchedJobs"], pilot["CurrentJobID"], pilot["Status"]) == (1, job_id, "Running")


def test_fair_share_between_groups(tmp_path) -> None:
    """Weighted-random choice across task queues follows group shares, whatever the job counts."""
    from galaxy_dirac.wms.auth import Principal

    url = f"sqlite:///{tmp_path / 'wms.sqlite'}"
    engine = make_db(url)
    settings = make_settings(tmp_path, url, group_shares={"big": 3.0, "small": 1.0})
    big = Principal("runner", "ann", "big", "galaxy")
    small = Principal("runner", "sam", "small", "galaxy")
    owner_of = {}
    for job_id in submit(engine, settings, n=400, principal=big):
        owner_of[job_id] = "big"
    for job_id in submit(engine, settings, n=400, principal=small):
        owner_of[job_id] = "small"
    rng = random.Random(7)
    counts = Counter(owner_of[matcher.match(engine, Slot(site="S"), rng=rng)] for _ in range(200))
    # Expected 150:50; allow sampling noise but not the 50:50 that job counts alone would give.
    assert 125 <= counts["big"] <= 175, counts


def test_weighted_order_prefers_high_priority() -> None:
    rng = random.Random(1)
    firsts = Counter(matcher.weighted_order([(1, 9.0), (2, 1.0)], rng)[0] for _ in range(2000))
    assert 1700 <= firsts[1] <= 1900, firsts


def test_killed_job_left_in_a_queue_is_skipped(env) -> None:
    """A stale task-queue entry (its job no longer Waiting) is dropped, and the next job is handed out."""
    from sqlalchemy import update

    from galaxy_dirac.wms.db import Jobs, write_transaction

    engine, settings = env
    first, second = submit(engine, settings, n=2)
    with write_transaction(engine) as conn:
        conn.execute(update(Jobs).where(Jobs.JobID == first).values(Status="Killed"))
    assert matcher.match(engine, Slot(site="S")) == second
    assert matcher.match(engine, Slot(site="S")) is None


def test_owner_groups_restrict_a_slot(env) -> None:
    engine, settings = env
    (job_id,) = submit(engine, settings, principal=BOB)
    assert matcher.match(engine, Slot(site="S", owner_groups=["other_group"])) is None
    assert matcher.match(engine, Slot(site="S", owner_groups=["galaxy_user"])) == job_id
    assert jobs.search(engine, BOB)[1] == 1


def test_rescheduled_job_can_return_to_the_same_pilot(env) -> None:
    """A job rescheduled and matched again by the pilot that had it must not trip over its old mapping row."""
    from galaxy_dirac.wms import pilots

    engine, settings = env
    (job_id,) = submit(engine, settings)
    pilot_id = pilots.register(engine, "stamp-again", {"site": "S"}, "galaxy")
    slot = Slot(site="S", pilot_stamp="stamp-again")
    assert matcher.match(engine, slot, pilot_id=pilot_id) == job_id
    assert jobs.reschedule(engine, [job_id], ADMIN, settings)["success"]
    assert matcher.match(engine, slot, pilot_id=pilot_id) == job_id
    assert row(engine, job_id).RescheduleCounter == 1
    assert pilots.jobs_of_pilot(engine, pilot_id) == [job_id]
