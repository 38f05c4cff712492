"""The payload's guard: kills a payload whose pilot died, so a rescheduled job never runs twice at once.

The pilot starts each payload in a session of its own (so a kill reaches the payload's whole tree and not the pilot),
which also means a SIGKILLed pilot, or a batch system that signals only the pilot's process group, leaves the payload
running while the scheduler hands the job to another pilot. ``PR_SET_PDEATHSIG`` reaches only a direct child, and
only when the forking *thread* ends. So beside each payload the pilot starts this guard, in a session of its own too,
holding the read end of a pipe whose write end only the pilot has. When the pilot ends in any way the kernel closes
that end; the guard then kills the payload's session and descendants (:func:`watchdog.kill_tree`) unless the pilot
said ``done`` first. Standard library only: it ships in the pilot zipapp.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import IO, List, Optional, Sequence

from galaxy_dirac.pilot.watchdog import _read_stat, kill_tree

DONE = b"done\n"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (``/proc/<pid>/stat`` field 22): a PID reused later has another."""
    fields = _read_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def guard(pid: int, grace: float, pipe: IO[bytes]) -> bool:
    """Wait for the pilot to close ``pipe``; kill ``pid``'s tree unless it wrote :data:`DONE`. True if it killed."""
    started = _start_time(pid)
    said = b""
    while True:
        chunk = pipe.read(64)
        if not chunk:
            break
        said = (said + chunk)[-len(DONE) :]
    if said == DONE:
        return False
    if started is not None and _start_time(pid) == started:
        kill_tree(pid, grace, lambda: _start_time(pid) == started)
        return True
    # The payload itself is gone and its PID may be someone else's now: neither that PID's process group nor its
    # children are the payload's, only the processes still in the payload's session.
    strays = [p for p in _session(pid) if p != pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for stray in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(stray, sig)
        if sig == signal.SIGTERM and strays:
            time.sleep(grace)
    return bool(strays)


def _session(sid: int) -> List[int]:
    """PIDs of the processes in session ``sid`` (``/proc/<pid>/stat`` field 6)."""
    members = []
    for entry in os.listdir("/proc"):
        fields = _read_stat(int(entry)) if entry.isdigit() else None
        if fields is not None and len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def start(pid: int, grace: float) -> Guard:
    """Start a guard process for the payload ``pid`` (a session leader); the returned handle releases it."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import sys; sys.path.insert(0, {package_root!r}); from galaxy_dirac.pilot.guard import main; main()"
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-s", "-c", code, str(pid), str(grace)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Guard(process, write_end)


class Guard:
    """The pilot's end of one guard: ``release`` once the payload has ended and been collected."""

    def __init__(self, process: subprocess.Popen, write_end: int) -> None:
        self.process = process
        self._fd: Optional[int] = write_end

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, DONE)
        finally:
            os.close(self._fd)
            self._fd = None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    pid, grace = int(args[0]), float(args[1])
    guard(pid, grace, sys.stdin.buffer)
    return 0
