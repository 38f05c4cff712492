"""Watching a running payload: resource sampling, limits, heartbeats and the Kill command.

The scheduler only knows a job is alive, and what it consumes, through heartbeats; and a kill only reaches a payload
through the heartbeat's answer. So while the payload runs, one thread samples its whole process tree from ``/proc``
(payloads fork: a Galaxy job script starts the tool, which starts more) and enforces the JDL's limits, and another
sends a heartbeat every interval and obeys the commands that come back. Killing is always of the whole tree: the
payload's process group (it runs in its own session) plus any descendant that left it, SIGTERM first and SIGKILL after
a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from galaxy_dirac.pilot.http import Client, HTTPError

log = logging.getLogger(__name__)

MEMORY_LIMIT = "Memory limit exceeded"
CPU_LIMIT = "CPU time limit exceeded"
WALL_LIMIT = "Wall clock time limit exceeded"
DISK_LIMIT = "Disk space limit exceeded"
#: The scheduler no longer accepts this job token (the job was rescheduled to another pilot or deleted).
LOST = "lost"

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MB = 1024.0 * 1024.0


def _read_stat(pid: int) -> Optional[List[str]]:
    """Fields of ``/proc/<pid>/stat`` after the command name (which may contain spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            data = stream.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def process_tree(root: int) -> List[int]:
    """PIDs of ``root``'s session plus all its descendants (also those that started their own session)."""
    parents: Dict[int, int] = {}
    sessions: Dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is None or len(fields) < 4:
            continue
        parents[int(entry)] = int(fields[1])
        sessions[int(entry)] = int(fields[3])
    members = {pid for pid, sid in sessions.items() if sid == root}
    if root in parents:
        members.add(root)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return sorted(members)


class Sample:
    """Resources used by a process tree at one moment."""

    def __init__(self, rss_mb: float = 0.0, vsize_mb: float = 0.0, cpu_seconds: float = 0.0, pids: int = 0) -> None:
        self.rss_mb = rss_mb
        self.vsize_mb = vsize_mb
        self.cpu_seconds = cpu_seconds
        self.pids = pids


def sample_tree(pids: List[int]) -> Sample:
    """Sum RSS, virtual size and CPU time (user + system, including reaped children) over ``pids``."""
    rss = vsize = ticks = 0
    alive = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is None or len(fields) < 22:
            continue
        alive += 1
        ticks += sum(int(value) for value in fields[11:15])
        vsize += int(fields[20])
        rss += int(fields[21]) * _PAGE
    return Sample(rss / _MB, vsize / _MB, ticks / float(_TICKS), alive)


def directory_size_mb(path: str) -> float:
    """Disk used by the files under ``path`` (without following links)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total / _MB


def tail(path: str, max_bytes: int = 5000) -> str:
    """The end of a text file, for the heartbeat's StandardOutput."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - max_bytes))
            data = stream.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if size > max_bytes and "\n" in text:
        text = text[text.index("\n") + 1 :]
    return text


class Limits:
    """What the JDL allows the payload: CPU seconds (whole tree), wall-clock seconds, RSS MB, disk MB.

    ``min_free_disk_mb`` guards the slot's disk rather than the job's allowance: a full scratch disk breaks every job on
    the node, so the job filling it is stopped.
    """

    def __init__(
        self,
        cpu_time: Optional[float] = None,
        wall_clock: Optional[float] = None,
        memory_mb: Optional[float] = None,
        disk_mb: Optional[float] = None,
        min_free_disk_mb: float = 10.0,
    ) -> None:
        self.cpu_time = cpu_time or None
        self.wall_clock = wall_clock or None
        self.memory_mb = memory_mb or None
        self.disk_mb = disk_mb or None
        self.min_free_disk_mb = min_free_disk_mb


def kill_tree(pgid: int, grace: float, still_running: Callable[[], bool]) -> None:
    """SIGTERM the process group and its strays, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = process_tree(pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not still_running() and not live(process_tree(pgid)):
                return
            time.sleep(0.05)


def live(pids: List[int]) -> bool:
    """Whether any of ``pids`` is still running (zombies waiting to be reaped do not count)."""
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None and fields[0] not in ("Z", "X"):
            return True
    return False


class Watchdog:
    """Samples, limits and heartbeats for one running payload.

    ``finished`` must be set by the caller once the payload's main process has been reaped. After that, ``reason``
    says why the watchdog killed it, if it did: ``"Kill"`` (command from the scheduler), ``"abort"`` (the pilot
    handed the job back), :data:`LOST` (the scheduler refuses this job's heartbeats: it was given to another pilot)
    or a limit constant such as :data:`MEMORY_LIMIT`, with ``detail`` giving the numbers.
    """

    def __init__(
        self,
        pid: int,
        *,
        job_id: int,
        client: Optional[Client],
        job_dir: str,
        stdout_path: str,
        limits: Limits,
        interval: float = 30.0,
        kill_grace: float = 10.0,
        sample_period: Optional[float] = None,
        command_wait: float = 25.0,
    ) -> None:
        self.pid = pid
        self.job_id = job_id
        self.client = client
        self.job_dir = job_dir
        self.stdout_path = stdout_path
        self.limits = limits
        self.interval = interval
        self.kill_grace = kill_grace
        self.command_wait = command_wait
        self.sample_period = sample_period or min(max(interval / 5.0, 0.5), 5.0)
        self.finished = threading.Event()
        self.reason: Optional[str] = None
        self.detail = ""
        self.sample = Sample()
        self.max_rss_mb = 0.0
        self.cpu_seconds = 0.0
        self.heartbeats = 0
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._disk_checked = 0.0
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._watch, "watchdog"), (self._beat, "heartbeat")):
            thread = threading.Thread(target=target, name=f"{name}-{self.job_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.client is not None and self.command_wait > 0:  # not joined: a poll in flight ends by itself
            threading.Thread(target=self._listen, name=f"commands-{self.job_id}", daemon=True).start()

    def join(self, timeout: Optional[float] = None) -> None:
        self.finished.set()
        for thread in self._threads:
            thread.join(timeout)

    def wall_clock(self) -> float:
        return time.monotonic() - self._start

    def kill(self, reason: str, detail: str = "") -> None:
        """Kill the payload tree once; the first reason given wins."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.detail = reason, detail
        log.warning("job %d: killing payload (%s%s)", self.job_id, reason, f": {detail}" if detail else "")
        threading.Thread(
            target=kill_tree, args=(self.pid, self.kill_grace, lambda: not self.finished.is_set()), daemon=True
        ).start()

    # -- sampling and limits -----------------------------------------------------------------------------------------

    def _measure(self) -> Sample:
        sample = sample_tree(process_tree(self.pid))
        self.sample = sample
        self.max_rss_mb = max(self.max_rss_mb, sample.rss_mb)
        self.cpu_seconds = max(self.cpu_seconds, sample.cpu_seconds)
        return sample

    def free_disk_mb(self) -> float:
        try:
            return shutil.disk_usage(self.job_dir).free / _MB
        except OSError:
            return 0.0

    def check(self) -> Optional[Tuple[str, str]]:
        """The first limit the payload exceeds now, as (minor status, detail), or ``None``."""
        sample = self._measure()
        limits = self.limits
        if limits.memory_mb and sample.rss_mb > limits.memory_mb:
            return MEMORY_LIMIT, f"RSS {sample.rss_mb:.0f} MB > MaxRAM {limits.memory_mb:.0f} MB"
        if limits.cpu_time and self.cpu_seconds > limits.cpu_time:
            return CPU_LIMIT, f"CPU {self.cpu_seconds:.0f} s > CPUTime {limits.cpu_time:.0f} s"
        wall = self.wall_clock()
        if limits.wall_clock and wall > limits.wall_clock:
            return WALL_LIMIT, f"wall clock {wall:.0f} s > MaxWallClockTime {limits.wall_clock:.0f} s"
        now = time.monotonic()
        if now - self._disk_checked >= min(self.interval, 30.0):
            self._disk_checked = now
            free = self.free_disk_mb()
            if limits.min_free_disk_mb and free < limits.min_free_disk_mb:
                return DISK_LIMIT, f"free disk {free:.0f} MB < {limits.min_free_disk_mb:.0f} MB"
            if limits.disk_mb:
                used = directory_size_mb(self.job_dir)
                if used > limits.disk_mb:
                    return DISK_LIMIT, f"job directory {used:.0f} MB > MaxDiskSpace {limits.disk_mb:.0f} MB"
        return None

    def _watch(self) -> None:
        while not self.finished.is_set():
            try:
                exceeded = self.check()
            except Exception:
                log.exception("job %d: sampling failed", self.job_id)
                exceeded = None
            if exceeded is not None:
                self.kill(*exceeded)
            self.finished.wait(self.sample_period)

    # -- heartbeats --------------------------------------------------------------------------------------------------

    def heartbeat_body(self) -> Dict[str, Any]:
        sample = self.sample
        return {
            "LoadAverage": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            "MemoryUsed": round(sample.rss_mb, 1),
            "Vsize": round(sample.vsize_mb, 1),
            "AvailableDiskSpace": round(self.free_disk_mb(), 1),
            "CPUConsumed": round(self.cpu_seconds, 2),
            "WallClockTime": round(self.wall_clock(), 1),
            "StandardOutput": tail(self.stdout_path),
        }

    def beat(self) -> None:
        """Send one heartbeat and obey the commands in the answer."""
        if self.client is None:
            return
        answer = self.client.call("PATCH", "api/jobs/heartbeat", {str(self.job_id): self.heartbeat_body()})
        self.heartbeats += 1
        self._obey(answer)

    def _obey(self, answer: Any) -> None:
        for command in answer if isinstance(answer, list) else []:
            if not isinstance(command, dict):
                continue
            if str(command.get("job_id", self.job_id)) != str(self.job_id):
                continue
            if command.get("command") == "Kill":
                self.kill("Kill", "killed by the scheduler")
            else:
                log.warning("job %d: ignoring unknown command %r", self.job_id, command.get("command"))

    def final_beat(self) -> None:
        """One last heartbeat once the payload has ended, with its totals (peak memory, CPU seen, wall clock):
        even a job shorter than the heartbeat interval leaves its figures with the scheduler, for accounting and
        for the runner's job metrics. Commands in the answer are moot now."""
        if self.client is None or self.reason is not None:
            return
        body = self.heartbeat_body()
        body["MemoryUsed"] = round(self.max_rss_mb, 1)
        try:
            self.client.call("PATCH", "api/jobs/heartbeat", {str(self.job_id): body})
            self.heartbeats += 1
        except Exception as exc:
            log.warning("job %d: final heartbeat failed: %s", self.job_id, exc)

    def _listen(self) -> None:
        """Long-poll the scheduler for this job's commands, so a Kill lands in about a second rather than at the next
        heartbeat. A server without the route (or one that refuses this job: the heartbeat decides what that means)
        ends the listening for good; other failures wait a heartbeat interval and try again."""
        path = f"api/x-embedded/jobs/{self.job_id}/commands"
        while not self.finished.is_set() and self.reason is None and self.client is not None:
            try:
                answer = self.client.call(
                    "GET", path, params={"wait": self.command_wait}, timeout=self.command_wait + 15, retries=0
                )
            except HTTPError as exc:
                if exc.status in (401, 403, 404, 405, 422):
                    log.debug("job %d: no command long poll (%s); heartbeats carry commands", self.job_id, exc)
                    return
                self.finished.wait(self.interval)
                continue
            except Exception as exc:  # noqa: BLE001 - network trouble: the heartbeat thread reports it
                log.debug("job %d: command long poll failed: %s", self.job_id, exc)
                self.finished.wait(min(self.interval, 5.0))
                continue
            if not self.finished.is_set():
                self._obey(answer)

    def _beat(self) -> None:
        next_beat = time.monotonic()
        while not self.finished.is_set():
            if self.reason is None:
                try:
                    self.beat()
                except HTTPError as exc:
                    if exc.status in (403, 404):
                        self.kill(LOST, exc.detail)
                    else:
                        log.warning("job %d: heartbeat failed: %s", self.job_id, exc)
                except Exception as exc:
                    log.warning("job %d: heartbeat failed: %s", self.job_id, exc)
            next_beat = max(next_beat + self.interval, time.monotonic())
            self.finished.wait(max(0.0, next_beat - time.monotonic()))
