"""Durable delivery of what a job wrapper must tell the scheduler: status updates and the output sandbox.

A result that never reaches the scheduler is a lost job, and worker-node networks and schedulers both go away for
minutes at a time. So every status update and the output sandbox are first written to a JSON file in the pilot's work
directory (``outbox/job-<id>.json``, with the archive beside it) and only then sent, in order, by a background thread
that retries through outages with back-off. A step leaves the file only once the scheduler acknowledged it; a file left
behind when the pilot gives up is delivered by the next pilot started in the same directory.

Delivery is exactly-once in effect: a status update keeps the timestamp it was recorded with, and the scheduler ignores
an update identical to one it already has, so sending it again after a crash between "sent" and "forgotten" is safe;
the output sandbox is content-addressed, so uploading it twice stores it once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from galaxy_dirac.pilot.http import Backoff, Client, HTTPError, MultipartBody, is_retryable, upload
from galaxy_dirac.times import format_time

log = logging.getLogger(__name__)

SOURCE = "JobWrapper"
FAILED_OUTPUT_SANDBOX = "Failed uploading output sandbox"


class _Record:
    """What is still to be delivered for one job, in order."""

    def __init__(self, job_id: int, url: str, token: str, steps: Optional[List[Dict]] = None) -> None:
        self.job_id = job_id
        self.url = url
        self.token = token
        self.steps: List[Dict] = steps or []
        self.open = False
        #: Seconds to add to this node's clock to get the scheduler's (updates are ordered by their timestamps).
        self.clock_offset = 0.0
        self.last_time: Optional[dt.datetime] = None
        #: Held while sending, so that one job's updates never travel out of order.
        self.sending = threading.Lock()

    def to_json(self) -> Dict:
        return {"job_id": self.job_id, "url": self.url, "token": self.token, "steps": self.steps}


class Outbox:
    """Persistent, ordered, retried delivery of job status updates and output sandboxes.

    ``client_factory(url, token)`` builds the HTTP client used for one job (tests inject their own).
    """

    def __init__(
        self,
        directory: str,
        *,
        ca_bundle: Optional[str] = None,
        backoff: Optional[Backoff] = None,
        client_factory: Optional[Callable[[str, str], Client]] = None,
    ) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.ca_bundle = ca_bundle
        self.backoff = backoff or Backoff(base=1.0, cap=30.0)
        self._client_factory = client_factory or self._default_client
        self._records: Dict[int, _Record] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._load()

    def _default_client(self, url: str, token: str) -> Client:
        return Client(url, token, ca_bundle=self.ca_bundle, retries=1, timeout=30.0)

    # -- persistence -------------------------------------------------------------------------------------------------

    def _path(self, job_id: int) -> str:
        return os.path.join(self.directory, f"job-{job_id}.json")

    def archive_path(self, job_id: int) -> str:
        """Where the wrapper puts the output sandbox archive of ``job_id`` so that it outlives the job directory."""
        return os.path.join(self.directory, f"job-{job_id}-output.tar.bz2")

    def _load(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith("job-") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as stream:
                    data = json.load(stream)
                record = _Record(int(data["job_id"]), data["url"], data["token"], list(data["steps"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable outbox file %s: %s", name, exc)
                continue
            if record.steps:
                log.info("outbox: %d undelivered step(s) of job %d from earlier", len(record.steps), record.job_id)
                self._records[record.job_id] = record

    def _save(self, record: _Record) -> None:
        path = self._path(record.job_id)
        if not record.steps:
            if os.path.exists(path):
                os.unlink(path)
            return
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(record.to_json(), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)

    # -- producers ---------------------------------------------------------------------------------------------------

    def open_job(self, job_id: int, url: str, token: str, clock_offset: float = 0.0) -> None:
        """Start recording updates of ``job_id``, sent to the scheduler at ``url`` with the job's ``token``.

        ``clock_offset`` (scheduler clock minus ours, in seconds) corrects the timestamps of a node whose clock is off.
        """
        with self._lock:
            record = self._records.get(job_id)
            if record is not None and record.token != token:
                # Left over from an earlier run of this job, which was rescheduled since: its results are moot, and
                # sending them with the new run's token would make them count.
                self._set_aside(record, "superseded by a new run of the job")
                record = None
            if record is None:
                record = self._records[job_id] = _Record(job_id, url, token)
            record.url, record.open = url, True
            record.clock_offset = clock_offset

    def close_job(self, job_id: int) -> None:
        """No more updates will be added for ``job_id``; it is forgotten once everything is delivered."""
        with self._lock:
            record = self._records.get(job_id)
            if record is not None:
                record.open = False
                if not record.steps:
                    del self._records[job_id]
                self._changed.notify_all()

    def _add(self, job_id: int, step: Dict) -> None:
        with self._lock:
            record = self._records.get(job_id)
            if record is None:
                raise KeyError(f"job {job_id} was not opened in the outbox")
            record.steps.append(step)
            self._save(record)
            self._changed.notify_all()
        self._wake.set()

    def _timestamp(self, job_id: int) -> str:
        """A timestamp later than any given before for this job, so updates keep their order and never collide."""
        with self._lock:
            record = self._records[job_id]
            now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=record.clock_offset)
            if record.last_time is not None and now <= record.last_time:
                now = record.last_time + dt.timedelta(microseconds=1)
            record.last_time = now
        return format_time(now)

    def status(
        self, job_id: int, status: Optional[str], minor: Optional[str] = None, application: Optional[str] = None
    ) -> str:
        """Queue a status update of ``job_id``; returns its timestamp."""
        update: Dict[str, Any] = {"Source": SOURCE}
        if status:
            update["Status"] = status
        if minor:
            update["MinorStatus"] = minor
        if application:
            update["ApplicationStatus"] = application[:255]
        when = self._timestamp(job_id)
        self._add(job_id, {"op": "status", "time": when, "update": update})
        log.info("job %d: %s / %s%s", job_id, status, minor, f" ({application})" if application else "")
        return when

    def output_sandbox(self, job_id: int, archive: str, sha256: str, size: int, fmt: str = "tar.bz2") -> None:
        """Queue the upload of ``archive`` (already at :meth:`archive_path`) as the output sandbox of ``job_id``.

        Should the scheduler refuse it for good, queued ``Done`` updates behind it become ``Failed``.
        """
        step = {"op": "sandbox", "file": os.path.basename(archive), "sha256": sha256, "size": size, "format": fmt}
        self._add(job_id, step)

    def discard(self, job_id: int) -> None:
        """Forget everything queued for ``job_id`` (the job was handed back to the scheduler)."""
        with self._lock:
            record = self._records.pop(job_id, None)
            if record is not None:
                self._remove_files(record)
                record.steps.clear()
                self._save(record)
            self._changed.notify_all()

    def _set_aside(self, record: _Record, why: str) -> None:
        log.warning("outbox: dropping %d undelivered step(s) of job %d: %s", len(record.steps), record.job_id, why)
        self._write_rejected(record.job_id, record.steps, why)
        self._remove_files(record)
        record.steps.clear()
        self._save(record)
        self._records.pop(record.job_id, None)

    def _write_rejected(self, job_id: int, steps: List[Dict], why: str) -> None:
        rejected = os.path.join(self.directory, "rejected")
        os.makedirs(rejected, mode=0o700, exist_ok=True)
        with open(os.path.join(rejected, f"job-{job_id}.jsonl"), "a", encoding="utf-8") as stream:
            for step in steps:
                stream.write(json.dumps({"step": step, "error": why}) + "\n")

    def _remove_files(self, record: _Record) -> None:
        for step in record.steps:
            if step["op"] == "sandbox":
                path = os.path.join(self.directory, step["file"])
                if os.path.exists(path):
                    os.unlink(path)

    # -- delivery ----------------------------------------------------------------------------------------------------

    def pending(self) -> List[int]:
        """Jobs with updates not yet acknowledged by the scheduler."""
        with self._lock:
            return sorted(job_id for job_id, record in self._records.items() if record.steps)

    def deliver(self, job_id: int) -> bool:
        """Send what is queued for ``job_id``, in order; ``False`` if something is left for a later attempt."""
        with self._lock:
            record = self._records.get(job_id)
        if record is None:
            return True
        with record.sending:
            client = self._client_factory(record.url, record.token)
            while True:
                with self._lock:
                    if not record.steps:
                        break
                    count = self._status_run(record) if record.steps[0]["op"] == "status" else 1
                    batch = list(record.steps[:count])
                try:
                    if batch[0]["op"] == "status":
                        self._send_statuses(client, record.job_id, batch)
                    else:
                        self._send_sandbox(client, record.job_id, batch[0])
                except Exception as exc:
                    if is_retryable(exc):
                        log.info("outbox: job %d not delivered yet: %s", job_id, exc)
                        return False
                    with self._lock:
                        self._refused(record, batch, exc)
                with self._lock:
                    if record.steps[: len(batch)] != batch:
                        break
                    del record.steps[: len(batch)]
                    self._save(record)
                    self._changed.notify_all()
        with self._lock:
            if not record.open and not record.steps and self._records.get(job_id) is record:
                del self._records[job_id]
            self._changed.notify_all()
        return True

    @staticmethod
    def _status_run(record: _Record) -> int:
        count = 0
        for step in record.steps:
            if step["op"] != "status":
                break
            count += 1
        return count

    @staticmethod
    def _send_statuses(client: Client, job_id: int, batch: List[Dict]) -> None:
        updates = {step["time"]: step["update"] for step in batch}
        answer = client.call("PATCH", "api/jobs/status", {str(job_id): updates}, params={"force": "false"})
        failed = answer.get("failed") if isinstance(answer, dict) else None
        if failed:
            log.warning("job %d: scheduler did not apply status: %s", job_id, failed)

    def _send_sandbox(self, client: Client, job_id: int, step: Dict) -> None:
        path = os.path.join(self.directory, step["file"])
        body = {"checksum_algorithm": "sha256", "checksum": step["sha256"], "size": step["size"]}
        body["format"] = step["format"]
        target = client.call("POST", "api/jobs/sandbox", body)
        if target.get("url"):
            multipart = MultipartBody(target.get("fields") or {}, [("file", os.path.basename(path), path)])
            upload(
                "POST",
                client.url(target["url"]),
                multipart,
                context=client.context,
                retries=1,
                backoff=self.backoff,
                sleep=self._stop.wait,
            )
        client.call("PATCH", f"api/jobs/{job_id}/sandbox/output", target["pfn"])
        log.info("job %d: output sandbox uploaded as %s", job_id, target["pfn"])
        if os.path.exists(path):
            os.unlink(path)

    def _refused(self, record: _Record, batch: List[Dict], exc: BaseException) -> None:
        """The scheduler refused ``batch`` for good: keep a copy for forensics and go on with the rest."""
        step = batch[0]
        log.error("job %d: scheduler refused %s: %s", record.job_id, step["op"], exc)
        self._write_rejected(record.job_id, batch, str(exc))
        if step["op"] != "sandbox":
            return
        path = os.path.join(self.directory, step["file"])
        if os.path.exists(path):
            os.unlink(path)
        detail = exc.detail if isinstance(exc, HTTPError) else str(exc)
        for later in record.steps[len(batch) :]:
            if later["op"] == "status" and later["update"].get("Status") == "Done":
                later["update"] = {
                    "Status": "Failed",
                    "MinorStatus": FAILED_OUTPUT_SANDBOX,
                    "ApplicationStatus": detail[:255],
                    "Source": SOURCE,
                }

    def flush(self) -> bool:
        """One delivery attempt for every job; ``True`` when nothing is left."""
        return all([self.deliver(job_id) for job_id in self.pending()])

    # -- background thread -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Deliver in a background thread, retrying with back-off while the scheduler is unreachable."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; what is undelivered stays on disk."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                done = self.flush()
            except Exception:
                log.exception("outbox delivery failed unexpectedly")
                done = False
            if done:
                failures = 0
                self._wake.wait()
                continue
            delay = self.backoff.delay(failures)
            failures += 1
            self._stop.wait(delay)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything queued has been delivered; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not any(r.steps for r in self._records.values()), timeout)
