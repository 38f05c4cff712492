"""The payload guard: a pilot that dies takes its payload with it; one that ends normally kills nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from galaxy_dirac.pilot import guard
from galaxy_dirac.pilot.watchdog import live
from tests.conftest import wait_for


def _payload() -> subprocess.Popen:
    """A session leader with a stray that started a session of its own, as a payload's tool might."""
    return subprocess.Popen(
        ["/bin/sh", "-c", "setsid sleep 120 & echo $!; exec sleep 120"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def test_a_pilot_that_goes_away_takes_the_payload_and_its_strays() -> None:
    payload = _payload()
    stray = int(payload.stdout.readline())
    handle = guard.start(payload.pid, grace=1.0)
    try:
        os.close(handle._fd)  # what the kernel does when the pilot is SIGKILLed
        handle._fd = None
        wait_for(lambda: payload.poll() is not None and not live([stray]), 10, "the guard to kill the payload")
        assert handle.process.wait(10) == 0
    finally:
        for pid in (payload.pid, stray):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        payload.wait()


def test_a_released_guard_kills_nothing() -> None:
    payload = _payload()
    stray = int(payload.stdout.readline())
    try:
        handle = guard.start(payload.pid, grace=1.0)
        handle.release()
        assert handle.process.returncode == 0
        assert payload.poll() is None and live([stray])
    finally:
        os.killpg(payload.pid, signal.SIGKILL)
        os.kill(stray, signal.SIGKILL)
        payload.wait()


def test_a_payload_that_already_ended_leaves_only_its_session_strays_to_kill() -> None:
    """The payload's PID may belong to someone else by now: only processes still in its session are killed."""
    payload = subprocess.Popen(["/bin/sh", "-c", "sleep 120 & echo $!"], stdout=subprocess.PIPE, start_new_session=True)
    stray = int(payload.stdout.readline())
    handle = guard.start(payload.pid, grace=0.5)
    try:
        payload.wait()  # gone and reaped; its background child stays in its session
        assert live([stray])
        os.close(handle._fd)
        handle._fd = None
        wait_for(lambda: not live([stray]), 10, "the guard to kill the stray")
        assert handle.process.wait(10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stray, signal.SIGKILL)
