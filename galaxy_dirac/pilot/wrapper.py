"""The job wrapper: everything between "the matcher gave us a job" and "the scheduler knows how it ended".

It walks DIRAC's status sequence (see ``docs/protocol.md``): Running / Job Initialization → Downloading InputSandbox
→ (Input Data Resolution, when a staging manifest lists inputs) → Application → Completing / Application Finished
Successfully|With Errors → Uploading Output Sandbox → (Uploading Output Data) → Done / Execution Complete or Failed /
reason. Status updates and the output sandbox go through the :class:`~galaxy_dirac.pilot.outbox.Outbox`, so they
survive scheduler outages; heartbeats, limits and kills are the :class:`~galaxy_dirac.pilot.watchdog.Watchdog`'s.

A job that cannot start for infrastructure reasons (its input sandbox cannot be fetched) is handed back to the
scheduler with a reschedule instead of failing, as DIRAC's JobAgent does; so is a job the pilot must abandon (SIGTERM).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from galaxy_dirac.archive import (
    ArchiveError,
    CorruptArchiveError,
    UnsafeArchiveError,
    create_archive,
    missing_outputs,
    safe_extract,
)
from galaxy_dirac.payload import LAUNCHER
from galaxy_dirac.pilot import guard
from galaxy_dirac.pilot import watchdog as wd
from galaxy_dirac.pilot.http import Backoff, Client, ssl_context
from galaxy_dirac.pilot.outbox import FAILED_OUTPUT_SANDBOX, Outbox
from galaxy_dirac.pilot.staging import MANIFEST_NAME, InputFile, ManifestError, StagingError, Transfers, load_manifest
from galaxy_dirac.states import APP_ERRORS, INPUT_STAGING_FAILED, OUTPUT_STAGING_FAILED, PAYLOAD_EXIT_CODES
from galaxy_dirac.times import parse_time

log = logging.getLogger(__name__)

# Statuses and minor statuses, spelled as DIRAC spells them.
RUNNING, COMPLETING, DONE, FAILED = "Running", "Completing", "Done", "Failed"
JOB_INITIALIZATION = "Job Initialization"
DOWNLOADING_INPUT_SANDBOX = "Downloading InputSandbox"
INPUT_DATA_RESOLUTION = "Input Data Resolution"
APPLICATION = "Application"
APP_SUCCESS = "Application Finished Successfully"
UPLOADING_OUTPUT_SANDBOX = "Uploading Output Sandbox"
UPLOADING_OUTPUT_DATA = "Uploading Output Data"
EXEC_COMPLETE = "Execution Complete"
INPUT_SANDBOX_REJECTED = "Input sandbox rejected"
WRAPPER_EXCEPTION = "Exception During Execution"

#: Environment variables of the pilot that must not reach the payload (they hold the pilot's credentials).
PILOT_ENV_PREFIX = "GALAXY_DIRAC_PILOT_"

_SHA256_IN_PFN = re.compile(r"sha256:([0-9a-fA-F]{64})")


class WrapperSettings:
    """Pilot-wide settings every job wrapper uses."""

    def __init__(
        self,
        url: str,
        *,
        ca_bundle: Optional[str] = None,
        heartbeat_interval: float = 30.0,
        kill_grace: float = 10.0,
        command_wait: float = 25.0,
        min_free_disk_mb: float = 10.0,
        staging_concurrency: int = 4,
        staging_retries: int = 5,
        staging_backoff: Optional[Backoff] = None,
        max_sandbox_bytes: Optional[int] = None,
        max_sandbox_members: int = 100_000,
        keep_job_dirs: bool = False,
    ) -> None:
        self.url = url
        self.ca_bundle = ca_bundle
        self.heartbeat_interval = heartbeat_interval
        self.kill_grace = kill_grace
        self.command_wait = command_wait
        self.min_free_disk_mb = min_free_disk_mb
        self.staging_concurrency = staging_concurrency
        self.staging_retries = staging_retries
        self.staging_backoff = staging_backoff or Backoff(base=1.0, cap=30.0)
        #: What an input sandbox may expand to: given, else GALAXY_DIRAC_PILOT_MAX_SANDBOX_BYTES, else 10 GiB; each
        #: job is further held to its slot's free disk (JobWrapper._extraction_cap).
        self.max_sandbox_bytes = (
            max_sandbox_bytes
            if max_sandbox_bytes is not None
            else int(os.environ.get(PILOT_ENV_PREFIX + "MAX_SANDBOX_BYTES") or 10 * 1024**3)
        )
        self.max_sandbox_members = max_sandbox_members
        self.keep_job_dirs = keep_job_dirs


class JobResult:
    """How a job ended, from the pilot's point of view."""

    def __init__(self, job_id: int, status: str, minor: str = "", exit_code: Optional[int] = None) -> None:
        self.job_id = job_id
        #: Done, Failed, Killed (by the scheduler), Rescheduled (handed back) or Lost (rescheduled elsewhere meanwhile).
        self.status = status
        self.minor = minor
        self.exit_code = exit_code

    def __repr__(self) -> str:
        return f"JobResult({self.job_id}, {self.status!r}, {self.minor!r}, exit_code={self.exit_code})"


