"""The pilot: registers with the scheduler, asks for jobs that fit its slot and runs them until told or time to stop.

One pilot process per batch slot or VM. It is "filling": after a job it asks for another while the slot has time left;
a multi-core pilot runs several jobs at once as long as their ``NumberOfProcessors`` fit the free cores. It stops after
a number of consecutive empty matches (backing off between them), after ``--max-idle`` seconds without work, when a
``DRAIN`` file appears in its work directory (running jobs finish), or on SIGTERM/SIGINT (running jobs are handed back
to the scheduler). At the end it reports how many jobs it matched, so empty pilots are visible to the SiteDirector, and
gives undelivered results ``--outbox-timeout`` seconds to reach the scheduler before leaving them on disk for the next
pilot in the same directory.

Every option can also be given as an environment variable ``GALAXY_DIRAC_PILOT_<OPTION>`` (``--cpu-time`` →
``GALAXY_DIRAC_PILOT_CPU_TIME``); pass the token that way (or with ``--token-file``) to keep it out of ``ps``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from galaxy_dirac.pilot.http import Backoff, Client, HTTPError
from galaxy_dirac.pilot.outbox import Outbox
from galaxy_dirac.pilot.slot import Slot
from galaxy_dirac.pilot.wrapper import JobResult, JobWrapper, WrapperSettings, as_number

log = logging.getLogger("galaxy_dirac.pilot")

ENV_PREFIX = "GALAXY_DIRAC_PILOT_"
DRAIN_FILE = "DRAIN"
#: Below this many seconds of slot lifetime no job is worth asking for.
MIN_TIME_LEFT = 60.0

#: (option, type, default, help); each is also read from GALAXY_DIRAC_PILOT_<OPTION>.
_OPTIONS = [
    ("url", str, None, "scheduler base URL (required)"),
    ("token", str, None, "pilot token (required unless --token-file)"),
    ("token-file", str, None, "file holding the pilot token"),
    ("site", str, None, "DIRAC site name of this slot (required)"),
    ("ce", str, "", "computing element name"),
    ("queue", str, "", "queue name"),
    ("stamp", str, None, "pilot stamp (default: a random one)"),
    ("platform", str, None, "platform (default: detected, e.g. Linux_x86_64_glibc-2.36)"),
    ("tags", str, "", "comma-separated extra tags offered to jobs"),
    ("processors", int, None, "cores of the slot (default: CPU affinity)"),
    ("memory", int, None, "memory of the slot in MB (default: detected)"),
    ("cpu-time", float, None, "lifetime of the slot in seconds (default: 172800)"),
    ("max-idle", float, None, "stop after this many seconds without a job"),
    ("workdir", str, None, "work directory (default: the current directory)"),
    ("ca-bundle", str, None, "CA bundle (file or directory) to verify the scheduler's certificate"),
    ("heartbeat-interval", float, 30.0, "seconds between job heartbeats"),
    ("max-empty-matches", int, 10, "stop after this many consecutive empty matches"),
    ("match-wait", float, 10.0, "seconds the scheduler may hold an empty match open (long poll; 0: plain polling)"),
    ("idle-backoff", float, 5.0, "first wait after an empty match, in seconds (doubles up to --idle-backoff-max)"),
    ("idle-backoff-max", float, 120.0, "longest wait between empty matches, in seconds"),
    ("kill-grace", float, 10.0, "seconds between SIGTERM and SIGKILL when killing a payload"),
    ("command-wait", float, 25.0, "seconds the scheduler may hold a job's command poll open (0: heartbeats only)"),
    ("outbox-timeout", float, 600.0, "seconds to keep trying to deliver results before exiting"),
    ("log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
]


def _env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


def build_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """The command line, with defaults taken from ``GALAXY_DIRAC_PILOT_*`` variables of ``environ``."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="galaxy-dirac-pilot",
        description="Run DIRAC jobs from a galaxy-dirac scheduler in this batch slot or VM.",
        epilog=f"Every option can also be set with the environment variable {ENV_PREFIX}<OPTION>, "
        f"e.g. {_env_name('cpu-time')}.",
    )
    for name, kind, default, text in _OPTIONS:
        value: Any = environ.get(_env_name(name), default)
        if value is not None and value is not default:
            try:
                value = kind(value)
            except ValueError:
                parser.error(f"{_env_name(name)}={value!r} is not a valid {kind.__name__}")
        parser.add_argument(f"--{name}", type=kind, default=value, help=f"{text} [env {_env_name(name)}]")
    keep = environ.get(_env_name("keep-job-dirs"), "").lower() in ("1", "true", "yes")
    parser.add_argument(
        "--keep-job-dirs",
        action="store_true",
        default=keep,
        help=f"keep job directories after the job (for debugging) [env {_env_name('keep-job-dirs')}]",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    """Parse and check the options; exits with status 2 and a message when something required is missing."""
    parser = build_parser(environ)
    options = parser.parse_args(argv)
    if options.token is None and options.token_file:
        try:
            with open(options.token_file, encoding="utf-8") as stream:
                options.token = stream.read().strip()
        except OSError as exc:
            parser.error(f"cannot read --token-file: {exc}")
    missing = [f"--{name}" for name in ("url", "token", "site") if not getattr(options, name)]
    if missing:
        parser.error("missing " + ", ".join(missing) + f" (or their {ENV_PREFIX}* variables)")
    if options.processors is not None and options.processors < 1:
        parser.error("--processors must be at least 1")
    options.stamp = options.stamp or uuid.uuid4().hex
    options.workdir = os.path.abspath(options.workdir or os.getcwd())
    options.tags = [tag.strip() for tag in (options.tags or "").split(",") if tag.strip()]
    return options


class _Running:
    def __init__(self, wrapper: JobWrapper, thread: threading.Thread, processors: int, memory_mb: float) -> None:
        self.wrapper = wrapper
        self.thread = thread
        self.processors = processors
        self.memory_mb = memory_mb


class Pilot:
    """One pilot's life: register, match and run jobs, report."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.client = Client(
            options.url, options.token, ca_bundle=options.ca_bundle, retries=3, sleep=self._interruptible_sleep
        )
        self.slot = Slot(
            site=options.site,
            ce=options.ce,
            queue=options.queue,
            platform=options.platform,
            tags=options.tags,
            processors=options.processors,
            memory_mb=options.memory,
            cpu_time=options.cpu_time,
            stamp=options.stamp,
        )
        self.settings = WrapperSettings(
            options.url,
            ca_bundle=options.ca_bundle,
            heartbeat_interval=options.heartbeat_interval,
            kill_grace=options.kill_grace,
            command_wait=options.command_wait,
            keep_job_dirs=options.keep_job_dirs,
        )
        cap = max(1.0, min(30.0, 4 * options.heartbeat_interval))
        self.outbox = Outbox(
            os.path.join(options.workdir, "outbox"),
            ca_bundle=options.ca_bundle,
            backoff=Backoff(base=min(1.0, cap), cap=cap),
        )
        self.running: Dict[int, _Running] = {}
        self.results: List[JobResult] = []
        self.matched = 0
        self._lock = threading.Lock()

    def _interruptible_sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def request_stop(self, reason: str = "signal") -> None:
        """Stop taking jobs and hand back the running ones (called from the SIGTERM handler)."""
        if not self.stopping.is_set():
            log.warning("stopping: %s; running jobs are handed back to the scheduler", reason)
        self.stopping.set()
        self._wake.set()

    # -- scheduler calls ---------------------------------------------------------------------------------------------

    def register(self) -> None:
        answer = self.client.call("POST", "api/x-embedded/pilots/register", self.slot.registration(socket.getfqdn()))
        log.info("registered as pilot %s (stamp %s)", (answer or {}).get("PilotID"), self.slot.stamp)

    def report(self, status: str, reason: str) -> None:
        body = {"status": status, "matched_jobs": self.matched, "reason": reason[:255]}
        try:
            self.client.call("PATCH", f"api/x-embedded/pilots/{self.slot.stamp}", body, retries=5)
        except Exception as exc:
            log.error("could not report the pilot's end to the scheduler: %s", exc)

    def _free(self) -> Tuple[int, int]:
        with self._lock:
            busy = sum(r.processors for r in self.running.values())
            used_memory = sum(r.memory_mb for r in self.running.values())
        return self.slot.processors - busy, int(max(0, self.slot.memory_mb - used_memory))

    def match(self, free_processors: int, free_memory: int) -> Optional[Dict[str, Any]]:
        """Ask for one job that fits; ``None`` when there is none (or the scheduler cannot be reached)."""
        body = self.slot.describe(free_processors, free_memory)
        wait = self.options.match_wait
        response = self.client.request(
            "POST",
            "api/x-embedded/match",
            params={"wait": wait} if wait > 0 else None,
            json_body=body,
            timeout=wait + 60 if wait > 0 else None,
        )
        if response.status == 204 or not response.body:
            return None
        return response.json()

    # -- jobs --------------------------------------------------------------------------------------------------------

    def _start_job(self, match: Dict[str, Any]) -> None:
        try:
            wrapper = JobWrapper(match, self.options.workdir, self.outbox, self.settings)
        except (KeyError, TypeError, ValueError) as exc:
            # The scheduler reschedules a job that stays Matched without news.
            log.error("cannot run the matched job, malformed match %r: %s", sorted(match), exc)
            return
        job = match.get("Job") or {}
        processors = wrapper.processors
        memory = as_number(job.get("MaxRAM")) or self.slot.memory_mb * processors / self.slot.processors
        thread = threading.Thread(target=self._run_job, args=(wrapper,), name=f"job-{wrapper.job_id}", daemon=True)
        with self._lock:
            self.running[wrapper.job_id] = _Running(wrapper, thread, processors, memory)
        log.info("matched job %d (%d processor(s))", wrapper.job_id, processors)
        thread.start()

    def _run_job(self, wrapper: JobWrapper) -> None:
        try:
            result = wrapper.run()
            log.info("job %d ended: %s %s", result.job_id, result.status, result.minor)
            with self._lock:
                self.results.append(result)
        finally:
            with self._lock:
                self.running.pop(wrapper.job_id, None)
            self._wake.set()

    def _abort_all(self) -> None:
        with self._lock:
            wrappers = [r.wrapper for r in self.running.values()]
        for wrapper in wrappers:
            wrapper.abort()

    # -- main loop ---------------------------------------------------------------------------------------------------

    def _should_stop(self) -> Optional[str]:
        if self.stopping.is_set():
            return "stopped by signal"
        if os.path.exists(os.path.join(self.options.workdir, DRAIN_FILE)):
            return "drain file found"
        if self.slot.time_left() < MIN_TIME_LEFT:
            return "no time left in the slot"
        return None

    def loop(self) -> str:
        """Match and start jobs until a stop condition; returns the reason for stopping."""
        options = self.options
        backoff = Backoff(base=options.idle_backoff, cap=max(options.idle_backoff, options.idle_backoff_max))
        empty = 0
        idle_since: Optional[float] = time.monotonic()
        while True:
            reason = self._should_stop()
            if reason:
                return reason
            free, memory = self._free()
            asked = time.monotonic()
            if free > 0:
                try:
                    match = self.match(free, memory)
                except HTTPError as exc:
                    if exc.status in (401, 403):
                        return f"match refused: {exc.detail}"
                    log.warning("match failed: %s", exc)
                    match = None
                except Exception as exc:
                    log.warning("match failed: %s", exc)
                    match = None
                if match is not None:
                    self.matched += 1
                    empty = 0
                    idle_since = None
                    self._start_job(match)
                    continue
                empty += 1
            with self._lock:
                busy = bool(self.running)
            if busy:
                idle_since = None
            else:
                idle_since = idle_since if idle_since is not None else time.monotonic()
                if empty >= self.options.max_empty_matches:
                    return f"no job matched in {empty} consecutive attempts"
                if self.options.max_idle and time.monotonic() - idle_since >= self.options.max_idle:
                    return f"idle for {self.options.max_idle:g} s"
            if free > 0 and time.monotonic() - asked >= self.options.match_wait / 2 > 0:
                delay = 0.0  # the scheduler held the request: that was the wait (a server ignoring it answers at once)
            else:
                delay = backoff.delay(empty - 1) if free > 0 else backoff.cap
            self._wake.wait(delay)
            self._wake.clear()

    def wait_for_jobs(self) -> None:
        """Let running jobs end; if a stop signal comes (or came), hand them back."""
        aborted = False
        while True:
            with self._lock:
                if not self.running:
                    return
            if self.stopping.is_set() and not aborted:
                self._abort_all()
                aborted = True
            self._wake.wait(1.0)
            self._wake.clear()

    def run(self) -> int:
        """The pilot's whole life; returns the process exit code."""
        os.makedirs(self.options.workdir, exist_ok=True)
        self.outbox.start()
        try:
            try:
                self.register()
            except Exception as exc:
                log.error("cannot register with %s: %s", self.options.url, exc)
                self._deliver_leftovers()
                return 1
            reason = "internal error"
            status = "Failed"
            try:
                reason = self.loop()
                status = "Done"
            finally:
                log.info("stopping: %s", reason)
                self.wait_for_jobs()
                self._deliver_leftovers()
                if self.matched == 0:
                    reason = f"no job ever matched ({reason})"
                self.report(status, reason)
            return 0
        finally:
            self.outbox.stop()

    def _deliver_leftovers(self) -> None:
        if self.outbox.pending():
            # After SIGTERM the batch system's SIGKILL is near; what is undelivered is safe on disk anyway.
            timeout = min(self.options.outbox_timeout, 30.0) if self.stopping.is_set() else self.options.outbox_timeout
            log.info("delivering pending results (up to %g s)", timeout)
            if not self.outbox.wait_idle(timeout):
                log.error(
                    "results of job(s) %s are not delivered; they stay in %s for the next pilot",
                    ", ".join(map(str, self.outbox.pending())),
                    self.outbox.directory,
                )


def _install_signal_handlers(pilot: Pilot) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: Any) -> None:
        pilot.request_stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``galaxy-dirac-pilot`` and of the zipapp."""
    options = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(options.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    pilot = Pilot(options)
    _install_signal_handlers(pilot)
    log.info(
        "pilot %s starting: site %s, %d processor(s), %d MB, %g s, workdir %s",
        options.stamp,
        options.site,
        pilot.slot.processors,
        pilot.slot.memory_mb,
        pilot.slot.cpu_time,
        options.workdir,
    )
    return pilot.run()


if __name__ == "__main__":
    sys.exit(main())
