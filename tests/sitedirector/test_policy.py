"""Table tests of the pure SiteDirector policy: the pilot formula, matching, damping, back-off, Unknown."""

from __future__ import annotations

import datetime as dt

import pytest

from sitedirector import policy
from sitedirector.config import QueueConfig
from sitedirector.policy import Health, Offer, PilotCounts

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    "cap, max_total, max_waiting, running, waiting, booting, matching, expected",
    [
        (10, 10, 5, 0, 0, 0, 100, 5),  # MaxWaiting binds
        (3, 10, 5, 0, 0, 0, 100, 3),  # per-cycle cap binds
        (10, 10, 5, 8, 0, 0, 100, 2),  # MaxTotal − running binds
        (10, 10, 5, 4, 3, 0, 100, 2),  # MaxWaiting − waiting = 2, MaxTotal − 7 = 3
        (10, 10, 10, 0, 2, 0, 3, 1),  # matching jobs − waiting pilots
        (10, 10, 10, 2, 0, 2, 3, 1),  # booting pilots damp the demand term
        (10, 10, 10, 0, 5, 0, 3, 0),  # more waiting pilots than jobs: never negative
        (10, 10, 5, 12, 0, 0, 100, 0),  # over MaxTotal (config lowered): zero
        (0, 10, 5, 0, 0, 0, 100, 0),  # cap 0 disables the queue
        (10, 10, 5, 0, 0, 0, 0, 0),  # no demand
    ],
)
def test_pilots_to_submit(cap, max_total, max_waiting, running, waiting, booting, matching, expected) -> None:
    got = policy.pilots_to_submit(
        cap=cap,
        max_total=max_total,
        max_waiting=max_waiting,
        running=running,
        waiting=waiting,
        booting=booting,
        matching_jobs=matching,
    )
    assert got == expected


OFFER = Offer(
    site="LCG.A.org", ce="ce.a.org", platform="EL9", tags=frozenset(policy.offered_tags(["GPU"], 4)),
    processors=4, memory=8000, cpu_time=86400,
)  # fmt: skip


@pytest.mark.parametrize(
    "tq, expected",
    [
        ({}, True),
        ({"Sites": ["LCG.A.org", "LCG.B.org"]}, True),
        ({"Sites": ["LCG.B.org"]}, False),
        ({"BannedSites": ["LCG.A.org"]}, False),
        ({"BannedSites": ["LCG.B.org"]}, True),
        ({"GridCEs": ["ce.a.org"]}, True),
        ({"GridCEs": ["ce.b.org"]}, False),
        ({"Platforms": ["EL9", "EL8"]}, True),
        ({"Platforms": ["EL8"]}, False),
        ({"Tags": ["GPU"]}, True),
        ({"Tags": ["4Processors", "MultiProcessor"]}, True),
        ({"Tags": ["8Processors"]}, False),
        ({"Tags": ["GPU", "Docker"]}, False),
        ({"CPUTime": 86400}, True),
        ({"CPUTime": 86401}, False),
        ({"MinRAM": 8000}, True),
        ({"MinRAM": 8001}, False),
    ],
)
def test_tq_matches(tq, expected) -> None:
    assert policy.tq_matches(tq, OFFER) is expected


def test_single_core_offer_has_no_multiprocessor_tag() -> None:
    assert policy.offered_tags([], 1) == {"1Processors"}
    assert policy.offered_tags(["X"], 2) == {"X", "1Processors", "2Processors", "MultiProcessor"}


def test_unlimited_offer_accepts_any_cpu_and_ram() -> None:
    assert policy.tq_matches({"CPUTime": 10**9, "MinRAM": 10**6}, Offer(site="S"))


def _row(status: str, age: float = 0, matched: int = 0) -> dict:
    return {"Status": status, "MatchedJobs": matched, "SubmissionTime": (NOW - dt.timedelta(seconds=age)).isoformat()}


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], PilotCounts()),
        ([_row("Submitted"), _row("Waiting"), _row("Scheduled")], PilotCounts(waiting=3)),
        ([_row("Unknown")], PilotCounts(waiting=1, unknown=1)),
        ([_row("Running", age=10)], PilotCounts(running=1, booting=1)),
        ([_row("Running", age=10, matched=1)], PilotCounts(running=1)),
        ([_row("Running", age=1000)], PilotCounts(running=1)),  # past boot grace: really running
        ([_row("Done", matched=0), _row("Done", matched=2), _row("Aborted")], PilotCounts(done=3, empty=1)),
    ],
)
def test_count_pilots(rows, expected) -> None:
    assert policy.count_pilots(rows, NOW, boot_grace=600) == expected


