"""The long polls' wake-up: a bump from any thread wakes a waiting coroutine at once; nothing polls."""

from __future__ import annotations

import asyncio
import threading
import time

from galaxy_dirac.wms.signals import Generation


def test_a_bump_from_another_thread_wakes_the_waiter_at_once() -> None:
    changes = Generation()

    async def wait() -> float:
        started = time.monotonic()
        threading.Timer(0.2, changes.bump).start()
        await changes.wait_past(changes.value, 30)
        return time.monotonic() - started

    waited = asyncio.run(wait())
    assert 0.15 < waited < 10, waited  # woken by the bump, long before the 30 s timeout
    assert changes.value == 1 and not changes._waiters


def test_a_missed_bump_returns_at_once_and_a_quiet_one_times_out() -> None:
    changes = Generation()
    seen = changes.value
    changes.bump()

    async def both() -> None:
        await asyncio.wait_for(changes.wait_past(seen, 30), 5)  # already moved on
        started = time.monotonic()
        await changes.wait_past(changes.value, 0.2)
        assert time.monotonic() - started >= 0.19

    asyncio.run(both())
    assert not changes._waiters


def test_a_bump_in_another_process_wakes_this_ones_waiters_through_the_marker(tmp_path) -> None:  # noqa: ANN001
    marker = str(tmp_path / ".changed")
    here, there = Generation(), Generation()  # two API workers of one host
    here.share(marker)
    there.share(marker)

    async def wait() -> float:
        watcher = asyncio.create_task(here.watch(interval=0.05))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        threading.Timer(0.2, there.bump).start()
        await here.wait_past(here.value, 30)
        watcher.cancel()
        return time.monotonic() - started

    assert asyncio.run(wait()) < 10


def test_follow_wakes_waiters_when_the_probe_moves_also_from_nothing() -> None:
    """The probe's first answer is only a reading; a later different one (None → 1 when the first row appears, as
    with an empty table) wakes; a failing probe neither wakes nor stops the follower."""
    answers = iter([None, None, RuntimeError("database down"), None, 1, 1])

    def probe() -> object:
        answer = next(answers, 1)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def run() -> tuple[int, float]:
        changes, stop = Generation(), asyncio.Event()
        follower = asyncio.create_task(changes.follow(probe, stop, interval=0.05))
        started = time.monotonic()
        await changes.wait_past(changes.value, 10)
        waited = time.monotonic() - started
        await asyncio.sleep(0.3)  # the probe stays at 1: no further wake-ups
        stop.set()
        await asyncio.wait_for(follower, 5)  # it ends by itself once told to
        return changes.value, waited

    value, waited = asyncio.run(run())
    assert value == 1 and waited < 5
