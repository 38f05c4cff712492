"""The resource description a pilot sends when it asks for a job.

DIRAC matches a job to a pilot by comparing the job's task-queue requirements with what the pilot says its slot offers:
CPU time left, site, CE, platform, RAM and tags. Processor counts travel as tags (``1Processors`` … ``NProcessors``
plus ``MultiProcessor``) so that a job asking for N cores only matches a pilot with at least N free. Container
runtimes travel as tags too (``docker``, ``podman``, ``singularity``, ``apptainer``, as DIRAC sites advertise them):
the pilot offers those that work on its node, so a Galaxy job that runs its tool in a container only lands where it can.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

#: Each runtime's tag and the commands that must succeed for the pilot to offer it: installed is not enough (a
#: Docker client without a daemon, a Podman whose storage or cgroups are unusable fail only when a job runs).
RUNTIME_CHECKS: Dict[str, Sequence[Sequence[str]]] = {
    "podman": (("podman", "--version"), ("podman", "info")),
    "docker": (("docker", "--version"), ("docker", "info")),
    "apptainer": (("apptainer", "--version"),),
    "singularity": (("singularity", "--version"),),
}
#: ``auto`` (default: detect), ``none`` / empty (offer none), or a comma list to offer without checking.
RUNTIMES_ENV = "GALAXY_DIRAC_PILOT_CONTAINER_RUNTIMES"


def _succeeds(argv: Sequence[str], environ: Mapping[str, str], timeout: float) -> bool:
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(environ),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def detect_container_runtimes(environ: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> List[str]:
    """Tags of the container runtimes usable on this node (their commands on PATH answer), in a fixed order."""
    env = os.environ if environ is None else environ
    choice = str(env.get(RUNTIMES_ENV, "auto")).strip().lower()
    if choice != "auto":
        return [t.strip() for t in choice.split(",") if t.strip() and t.strip() != "none"]
    key = tuple(sorted(env.items()))
    if key not in _DETECTED:  # once per process and environment: `podman info` takes a second
        _DETECTED[key] = [
            tag
            for tag, checks in RUNTIME_CHECKS.items()
            if shutil.which(checks[0][0], path=env.get("PATH")) and all(_succeeds(c, env, timeout) for c in checks)
        ]
    return list(_DETECTED[key])


_DETECTED: Dict[tuple, List[str]] = {}


def processor_tags(processors: int) -> List[str]:
    """Tags a slot with ``processors`` free cores offers, as DIRAC spells them."""
    tags = [f"{n}Processors" for n in range(1, max(processors, 0) + 1)]
    if processors > 1:
        tags.append("MultiProcessor")
    return tags


def detect_processors() -> int:
    """Cores this process may use (its CPU affinity, which batch systems restrict), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as stream:
            text = stream.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def detect_memory_mb() -> int:
    """Memory of the slot in MB: the machine's, or the cgroup limit when the batch system set a smaller one."""
    total = None
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError, IndexError):
        total = None
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        except (AttributeError, ValueError, OSError):
            total = 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(path)
        if limit and limit // (1024 * 1024) < total:
            total = limit // (1024 * 1024)
    return int(total)


def detect_platform() -> str:
    """A DIRAC-style platform string such as ``Linux_x86_64_glibc-2.36``."""
    system = platform.system() or "Unknown"
    machine = platform.machine() or "unknown"
    libc, version = platform.libc_ver()
    suffix = f"_{libc}-{version}" if libc and version else ""
    return f"{system}_{machine}{suffix}"


class Slot:
    """What a pilot offers: fixed properties of the slot plus the time and cores still free."""

    def __init__(
        self,
        *,
        site: str,
        ce: str = "",
        queue: str = "",
        platform: Optional[str] = None,
        tags: Iterable[str] = (),
        runtimes: Optional[Iterable[str]] = None,
        processors: Optional[int] = None,
        memory_mb: Optional[int] = None,
        cpu_time: Optional[float] = None,
        stamp: str = "",
        clock=time.monotonic,
    ) -> None:
        self.site = site
        self.ce = ce
        self.queue = queue
        self.platform = platform or detect_platform()
        self.tags = [t for t in tags if t]
        #: Container runtimes offered as tags besides the configured ones (None: detect them on this node).
        self.runtimes = list(detect_container_runtimes() if runtimes is None else runtimes)
        self.tags += [t for t in self.runtimes if t not in self.tags]
        self.processors = processors or detect_processors()
        self.memory_mb = memory_mb or detect_memory_mb()
        #: Seconds the slot lives (the batch system's limit); the pilot only takes jobs that fit in what is left.
        self.cpu_time = float(cpu_time) if cpu_time else 172800.0
        self.stamp = stamp
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def time_left(self) -> float:
        """Seconds of the slot's lifetime still available for jobs."""
        return max(0.0, self.cpu_time - self.elapsed())

    def all_tags(self, free_processors: Optional[int] = None) -> List[str]:
        """Configured tags plus the processor tags for ``free_processors`` (default: all cores)."""
        free = self.processors if free_processors is None else free_processors
        tags = list(self.tags)
        for tag in processor_tags(free):
            if tag not in tags:
                tags.append(tag)
        return tags

    def describe(self, free_processors: Optional[int] = None, free_memory_mb: Optional[int] = None) -> Dict:
        """The body of ``POST /api/x-embedded/match`` for the cores and memory currently free."""
        free = self.processors if free_processors is None else free_processors
        return {
            "Site": self.site,
            "GridCE": self.ce,
            "Queue": self.queue,
            "Platform": self.platform,
            "Tags": self.all_tags(free),
            "NumberOfProcessors": free,
            "MaxRAM": int(self.memory_mb if free_memory_mb is None else free_memory_mb),
            "CPUTime": int(self.time_left()),
            "PilotStamp": self.stamp,
        }

    def registration(self, hostname: str) -> Dict:
        """The body of ``POST /api/x-embedded/pilots/register``."""
        return {
            "stamp": self.stamp,
            "site": self.site,
            "ce": self.ce,
            "queue": self.queue,
            "platform": self.platform,
            "tags": self.all_tags(),
            "processors": self.processors,
            "memory_mb": int(self.memory_mb),
            "hostname": hostname,
        }