def test_count_pilots_accepts_naive_datetimes() -> None:
    row = {"Status": "Running", "MatchedJobs": 0, "SubmissionTime": NOW.replace(tzinfo=None)}
    assert policy.count_pilots([row], NOW, 600).booting == 1


def _q(name: str, site: str = "S", **kw) -> QueueConfig:
    return QueueConfig(name=name, type="local", site=site, ce="ce", **kw)


def _tq(tq_id: int, waiting: int, **kw) -> dict:
    return {"TQId": tq_id, "WaitingJobs": waiting, "CPUTime": 0, "MinRAM": 0, **kw}


@pytest.mark.parametrize(
    "queues, demand, counts, skip, expected",
    [
        # One queue, demand 3 → 3 pilots.
        ([_q("a")], [_tq(1, 3)], {}, {}, {"a": 3}),
        # Two queues at one site share 7 jobs: the second gets only what the first does not serve.
        ([_q("a", max_waiting=5), _q("b")], [_tq(1, 7)], {}, {}, {"a": 5, "b": 2}),
        # Pilots still waiting/booting in a count as serving the demand: b gets nothing.
        ([_q("a"), _q("b")], [_tq(1, 3)], {"a": PilotCounts(waiting=1, running=2, booting=2)}, {}, {"a": 0, "b": 0}),
        # Site-restricted demand goes to the right queue only.
        ([_q("a", "S1"), _q("b", "S2")], [_tq(1, 2, Sites=["S2"])], {}, {}, {"a": 0, "b": 2}),
        # A skipped queue gets nothing but its matching is still reported.
        ([_q("a")], [_tq(1, 3)], {}, {"a": "backing off"}, {"a": 0}),
        # Multi-processor demand only to queues that offer the cores.
        (
            [_q("one"), _q("four", processors=4)],
            [_tq(1, 2, Tags=["4Processors"])],
            {},
            {},
            {"one": 0, "four": 2},
        ),
    ],
)
def test_plan(queues, demand, counts, skip, expected) -> None:
    decisions = policy.plan(queues, demand, counts, skip)
    assert {d.queue: d.submit for d in decisions} == expected
    for d in decisions:
        assert d.queue in d.describe()
        assert bool(d.skipped) == (d.queue in skip)


def test_backoff_skips_for_n_cycles_then_resets() -> None:
    h = policy.after_cycle(Health(), "CE down", backoff_cycles=2)
    assert (h.failures, h.skip_cycles) == (1, 2)
    h, skipped = policy.tick(h)
    assert skipped
    h, skipped = policy.tick(h)
    assert skipped
    h, skipped = policy.tick(h)
    assert not skipped
    h = policy.after_cycle(h, "still down", backoff_cycles=2)
    assert (h.failures, h.skip_cycles) == (2, 4)  # consecutive failures back off longer
    assert policy.after_cycle(h, None, backoff_cycles=2) == Health()


def test_backoff_is_capped() -> None:
    h = Health(failures=50)
    assert policy.after_cycle(h, "x", backoff_cycles=3).skip_cycles == 30


@pytest.mark.parametrize(
    "first, states, now, timeout, aborted, still",
    [
        ({}, {"p1": "Unknown"}, 100.0, 60, [], {"p1": 100.0}),
        ({"p1": 100.0}, {"p1": "Unknown"}, 150.0, 60, [], {"p1": 100.0}),
        ({"p1": 100.0}, {"p1": "Unknown"}, 160.0, 60, ["p1"], {}),
        ({"p1": 100.0}, {"p1": "Running"}, 500.0, 60, [], {}),  # it came back: clock stops
        ({"p1": 100.0}, {}, 500.0, 60, [], {}),  # no longer tracked
    ],
)
def test_unknown_too_long_becomes_aborted(first, states, now, timeout, aborted, still) -> None:
    tracked = policy.track_unknown(first, states, now)
    expired, remaining = policy.unknown_to_abort(tracked, now, timeout)
    assert expired == aborted
    assert remaining == still
