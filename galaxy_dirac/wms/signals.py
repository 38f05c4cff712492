"""A counter that threads bump and coroutines wait on, without polling.

Long polls (a pilot's match, a wrapper's command poll) must wake when this API worker queues a job or a Kill, and
must cost nothing while they wait: a thousand idle pilots polling a counter every 20 ms are 50,000 wake-ups a second.
API workers on one host share a marker file (:meth:`Generation.share`): a bump touches it and each worker's
:meth:`Generation.watch` task, one ``stat`` every quarter second whatever the number of waiters, wakes its own
waiters. Workers on other hosts are heard through the database: :meth:`Generation.follow` runs one cheap query a
second per worker (the newest queue event, command, status change) and wakes the waiters when it moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from starlette.concurrency import run_in_threadpool


class Generation:
    """``value`` grows by one on each :meth:`bump` (from any thread); :meth:`wait_past` sleeps until it does."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._marker: Optional[str] = None

    def share(self, marker: str) -> None:
        """Tell the other workers of this host through ``marker`` (a file beside the server's data)."""
        self._marker = marker
        _touch(marker)

    def bump(self) -> None:
        self._wake()
        if self._marker:
            _touch(self._marker)

    async def watch(self, interval: float = 0.25) -> None:
        """Wake this process's waiters when another worker bumps (the marker changes); runs until cancelled."""
        last = _mtime(self._marker)
        while True:
            await asyncio.sleep(interval)
            now = _mtime(self._marker)
            if now != last:
                last = now
                self._wake()

    def _wake(self) -> None:
        with self._lock:
            self.value += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)

    async def follow(self, probe: Callable[[], Any], stop: asyncio.Event, interval: float = 1.0) -> None:
        """Wake this process's waiters when ``probe()`` (a cheap query, in the thread pool) answers something new:
        what other hosts did reaches the long polls here with one query per interval, however many waiters there
        are. A failing probe (database down) is tried again at the next interval. Runs until ``stop`` is set, and
        then returns only once no probe is running, so nothing touches the database after its owner shut down
        (cancelling would leave a probe's thread, and its connection, behind)."""
        unread = last = object()  # the probe's answer may be None (an empty table)
        while not stop.is_set():
            with contextlib.suppress(Exception):
                value = await run_in_threadpool(probe)
                if last is not unread and value != last:
                    self._wake()
                last = value
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def wait_past(self, seen: int, timeout: float) -> None:
        """Return once ``value`` differs from ``seen``, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiter = (loop, future)
        with self._lock:
            if self.value != seen:
                return
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(future, max(0.0, timeout))
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


def _touch(path: str) -> None:
    """Set the marker's mtime to now in nanoseconds, given explicitly: the file system's own clock is coarse (a
    jiffy), and two bumps in one tick must still read as a change."""
    with contextlib.suppress(OSError):
        with open(path, "a"):
            stamp = time.time_ns()
            os.utime(path, ns=(stamp, stamp))


def _mtime(path: Optional[str]) -> int:
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return 0


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def long_poll(changes: Generation, recheck: float, wait: float, attempt: Callable[[], Any]) -> Any:
    """``attempt()`` (blocking, in the thread pool) until it answers something (not None, not empty) or ``wait``
    seconds pass; between tries, sleep until ``changes`` moves on or ``recheck`` seconds pass (other hosts)."""
    deadline = time.monotonic() + wait
    while True:
        seen = changes.value
        answer = await run_in_threadpool(attempt)
        if (answer is not None and answer != []) or time.monotonic() >= deadline:
            return answer
        await changes.wait_past(seen, min(deadline, time.monotonic() + recheck) - time.monotonic())