class _HandBack(Exception):
    """Give the job back to the scheduler (reschedule) instead of failing it."""


def as_list(value: Any) -> List[str]:
    """A JDL value as a list of strings (DIRAC accepts a single value where a list is expected)."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v) != ""]
    return [str(value)]


def as_number(value: Any) -> Optional[float]:
    """A JDL value as a number, or ``None`` when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def job_environment(job: Mapping[str, Any], job_id: int, processors: int, base: Mapping[str, str]) -> Dict[str, str]:
    """The payload's environment: the pilot's minus its secrets, processor counts, then the JDL's entries."""
    env = {k: v for k, v in base.items() if not k.startswith(PILOT_ENV_PREFIX)}
    env.update(
        {
            "DIRACJOBID": str(job_id),
            "JOBID": str(job_id),
            "DIRAC_JOB_PROCESSORS": str(processors),
            "OMP_NUM_THREADS": str(processors),
            "GALAXY_SLOTS": str(processors),
        }
    )
    memory = as_number(job.get("MaxRAM"))
    if memory:
        env["GALAXY_MEMORY_MB"] = str(int(memory))
    for name in ("ExecutionEnvironment", "Environment"):
        value = job.get(name)
        items = value.items() if isinstance(value, dict) else (e.split("=", 1) for e in as_list(value) if "=" in e)
        for key, item in items:
            if key:
                env[str(key)] = str(item)
    return env


