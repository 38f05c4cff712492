"""Galaxy job runner plugin: every Galaxy job as a DIRAC job (embedded scheduler or DiracX 0.7).

``job_conf.yml``::

    runners:
      dirac:
        load: galaxy_dirac.runner:DiracJobRunner
        scheduler_url: https://wms.example.org     # or env GALAXY_DIRAC_SCHEDULER_URL
        token_file: /etc/galaxy/dirac.token        # embedded scheduler: or token:, or env GALAXY_DIRAC_TOKEN(_FILE)
        credentials_file: /etc/galaxy/diracx.json  # a real DiracX: written by `galaxy-dirac login`
        input_sandbox_limit: 100                   # MB; the target's sandbox limits (also per destination)
        output_sandbox_limit: 10
        galaxy_url: https://galaxy.example.org     # as seen from worker nodes; or env GALAXY_DIRAC_GALAXY_URL
        status_batch_size: 500
        transport: galaxy                          # default transport: galaxy | sandbox
    execution:
      environments:
        dirac:
          runner: dirac
          site: LCG.CERN.ch          # also banned_sites, tags, processors, memory (MB), cpu_time (s), platform,
          transport: sandbox         # priority, job_group, container (an image for tools without one)
          # docker_enabled / singularity_enabled and Galaxy's other container settings: galaxy_dirac.containers

The job's bundle carries its own payload (:mod:`galaxy_dirac.payload`), so a real DIRAC site's pilots and JobWrapper
run it as they are. A lapsed DiracX login holds submissions (jobs stay queued, their info says why) instead of
failing them. The only module of the package that imports Galaxy. Bulk by design: one status search per monitor
cycle for all watched jobs. What finishing needs is persisted in the job working directory
(``galaxy_dirac_state.json``) so a restarted Galaxy re-attaches every job (``recover``) without submitting anything
twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from galaxy import model
from galaxy.jobs.runners import AsynchronousJobRunner, AsynchronousJobState

from galaxy_dirac import containers, job_metrics, staging, states
from galaxy_dirac import jdl as jdl_mod
from galaxy_dirac.client import LoginExpired, WMSClient, WMSError
from galaxy_dirac.credentials import CREDENTIALS_ENV, default_credentials_file
from galaxy_dirac.destination import DiracDestination, split_list, warn_unknown
from galaxy_dirac.times import parse_time

log = logging.getLogger(__name__)

__all__ = ["DiracJobRunner"]

QUEUED_STATES = {states.RECEIVED, states.CHECKING, states.STAGING, states.WAITING, states.MATCHED, states.RESCHEDULED}
RUNNING_STATES = {states.RUNNING, states.COMPLETING, states.STALLED}
DONE_STATES = {states.DONE, states.COMPLETED}
FAILED_STATES = {states.FAILED, states.KILLED, states.DELETED}
MAX_TRANSFER_RETRIES = 3
#: Cycles a job may be missing from the scheduler's answer before it is failed.
MAX_MISSING_CYCLES = 10
#: Galaxy's own folders of reference data: data tables' .loc files point into them.
GALAXY_REFERENCE_FOLDERS = ("tool_data_path", "shed_tool_data_path", "galaxy_data_manager_data_path")
DATA_TABLE_REFRESH = 300.0
STATUS_PARAMETERS = [
    "JobID",
    "Status",
    "MinorStatus",
    "ApplicationStatus",
    "Site",
    "StartExecTime",
    "EndExecTime",
    "RescheduleCounter",
]


def _env(name: str) -> Optional[str]:
    return os.environ.get(name) or None


def _megabytes(value: Any) -> Optional[int]:
    """A size in MB from a runner or destination parameter as bytes; empty, 0 or "none" means no limit."""
    if value in (None, "") or str(value).strip().lower() in ("0", "none", "unlimited"):
        return None
    return int(float(value) * 1_000_000)


class DiracJobState(AsynchronousJobState):
    def __init__(self, job_wrapper: Any, job_destination: Any, dirac_id: Optional[str] = None) -> None:
        super().__init__(job_wrapper, job_destination, files_dir=job_wrapper.working_directory, job_id=dirac_id)
        self.missing_cycles = 0
        self.dirac_row: Dict[str, Any] = {}
        self.needs = ""  # what a slot must offer, for the job's info while it waits
        self.shown = ""  # the DIRAC status last written to the job's info
        self.pending: Optional[_Pending] = None  # built, not yet submitted


@dataclass
class _Pending:
    """A built job not yet submitted: what a (later, if its DIRAC login lapsed) submission attempt needs."""

    spec: staging.JobSpec
    bundle: staging.Bundle
    destination: DiracDestination
    params: Dict[str, Any]  # all of them, Galaxy's too (containers)
    retry_at: float = 0.0


class DiracJobRunner(AsynchronousJobRunner):
    runner_name = "DiracRunner"

    def __init__(self, app: Any, nworkers: int, **kwargs: Any) -> None:
        specs = dict(
            scheduler_url=dict(map=str, default=_env("GALAXY_DIRAC_SCHEDULER_URL")),
            token=dict(map=str, default=_env("GALAXY_DIRAC_TOKEN")),
            token_file=dict(map=str, default=_env("GALAXY_DIRAC_TOKEN_FILE")),
            # A DiracX login from `galaxy-dirac login` (access + refresh token), refreshed as it runs out.
            credentials_file=dict(map=str, default=_env(CREDENTIALS_ENV)),
            # Galaxy hands a default over without ``map``: it must already have the right type.
            login_retry_interval=dict(
                map=float, valid=lambda x: float(x) > 0, default=float(_env("GALAXY_DIRAC_LOGIN_RETRY_INTERVAL") or 60)
            ),
            galaxy_url=dict(map=str, default=_env("GALAXY_DIRAC_GALAXY_URL")),
            status_batch_size=dict(map=int, valid=lambda x: int(x) > 0, default=500),
            # The embedded scheduler holds a request until one of our jobs changes status: the monitor waits on it
            # (at most this many seconds) instead of sleeping job_runner_monitor_sleep. 0: always sleep.
            updates_wait=dict(map=float, valid=lambda x: 0 <= float(x) <= 120, default=5.0),
            transport=dict(map=str, valid=lambda x: x in staging.TRANSPORTS, default="galaxy"),
            verify_ssl=dict(map=lambda x: str(x).lower() not in ("false", "0", "no"), default=True),
            job_name_prefix=dict(map=str, default="galaxy"),
            # The target's sandbox limits in MB (DiracX: 100 MB per input sandbox; legacy DIRAC: 10 MB of output
            # sandbox): a job that cannot fit is refused at submission, or fails on the node with a clear message.
            input_sandbox_limit=dict(map=str, default=None),
            output_sandbox_limit=dict(map=str, default=None),
            # Reference data named by data tables (.loc paths): "stage" sends the files a job names with it; "node"
            # when the nodes see Galaxy's tool data at the same paths (CVMFS). More folders: reference_data_paths.
            reference_data=dict(map=str, valid=lambda x: x in ("stage", "node"), default="stage"),
            reference_data_paths=dict(map=str, default=""),
        )
        kwargs["runner_param_specs"] = specs
        super().__init__(app, nworkers, **kwargs)
        url = self.runner_params["scheduler_url"]
        if not url:
            raise ValueError("DiracJobRunner needs scheduler_url (or GALAXY_DIRAC_SCHEDULER_URL)")
        credentials = {k: self.runner_params[k] for k in ("token", "token_file", "credentials_file")}
        if credentials["credentials_file"] and not kwargs.get("token") and not kwargs.get("token_file"):
            credentials["token"] = credentials["token_file"] = None  # an explicit login wins over the environment
        if not any(credentials.values()):
            credentials["credentials_file"] = default_credentials_file()  # where `galaxy-dirac login` wrote it
        self.client = WMSClient(
            url,
            credentials["token"],
            token_file=credentials["token_file"],
            credentials_file=credentials["credentials_file"],
            verify=self.runner_params["verify_ssl"],
        )
        job_metrics.register(app)  # readable titles for the DIRAC metrics from the first job on
        self._awaiting_login: List[DiracJobState] = []
        self._awaiting_lock = threading.Lock()
        self._login_logged_at = -float("inf")
        self._table_folders: Tuple[float, List[str]] = (-float("inf"), [])
        self._long_poll = self.runner_params["updates_wait"] > 0
        self._updates_cursor: Optional[str] = None

    # -- submission ---------------------------------------------------------------------------------------------------

    def _galaxy_url(self) -> Optional[str]:
        return self.runner_params["galaxy_url"] or getattr(self.app.config, "galaxy_infrastructure_url", None)

    def _spec(self, job_wrapper: Any, dest: DiracDestination, exit_code_file: str) -> staging.JobSpec:
        job = job_wrapper.get_job()
        work = os.path.abspath(job_wrapper.working_directory)
        inputs: List[str] = []
        extra_dirs: List[str] = []
        for dataset in job_wrapper.job_io.get_input_datasets():
            inputs.append(dataset.get_file_name())
            try:
                extra = dataset.extra_files_path
            except Exception:  # noqa: BLE001 - object stores without a local extra files path
                extra = None
            if extra and os.path.isdir(extra):
                extra_dirs.append(extra)
        outputs, output_extras = [], []
        for dp in job_wrapper.job_io.get_output_fnames():
            # With outputs_to_working_directory the job script writes false_path and Galaxy moves it afterwards.
            outputs.append(dp.false_path or dp.real_path)
            if dp.false_extra_files_path:
                output_extras.append(dp.false_extra_files_path)
        tool = job_wrapper.tool
        return staging.JobSpec(
            galaxy_job_id=int(job.id),
            working_directory=work,
            job_script=os.path.join(work, f"galaxy_{job_wrapper.get_id_tag()}.sh"),
            inputs=inputs,
            input_extra_dirs=extra_dirs,
            outputs=outputs,
            output_extra_dirs=output_extras,
            reference_dirs=self._reference_dirs(dest),
            tool_dir=getattr(tool, "tool_dir", None),
            transport=dest.transport or self.runner_params["transport"],
            galaxy_url=self._galaxy_url(),
            encoded_job_id=self.app.security.encode_id(job.id),
            job_key=self.app.security.encode_id(job.id, kind="jobs_files"),
            exit_code_file=os.path.abspath(exit_code_file),
            processors=dest.processors,
            memory_mb=dest.memory,
            max_input_bytes=_megabytes(dest.input_sandbox_limit or self.runner_params["input_sandbox_limit"]),
            max_output_bytes=_megabytes(dest.output_sandbox_limit or self.runner_params["output_sandbox_limit"]),
            max_result_bytes=self._result_cap(len(outputs)),
        )

    def _result_cap(self, outputs: int) -> Optional[int]:
        """Galaxy's output_size job limit bounds each output; the results of a job (its outputs and the files of
        its working directory) may expand to that much per output and one more for the rest."""
        limit = getattr(getattr(getattr(self.app, "job_config", None), "limits", None), "output_size", None)
        return int(limit) * (outputs + 1) if limit and int(limit) > 0 else None

    def _reference_dirs(self, dest: DiracDestination) -> List[str]:
        mode = dest.reference_data or self.runner_params["reference_data"]
        if mode == "node":
            return []
        folders = [getattr(self.app.config, name, None) for name in GALAXY_REFERENCE_FOLDERS]
        folders += dest.reference_data_paths or split_list(self.runner_params["reference_data_paths"])
        found = [os.path.abspath(str(f)) for f in folders if f and os.path.isdir(str(f))]
        return [f for f in dict.fromkeys(found + self._data_table_folders()) if f != "/"]

    def _data_table_folders(self) -> List[str]:
        """Folders Galaxy's data tables point into (their .loc paths may lie anywhere), re-read every few minutes
        because data managers add entries while Galaxy runs."""
        now = time.monotonic()
        if now - self._table_folders[0] < DATA_TABLE_REFRESH:
            return self._table_folders[1]
        folders = set()
        tables = getattr(self.app, "tool_data_tables", None)
        try:
            for table in (tables.get_tables() if tables is not None else {}).values():
                for row in table.get_fields() if hasattr(table, "get_fields") else []:
                    folders.update(os.path.dirname(os.path.normpath(str(v))) for v in row if str(v).startswith("/"))
        except Exception:  # noqa: BLE001 - a broken table must not stop submission; its data just won't travel
            log.exception("reading Galaxy's data tables for reference data folders failed")
        result = sorted(f for f in folders if f != "/" and os.path.isdir(f))
        self._table_folders = (now, result)
        return result

    def _jdl(self, job_wrapper: Any, pending: _Pending, job_name: str, pfn: str) -> str:
        attrs: Dict[str, Any] = {
            "Executable": staging.LAUNCHER,
            "JobName": job_name,
            "InputSandbox": [pfn],
            "OutputSandbox": list(pending.bundle.output_sandbox),
            "StdOutput": staging.STDOUT,
            "StdError": staging.STDERR,
            **pending.destination.jdl_attributes(default_group=f"galaxy-{job_wrapper.tool.id}"),
        }
        runtime = containers.runtime_tag(pending.params)  # only a slot offering the container runtime may take it
        if runtime and runtime not in attrs.get("Tags", []):
            attrs["Tags"] = [*attrs.get("Tags", []), runtime]
        return jdl_mod.render(attrs)

    def _find_container(self, job_wrapper: Any, *args: Any, **kwargs: Any) -> Any:
        """Galaxy's own container lookup, on a destination whose volumes and image name the node's job directory."""
        containers.prepare_destination(job_wrapper.job_destination.params)
        return super()._find_container(job_wrapper, *args, **kwargs)

    def queue_job(self, job_wrapper: Any) -> None:
        if not self.prepare_job(job_wrapper, include_metadata=False, include_work_dir_outputs=True):
            return
        destination = job_wrapper.job_destination
        params = dict(destination.params or {})
        job_state = DiracJobState(job_wrapper, destination)
        try:
            dest = DiracDestination.parse(params)
            warn_unknown(str(destination.id), dest)
            exit_code_path = job_state.exit_code_file
            script = self.get_job_file(job_wrapper, exit_code_path=exit_code_path, shell=job_wrapper.shell)
            self.write_executable_script(job_state.job_file, script, job_io=job_wrapper.job_io)
            spec = self._spec(job_wrapper, dest, exit_code_path)
            bundle = staging.build_bundle(spec)
        except staging.BundleError as exc:
            log.info("(%s) refused before submission: %s", job_wrapper.get_id_tag(), exc)
            job_wrapper.fail(f"This job cannot run on this DIRAC destination: {exc}")
            return
        except Exception as exc:
            log.exception("(%s) building the DIRAC job failed", job_wrapper.get_id_tag())
            job_wrapper.fail(f"Could not prepare the DIRAC job: {exc}", exception=True)
            return
        job_state.pending = _Pending(spec, bundle, dest, params)
        self._submit(job_state)

    def _submit(self, job_state: DiracJobState) -> None:
        """Upload the bundle and submit the JDL; a lapsed DiracX login parks the job instead of failing it.

        Takes the job state (not the pending parts alone) because Galaxy's work queue only carries job wrappers
        and job states.
        """
        job_wrapper, pending = job_state.job_wrapper, job_state.pending
        assert pending is not None
        spec = pending.spec
        try:
            pfn = self.client.upload_sandbox(pending.bundle.archive)
            job_name = f"{self.runner_params['job_name_prefix']}-{job_wrapper.job_id}-{uuid.uuid4().hex[:12]}"
            text = self._jdl(job_wrapper, pending, job_name, pfn)
            job_state.needs = _needs(jdl_mod.parse(text))
            state = {"job_name": job_name, "spec": staging.spec_to_dict(spec), "dirac_id": None}
            state["needs"] = job_state.needs
            staging.save_state(spec.working_directory, state)
            dirac_id = str(self.client.submit([text])[0]["JobID"])
            state["dirac_id"] = dirac_id
            staging.save_state(spec.working_directory, state)
        except LoginExpired as exc:
            self._await_login(job_state, exc)
            return
        except Exception as exc:
            log.exception("(%s) DIRAC submission failed", job_wrapper.get_id_tag())
            job_wrapper.fail(
                f"Submission to the DIRAC scheduler failed: {exc}", exception=not isinstance(exc, WMSError)
            )
            return
        log.info("(%s) submitted as DIRAC job %s (%s)", job_wrapper.get_id_tag(), dirac_id, spec.transport)
        job_wrapper.set_job_destination(job_state.job_destination, dirac_id)
        job_wrapper.change_state(model.Job.states.QUEUED)
        job_state.job_id = dirac_id
        job_state.old_state = states.RECEIVED
        job_state.pending = None
        self.monitor_queue.put(job_state)

    def _await_login(self, job_state: DiracJobState, exc: LoginExpired) -> None:
        """Keep the job queued, say why in its info, and try again every ``login_retry_interval`` seconds."""
        job_wrapper, pending = job_state.job_wrapper, job_state.pending
        assert pending is not None
        self._login_problem(exc)
        job_wrapper.change_state(model.Job.states.QUEUED)
        self._show_info(job_wrapper, f"Waiting for a DIRAC login: {exc}")
        pending.retry_at = time.monotonic() + self.runner_params["login_retry_interval"]
        with self._awaiting_lock:
            self._awaiting_login.append(job_state)

    def _login_problem(self, exc: LoginExpired) -> None:
        """One error in Galaxy's log per retry interval, not one per job and monitor cycle."""
        now = time.monotonic()
        if now - self._login_logged_at >= self.runner_params["login_retry_interval"]:
            self._login_logged_at = now
            log.error("DIRAC login lapsed; submissions are held and status updates paused: %s", exc)

    def _retry_awaiting_login(self) -> None:
        now = time.monotonic()
        with self._awaiting_lock:
            due = [js for js in self._awaiting_login if js.pending and js.pending.retry_at <= now]
            self._awaiting_login = [js for js in self._awaiting_login if js not in due]
        for job_state in due:
            if job_state.job_wrapper.get_state() in (model.Job.states.DELETED, model.Job.states.DELETING):
                continue
            self.work_queue.put((self._submit, job_state))

    # -- monitoring ---------------------------------------------------------------------------------------------------

    @property
    def monitor_sleep_time(self) -> float:
        """No fixed pause while the scheduler can tell us of changes: :meth:`_wait_for_updates` is the pause."""
        return 0.0 if self._long_poll else float(self.app.config.job_runner_monitor_sleep)

    def _wait_for_updates(self) -> None:
        """Pause until one of our jobs changes status (Done reaches Galaxy when it happens, not a cycle later), at
        most ``updates_wait`` seconds; where the scheduler has no such long poll, fall back to Galaxy's sleep."""
        if not self._long_poll:
            return
        try:
            answer = self.client.wait_for_updates(self._updates_cursor, self.runner_params["updates_wait"])
        except Exception as exc:  # noqa: BLE001 - unreachable or logged out: pause as Galaxy would, try again
            log.debug("waiting for DIRAC job updates failed: %s", exc)
            time.sleep(float(self.app.config.job_runner_monitor_sleep))
            return
        if answer is None:
            log.info("the DIRAC scheduler has no job-updates long poll; polling every %ss", self.monitor_sleep_time)
            self._long_poll = False
            return
        self._updates_cursor = answer[1]

    def check_watched_items(self) -> None:
        """One search for every watched job (in batches of status_batch_size), act on each, then wait for news."""
        try:
            self._check_watched_items()
        finally:
            self._wait_for_updates()

    def _check_watched_items(self) -> None:
        self._retry_awaiting_login()
        if not self.watched:
            return
        ids = [int(js.job_id) for js in self.watched if js.job_id]
        try:
            rows = self.client.statuses(ids, STATUS_PARAMETERS, batch=self.runner_params["status_batch_size"])
        except LoginExpired as exc:  # keep everything watched until an admin logs in again
            self._login_problem(exc)
            return
        except Exception as exc:  # scheduler unreachable: keep everything watched, try again next cycle
            log.warning("DIRAC status query failed, will retry: %s", exc)
            return
        new_watched = []
        for job_state in self.watched:
            kept = self._check(job_state, rows.get(int(job_state.job_id)) if job_state.job_id else None)
            if kept is not None:
                new_watched.append(kept)
        self.watched = new_watched

    def _check(self, job_state: DiracJobState, row: Optional[Dict[str, Any]]) -> Optional[DiracJobState]:
        galaxy_state = job_state.job_wrapper.get_state()
        if galaxy_state in (model.Job.states.DELETED, model.Job.states.DELETING, model.Job.states.STOPPED):
            log.debug("(%s) deleted in Galaxy; no longer watched", job_state.job_id)
            return None
        if galaxy_state in (model.Job.states.ERROR, model.Job.states.OK):
            return None
        if row is None:
            job_state.missing_cycles += 1
            if job_state.missing_cycles >= MAX_MISSING_CYCLES:
                job_state.fail_message = f"DIRAC job {job_state.job_id} is unknown to the scheduler"
                job_state.stop_job = False
                self.mark_as_failed(job_state)
                return None
            return job_state
        job_state.missing_cycles = 0
        job_state.dirac_row = row
        status = row.get("Status")
        if status != job_state.old_state:
            log.debug("(%s) DIRAC status %s / %s", job_state.job_id, status, row.get("MinorStatus"))
        job_state.old_state = status
        if status in QUEUED_STATES:
            self._show_queued(job_state, row)
        if status in RUNNING_STATES:
            if not job_state.running:
                job_state.running = True
                job_state.job_wrapper.change_state(model.Job.states.RUNNING)
            return job_state
        if status in DONE_STATES:
            self.mark_as_finished(job_state)
            return None
        if status == "Failed" and self._retry_transfer_failure(job_state, row):
            return job_state
        if status in FAILED_STATES:
            detail = " / ".join(str(v) for v in (row.get("MinorStatus"), row.get("ApplicationStatus")) if v)
            job_state.fail_message = f"DIRAC job {job_state.job_id} {status}: {detail}"
            job_state.stop_job = False
            self.mark_as_failed(job_state)
            return None
        return job_state  # queued states and anything unknown: wait

    def _show_queued(self, job_state: DiracJobState, row: Dict[str, Any]) -> None:
        """Say in the job's info where it stands in DIRAC and, while it waits, what kind of slot it waits for."""
        text = f"DIRAC job {job_state.job_id}: {row.get('Status')}"
        if row.get("MinorStatus"):
            text += f" / {row['MinorStatus']}"
        if row.get("Status") == states.WAITING and job_state.needs:
            text += f"; waiting for a pilot that offers {job_state.needs}"
        if text != job_state.shown:
            job_state.shown = text
            self._show_info(job_state.job_wrapper, text)

    def _show_info(self, job_wrapper: Any, text: str) -> None:
        """Put ``text`` in the job's info and its outputs' (what the user sees on a queued dataset).

        Galaxy copies a job's info to its outputs only on a state change; a queued job stays queued.
        """
        job = job_wrapper.get_job()
        job.info = text
        for assoc in list(job.output_datasets) + list(job.output_library_datasets):
            assoc.dataset.info = text
            self.sa_session.add(assoc.dataset)
        self.sa_session.add(job)
        self.sa_session.commit()

    def _retry_transfer_failure(self, job_state: DiracJobState, row: Dict[str, Any]) -> bool:
        """Data transfer to or from Galaxy failed (e.g. Galaxy was restarting): run the DIRAC job again.

        DIRAC's own MaxRescheduling (3) bounds this; past it the job fails with that reason.
        """
        minor = str(row.get("MinorStatus") or "")
        if minor == states.APP_ERRORS:
            # A DIRAC JobWrapper reports only that the payload failed; the payload said why on its stderr.
            minor = _payload_failure(self._node_stderr(job_state)) or minor
        if not minor.startswith(states.TRANSFER_FAILURES):
            return False
        if int(row.get("RescheduleCounter") or 0) >= MAX_TRANSFER_RETRIES:
            return False
        try:
            result = self.client.reschedule([int(str(job_state.job_id))])
        except WMSError as exc:
            log.warning("(%s) reschedule after %r failed: %s", job_state.job_id, minor, exc)
            return False
        if str(job_state.job_id) in (result.get("success") or {}):
            log.info("(%s) %s; DIRAC job rescheduled", job_state.job_id, minor)
            return True
        return False

    # -- finishing ----------------------------------------------------------------------------------------------------

    def _fetch_results(self, job_state: DiracJobState, spec: staging.JobSpec) -> None:
        dirac_id = int(str(job_state.job_id))
        staging.install_results(spec, lambda: self.client.download_output_sandboxes(dirac_id))

    def _dirac_metrics(self, job_state: DiracJobState) -> None:
        """Where and how the job ran, as Galaxy job metrics of plugin ``dirac`` (titles: galaxy_dirac.job_metrics).

        Site, times and reschedules come from the status search (Jobs columns in both the embedded scheduler and
        DiracX 0.7); CE, queue, pilot, CPU and memory from the scheduler's view of the job (``consumption``).
        """
        row = job_state.dirac_row or {}
        job = job_state.job_wrapper.get_job()
        try:
            job.add_metric("dirac", "dirac_job_id", int(str(job_state.job_id)))
            if row.get("Site"):
                job.add_metric("dirac", "site", str(row["Site"]))
            start, end = row.get("StartExecTime"), row.get("EndExecTime")
            if start and end:
                wall = (parse_time(end) - parse_time(start)).total_seconds()
                job.add_metric("dirac", "wall_clock_seconds", max(0.0, wall))
            if row.get("RescheduleCounter") is not None:
                job.add_metric("dirac", "reschedule_count", int(row["RescheduleCounter"]))
            used = self.client.consumption(int(str(job_state.job_id)))
            for name, key in (("ce", "GridCE"), ("queue", "CEQueue"), ("pilot", "Pilot_Reference")):
                if used.get(key):
                    job.add_metric("dirac", name, str(used[key])[:1000])
            if "CPUConsumed" in used:
                job.add_metric("dirac", "cpu_seconds", float(used["CPUConsumed"]))
            if "MaxMemoryUsed" in used:
                job.add_metric("dirac", "max_memory_mb", float(used["MaxMemoryUsed"]))
            self.sa_session.add(job)
            self.sa_session.commit()
        except Exception:  # noqa: BLE001 - metrics are best effort
            log.exception("(%s) could not record DIRAC metrics", job_state.job_id)

    def finish_job(self, job_state: DiracJobState) -> None:
        job_wrapper = job_state.job_wrapper
        state = staging.load_state(job_wrapper.working_directory) or {}
        try:
            spec = staging.spec_from_dict(state["spec"])  # type: ignore[arg-type]
            self._fetch_results(job_state, spec)
        except Exception as exc:
            log.exception("(%s) collecting DIRAC job results failed", job_state.job_id)
            job_state.fail_message = f"Could not collect the results of DIRAC job {job_state.job_id}: {exc}"
            job_state.stop_job = False
            self.fail_job(job_state, exception=True)
            return
        self._dirac_metrics(job_state)
        try:
            self._handle_metadata_externally(job_wrapper, resolve_requirements=True)
        except Exception:
            log.exception("(%s) external metadata failed", job_state.job_id)
        for path in (job_state.output_file, job_state.error_file):
            if not os.path.exists(path):
                open(path, "a").close()
        super().finish_job(job_state)

    def fail_job(self, job_state: Any, exception: bool = False, message: str = "Job failed", full_status: Any = None):
        """Fail with the DIRAC status in the job's info and whatever stderr the node sent back."""
        if full_status is None and getattr(job_state, "job_id", None):
            stderr = self._node_stderr(job_state)
            message_text = getattr(job_state, "fail_message", message)
            full_status = {"stdout": "", "stderr": f"{message_text}\n{stderr}".strip()}
        super().fail_job(job_state, exception=exception, message=message, full_status=full_status)

    def _node_stderr(self, job_state: Any) -> str:
        """The launcher's stderr from the output sandbox, when there is one (best effort)."""
        try:
            blobs = self.client.download_output_sandboxes(int(str(job_state.job_id)))
        except Exception:  # noqa: BLE001
            return ""
        return staging.sandbox_member(blobs, staging.STDERR, limit=8000).decode("utf-8", errors="replace")

    # -- control ------------------------------------------------------------------------------------------------------

    def stop_job(self, job_wrapper: Any) -> None:
        job = job_wrapper.get_job()
        external_id = job.job_runner_external_id
        if not external_id:
            return
        try:
            result = self.client.kill([int(external_id)], "Killed from Galaxy")
            log.info("(%s/%s) kill sent: %s", job.id, external_id, result.get("failed") or "ok")
        except Exception as exc:
            log.warning("(%s/%s) could not kill DIRAC job: %s", job.id, external_id, exc)

    def recover(self, job: Any, job_wrapper: Any) -> None:
        """Re-attach a job after a restart; find a job submitted just before the restart by its unique JobName."""
        external_id = job.get_job_runner_external_id()
        if not external_id:
            state = staging.load_state(job_wrapper.working_directory) or {}
            if state.get("dirac_id"):
                external_id = str(state["dirac_id"])
            elif state.get("job_name"):
                try:
                    rows = self.client.search(
                        [{"parameter": "JobName", "operator": "eq", "value": state["job_name"]}], ["JobID"]
                    )
                except WMSError as exc:
                    log.warning("(%s) recovery search failed: %s", job.id, exc)
                    rows = []
                if rows:
                    external_id = str(rows[0]["JobID"])
            if external_id:
                job_wrapper.set_job_destination(job_wrapper.job_destination, external_id)
        if not external_id:
            log.info("(%s) never reached the scheduler; submitting it now", job.id)
            self.work_queue.put((self.queue_job, job_wrapper))
            return
        job_state = DiracJobState(job_wrapper, job_wrapper.job_destination, external_id)
        job_state.needs = str((staging.load_state(job_wrapper.working_directory) or {}).get("needs") or "")
        job_wrapper.command_line = job.get_command_line()
        galaxy_state = job.get_state()
        job_state.running = galaxy_state == model.Job.states.RUNNING
        job_state.old_state = "Running" if job_state.running else "Received"
        log.info("(%s/%s) recovered in state %s", job.id, external_id, galaxy_state)
        self.monitor_queue.put(job_state)


def _needs(attrs: Dict[str, Any]) -> str:
    """What a slot must offer to match a JDL, in words (site, tags, cores, memory)."""
    parts = []
    for name, label in (("Site", "site"), ("Tags", "tags")):
        values = split_list(jdl_mod.lookup(attrs, name))
        if values:
            parts.append(f"{label} {', '.join(values)}")
    processors = jdl_mod.lookup(attrs, "NumberOfProcessors")
    if processors and int(processors) > 1:
        parts.append(f"{int(processors)} processors")
    memory = jdl_mod.lookup(attrs, "MinRAM")
    if memory:
        parts.append(f"{int(memory)} MB of memory")
    return "; ".join(parts)


def _payload_failure(stderr: str) -> Optional[str]:
    """The payload's own failure (a minor status) from the last ``galaxy-dirac:`` line of the node's stderr."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("galaxy-dirac: "):
            return line[len("galaxy-dirac: ") :]
    return None
