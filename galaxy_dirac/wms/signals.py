"""A counter that threads bump and coroutines wait on, without polling.

Long polls (a pilot's match, a wrapper's command poll) must wake when this API worker queues a job or a Kill, and
must cost nothing while they wait: a thousand idle pilots polling a counter every 20 ms are 50,000 wake-ups a second.
The database is still re-read now and then for what other workers did; this only covers this process.
"""

from __future__ import annotations

import asyncio
import threading
from typing import List, Tuple


class Generation:
    """``value`` grows by one on each :meth:`bump` (from any thread); :meth:`wait_past` sleeps until it does."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()
        self._waiters: List[Tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def bump(self) -> None:
        with self._lock:
            self.value += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)

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


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