def clock_offset(server_time: Any, now: Optional[dt.datetime] = None) -> float:
    """Seconds to add to this node's clock to get the scheduler's, from the match's ``ServerTime``.

    The scheduler orders status updates by their timestamps, so a node whose clock is minutes off would see its
    updates treated as stale. Offsets under a second are network delay, not skew, and are ignored.
    """
    if not server_time:
        return 0.0
    try:
        server = parse_time(str(server_time))
    except ValueError:
        return 0.0
    offset = (server - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    return offset if abs(offset) >= 1.0 else 0.0


class JobWrapper:
    """Runs one matched job in ``<workdir>/job-<JobID>``."""

    def __init__(self, match: Mapping[str, Any], workdir: str, outbox: Outbox, settings: WrapperSettings) -> None:
        self.job_id = int(match["JobID"])
        self.job: Dict[str, Any] = dict(match.get("Job") or {})
        self.token = str(match["Token"])
        self.settings = settings
        self.outbox = outbox
        self.workdir = workdir
        self.job_dir = os.path.join(workdir, f"job-{self.job_id}")
        self.processors = max(1, int(as_number(self.job.get("NumberOfProcessors")) or 1))
        self.client = Client(settings.url, self.token, ca_bundle=settings.ca_bundle, retries=3)
        self.transfers = Transfers(
            concurrency=settings.staging_concurrency,
            retries=settings.staging_retries,
            backoff=settings.staging_backoff,
            context=ssl_context(settings.ca_bundle),
        )
        self.watchdog: Optional[wd.Watchdog] = None
        self._abort = threading.Event()
        self.clock_offset = clock_offset(match.get("ServerTime"))

    # -- public ------------------------------------------------------------------------------------------------------

    def abort(self) -> None:
        """Give the job back to the scheduler as soon as possible (the pilot was told to stop)."""
        self._abort.set()
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.kill("abort", "the pilot is stopping")

    def run(self) -> JobResult:
        """Run the job to the end; never raises."""
        self.outbox.open_job(self.job_id, self.settings.url, self.token, self.clock_offset)
        try:
            return self._run()
        except _HandBack as exc:
            return self._reschedule(str(exc))
        except Exception as exc:
            log.exception("job %d: wrapper failed", self.job_id)
            self._status(FAILED, WRAPPER_EXCEPTION, f"{type(exc).__name__}: {exc}")
            return JobResult(self.job_id, FAILED, WRAPPER_EXCEPTION)
        finally:
            self.outbox.close_job(self.job_id)
            if not self.settings.keep_job_dirs:
                shutil.rmtree(self.job_dir, ignore_errors=True)

    # -- steps -------------------------------------------------------------------------------------------------------

    def _status(self, status: Optional[str], minor: Optional[str] = None, application: Optional[str] = None) -> None:
        self.outbox.status(self.job_id, status, minor, application)

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _HandBack("the pilot is stopping")

    def _run(self) -> JobResult:
        self._status(RUNNING, JOB_INITIALIZATION)
        if os.path.exists(self.job_dir):
            shutil.rmtree(self.job_dir)
        os.makedirs(self.job_dir, mode=0o700)
        self._check_abort()

        self._status(RUNNING, DOWNLOADING_INPUT_SANDBOX)
        try:
            self._download_input_sandbox()
        except (UnsafeArchiveError, CorruptArchiveError) as exc:
            self._status(FAILED, INPUT_SANDBOX_REJECTED, str(exc))
            return JobResult(self.job_id, FAILED, INPUT_SANDBOX_REJECTED)
        self._check_abort()

        manifest = None
        manifest_path = os.path.join(self.job_dir, MANIFEST_NAME)
        if os.path.isfile(manifest_path):
            try:
                manifest = load_manifest(manifest_path)
            except (ManifestError, OSError) as exc:
                self._status(FAILED, INPUT_STAGING_FAILED, f"bad {MANIFEST_NAME}: {exc}")
                return JobResult(self.job_id, FAILED, INPUT_STAGING_FAILED)
        if manifest is not None and manifest.inputs:
            self._status(RUNNING, INPUT_DATA_RESOLUTION)
            try:
                self.transfers.stage_in(manifest.inputs, self.job_dir)
            except (StagingError, ManifestError) as exc:
                self._status(FAILED, INPUT_STAGING_FAILED, str(exc))
                return JobResult(self.job_id, FAILED, INPUT_STAGING_FAILED)
        self._check_abort()

        self._status(RUNNING, APPLICATION)
        exit_code, failure = self._execute()
        watchdog = self.watchdog
        if watchdog is not None and watchdog.reason == "Kill":
            log.info("job %d: killed on the scheduler's command", self.job_id)
            return JobResult(self.job_id, "Killed", "killed by the scheduler", exit_code)
        if watchdog is not None and watchdog.reason == wd.LOST:
            log.warning("job %d: the scheduler gave this job to someone else: %s", self.job_id, watchdog.detail)
            self.outbox.discard(self.job_id)
            return JobResult(self.job_id, "Lost", watchdog.detail, exit_code)
        self._check_abort()

        succeeded = failure is None and exit_code == 0
        app_status = f"Exit code {exit_code}" if exit_code is not None and exit_code >= 0 else None
        if exit_code is not None and exit_code < 0:
            app_status = f"Killed by signal {-exit_code}"
        self._status(COMPLETING, APP_SUCCESS if succeeded else APP_ERRORS, app_status)
        if failure is None and not succeeded:
            failure = self._payload_failure(exit_code) or (APP_ERRORS, app_status or "")

        self._status(COMPLETING, UPLOADING_OUTPUT_SANDBOX)
        sandbox_problem = self._queue_output_sandbox()
        if sandbox_problem is not None and failure is None:
            failure = sandbox_problem

        if manifest is not None and manifest.outputs:
            self._status(COMPLETING, UPLOADING_OUTPUT_DATA)
            try:
                self.transfers.stage_out(manifest.outputs, self.job_dir)
            except (StagingError, ManifestError) as exc:
                if failure is None:
                    failure = (OUTPUT_STAGING_FAILED, str(exc))
                else:
                    log.error("job %d: output staging failed too: %s", self.job_id, exc)

        if failure is None:
            self._status(DONE, EXEC_COMPLETE, app_status)
            return JobResult(self.job_id, DONE, EXEC_COMPLETE, exit_code)
        self._status(FAILED, failure[0], failure[1] or None)
        return JobResult(self.job_id, FAILED, failure[0], exit_code)

    def _payload_failure(self, exit_code: Optional[int]) -> Optional[Tuple[str, str]]:
        """A Galaxy job payload's own failure (see PAYLOAD_EXIT_CODES) as DIRAC's minor status and its message."""
        if str(self.job.get("Executable") or "") != LAUNCHER or exit_code not in PAYLOAD_EXIT_CODES:
            return None
        lines: List[str] = []
        with contextlib.suppress(OSError), open(self._job_file("StdError", "std.err"), "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 2000))
            lines = stream.read().decode("utf-8", errors="replace").strip().splitlines()
        detail = next((line for line in reversed(lines) if line.startswith("galaxy-dirac:")), f"Exit code {exit_code}")
        return PAYLOAD_EXIT_CODES[int(exit_code)], detail[:500]

    def _download_input_sandbox(self) -> None:
        """Fetch and safely extract every ``SB:`` entry of InputSandbox; other entries were packed into those."""
        staging = self.job_dir + ".sandbox"
        os.makedirs(staging, mode=0o700, exist_ok=True)
        try:
            for n, entry in enumerate(as_list(self.job.get("InputSandbox"))):
                if entry.upper().startswith("LFN:"):
                    raise UnsafeArchiveError(entry, "LFN input sandboxes are not supported")
                if not entry.startswith("SB:"):
                    log.debug("job %d: input sandbox entry %r is inside the uploaded sandbox", self.job_id, entry)
                    continue
                try:
                    answer = self.client.call("GET", "api/jobs/sandbox", params={"pfn": entry})
                    found = _SHA256_IN_PFN.search(entry)
                    name = f"sandbox-{n}"
                    spec = InputFile(self.client.url(answer["url"]), name, sha256=found.group(1) if found else None)
                    self.transfers.download(spec, staging)
                except Exception as exc:
                    raise _HandBack(f"cannot download input sandbox {entry}: {exc}") from exc
                safe_extract(
                    os.path.join(staging, name),
                    self.job_dir,
                    max_total_bytes=self._extraction_cap(),
                    max_members=self.settings.max_sandbox_members,
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _extraction_cap(self) -> int:
        """The configured cap, and never more than the slot's free disk less the watchdog's reserve: a bomb fails
        at its headers ("exceeds the limit of N bytes", job Failed) instead of filling the worker node's disk."""
        reserve = int(self.settings.min_free_disk_mb * 1024 * 1024)
        return max(0, min(self.settings.max_sandbox_bytes, shutil.disk_usage(self.job_dir).free - reserve))

    def _command(self) -> List[str]:
        executable = str(self.job.get("Executable") or "")
        if not executable:
            raise ValueError("the JDL has no Executable")
        local = os.path.join(self.job_dir, executable)
        if not os.path.isabs(executable) and os.path.isfile(local):
            mode = os.stat(local).st_mode
            os.chmod(local, mode | stat.S_IXUSR)
            executable = os.path.abspath(local)
        arguments = self.job.get("Arguments") or ""
        args = [str(a) for a in arguments] if isinstance(arguments, (list, tuple)) else shlex.split(str(arguments))
        return [executable] + args

    def _job_file(self, attribute: str, default: str) -> str:
        name = str(self.job.get(attribute) or default)
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            name = default
        return os.path.join(self.job_dir, name)

    def _limits(self) -> wd.Limits:
        return wd.Limits(
            cpu_time=as_number(self.job.get("CPUTime")),
            wall_clock=as_number(self.job.get("MaxWallClockTime")),
            memory_mb=as_number(self.job.get("MaxRAM")),
            disk_mb=as_number(self.job.get("MaxDiskSpace")),
            min_free_disk_mb=self.settings.min_free_disk_mb,
        )

    def _execute(self) -> Tuple[Optional[int], Optional[Tuple[str, str]]]:
        """Run the payload under the watchdog; returns (exit code, (minor, detail) of a limit it broke)."""
        stdout_path = self._job_file("StdOutput", "std.out")
        stderr_path = self._job_file("StdError", "std.err")
        env = job_environment(self.job, self.job_id, self.processors, os.environ)
        try:
            command = self._command()
        except ValueError as exc:
            return None, (APP_ERRORS, str(exc))
        with open(stdout_path, "ab") as stdout:
            stderr: Any = subprocess.STDOUT if stderr_path == stdout_path else open(stderr_path, "ab")  # noqa: SIM115
            try:
                process = subprocess.Popen(
                    command,
                    cwd=self.job_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                return None, (APP_ERRORS, f"cannot start {command[0]}: {exc.strerror or exc}")
            finally:
                if stderr is not subprocess.STDOUT:
                    stderr.close()
        log.info("job %d: payload started, pid %d: %s", self.job_id, process.pid, shlex.join(command))
        try:
            payload_guard: Optional[guard.Guard] = guard.start(process.pid, self.settings.kill_grace)
        except OSError as exc:  # the job still runs; only a pilot killed outright could leave it behind
            log.warning("job %d: no guard for the payload: %s", self.job_id, exc)
            payload_guard = None
        self.watchdog = wd.Watchdog(
            process.pid,
            job_id=self.job_id,
            client=Client(self.settings.url, self.token, ca_bundle=self.settings.ca_bundle, retries=1, timeout=10.0),
            job_dir=self.job_dir,
            stdout_path=stdout_path,
            limits=self._limits(),
            interval=self.settings.heartbeat_interval,
            kill_grace=self.settings.kill_grace,
            command_wait=self.settings.command_wait,
        )
        if self._abort.is_set():
            self.watchdog.kill("abort", "the pilot is stopping")
        self.watchdog.start()
        exit_code = process.wait()
        self.watchdog.join(timeout=self.settings.kill_grace + 5)
        wd.kill_tree(process.pid, 0.0, lambda: False)
        if payload_guard is not None:
            payload_guard.release()
        log.info("job %d: payload exited with %d", self.job_id, exit_code)
        reason = self.watchdog.reason
        if reason is not None and reason not in ("Kill", "abort", wd.LOST):
            return exit_code, (reason, self.watchdog.detail)
        self.watchdog.final_beat()
        return exit_code, None

    def _queue_output_sandbox(self) -> Optional[Tuple[str, str]]:
        """Pack the OutputSandbox files and queue their upload; returns a failure (minor, detail) if packing failed."""
        patterns = as_list(self.job.get("OutputSandbox"))
        if not patterns:
            return None
        archive = self.outbox.archive_path(self.job_id)
        try:
            missing = missing_outputs(self.job_dir, patterns)
            if missing:
                log.warning("job %d: output sandbox files not found: %s", self.job_id, ", ".join(missing))
            if len(missing) == len(patterns):
                return None
            sha256, size = create_archive(archive, self.job_dir, "tar.bz2", patterns=patterns)
        except (ArchiveError, OSError) as exc:
            return FAILED_OUTPUT_SANDBOX, str(exc)
        self.outbox.output_sandbox(self.job_id, archive, sha256, size, "tar.bz2")
        return None

    def _reschedule(self, reason: str) -> JobResult:
        """Hand the job back: kill what runs, forget queued updates, ask the scheduler to reschedule it."""
        log.warning("job %d: handing back to the scheduler: %s", self.job_id, reason)
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.kill("abort", reason)
        self.outbox.discard(self.job_id)
        try:
            self.client.call("POST", "api/jobs/reschedule", {"job_ids": [self.job_id]})
        except Exception as exc:
            log.error("job %d: reschedule failed (the scheduler will find it stalled): %s", self.job_id, exc)
        return JobResult(self.job_id, "Rescheduled", reason)
