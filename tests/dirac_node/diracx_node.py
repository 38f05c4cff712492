"""A test-side DIRAC worker node for a real DiracX 0.7: takes its waiting jobs and runs them under DIRAC's JobWrapper.

DiracX 0.7 has no optimizers, no matcher and no route that returns a job's JDL, so this node plays those parts
the way DIRAC does, then behaves like a pilot with the job owner's credential:

- waiting jobs are found with ``POST /api/jobs/search`` (Received: DiracX leaves new jobs there; Waiting);
- the JDL is read from DiracX's JobDB (SQLite ``JobJDLs.JDL``, compressed as DIRAC's JobDB.getJobJDL expects);
- the job is moved Checking → Waiting → Matched as DIRAC's optimizers and Matcher would;
- the input sandbox is downloaded through ``GET /api/jobs/sandbox?pfn=``, the job runs through
  `run_under_dirac` in its own directory with only what DIRAC sets in the environment;
- DIRAC's output sandbox archive is uploaded (``POST /api/jobs/sandbox`` + presigned POST) and assigned with
  ``PATCH /api/jobs/{id}/sandbox/output`` (called directly: diracx-client 0.7's assign_sandbox_to_job sends the
  pfn unencoded and gets 422), then every status the JobWrapper reported is sent with ``PATCH /api/jobs/status``
  (in their order, with DIRAC's timestamps), and a reschedule the node asked for with ``POST /api/jobs/reschedule``.

Tokens are minted per use through the server's legacy exchange, so access tokens of a minute are fine.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import pathlib
import sqlite3
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import requests

from galaxy_dirac import jdl as jdl_module
from tests.contract.diracx_server import DiracxServer
from tests.dirac_node import DiracRun, run_under_dirac

log = logging.getLogger(__name__)

#: What DIRAC's optimizers and Matcher set before a pilot gets the job (Status, MinorStatus, Source).
MATCHING_PATH: List[Tuple[str, str, str]] = [
    ("Checking", "JobSanity", "JobPath"),
    ("Waiting", "Pilot Agent Submission", "JobScheduling"),
    ("Matched", "Assigned", "Matcher"),
]
WAITING = ("Received", "Waiting")


def extract_jdl(stored: str) -> str:
    """DIRAC's JobDBUtils.extractJDL: a JDL is stored as-is when it starts with "[", else zlib + base64."""
    if stored.startswith("["):
        return stored
    return zlib.decompress(base64.b64decode(stored)).decode()


def _iso(dirac_time: str) -> str:
    """DIRAC's `str(DiracTime.utcnow())` (naive UTC) as the timezone-aware ISO time DiracX requires."""
    stamp = dt.datetime.fromisoformat(dirac_time)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.isoformat()


@dataclass
class NodeJob:
    """One job this node ran: DiracX's JobID, what DIRAC reported, and what the node sent back."""

    job_id: int
    run: DiracRun
    output_pfn: Optional[str] = None
    responses: Dict[str, Any] = field(default_factory=dict)


def configure_for_dirac_pilots(server: DiracxServer, timeout: float = 60.0) -> None:
    """Set the VO's Operations so that DiracX's JDLs run on a DIRAC 9.1 pilot, and wait until DiracX uses it.

    DiracX 0.7's default Operations/SoftwareDistModule is "LocalSoftwareDist": it writes
    `SoftwareDistModule = "LocalSoftwareDist"` into every job's JDL, and DIRAC 9.1.22's JobAgent, which loads
    that module before running a job, fails ("No module LocalSoftwareDist found") and reschedules the job. A
    DIRAC installation leaves the option empty; so does this, by a commit to the server's git configuration
    (DiracX re-reads it within its cache TTL, ~15 s).
    """
    repo = server.workdir / "cs"
    document = json.loads((repo / "default.yml").read_text())
    operations = document.setdefault("Operations", {}).setdefault("Defaults", {})
    operations["SoftwareDistModule"] = ""
    (repo / "default.yml").write_text(json.dumps(document, indent=2))
    git = ["git", "-C", str(repo), "-c", "user.name=galaxy-dirac", "-c", "user.email=tests@galaxy-dirac.invalid"]
    subprocess.run([*git, "commit", "-q", "-a", "-m", "Operations for DIRAC pilots"], check=True)
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {server.mint()['access_token']}"
    deadline = time.monotonic() + timeout
    while True:  # a probe job shows which configuration DiracX submits with; it is killed afterwards
        response = session.post(f"{server.url}/api/jobs/jdl", json=['Executable = "/bin/true"; JobName = "cs-probe";'])
        response.raise_for_status()
        probe = response.json()[0]["JobID"]
        with contextlib.closing(sqlite3.connect(server.workdir / "db" / "jobdb.db", timeout=30)) as db:
            (stored,) = db.execute("SELECT JDL FROM JobJDLs WHERE JobID = ?", (probe,)).fetchone()
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        session.patch(f"{server.url}/api/jobs/status", json={str(probe): {now: {"Status": "Killed", "Source": "test"}}})
        if "SoftwareDistModule" not in extract_jdl(stored):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("DiracX did not pick up the new Operations/SoftwareDistModule")
        time.sleep(2)


def _as_list(value: object) -> List[str]:
    """A JDL value that may be one string or a list, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


class DiracxNode:
    """Runs a DiracX server's waiting jobs under DIRAC's real JobWrapper, one after the other, in `workdir`."""

    def __init__(self, server: DiracxServer, workdir: pathlib.Path, processors: int = 4, **run_kwargs: Any) -> None:
        """`processors` is the slot this node offers (DIRAC's InProcess CE refuses a job that asks for more, so
        such jobs are left waiting, as a Matcher would); `run_kwargs` go to `run_under_dirac`."""
        self.server = server
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processors = processors
        self.run_kwargs = dict(run_kwargs, processors=processors)
        self.done: List[NodeJob] = []
        self.errors: List[str] = []
        self._tokens: Dict[Tuple[str, str], Tuple[float, str]] = {}
        self._skipped: set = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- DiracX access ----------------------------------------------------------------------------------------

    def _session(self, owner: str = "alice", group: str = "galaxy_user") -> requests.Session:
        """A session with a fresh-enough token of `owner` in `group` (a pilot runs a job with its owner's token)."""
        minted_at, token = self._tokens.get((owner, group), (0.0, ""))
        if time.monotonic() - minted_at > 20:  # tokens may live only a minute: stay well inside that
            token = str(self.server.mint(owner, group)["access_token"])
            self._tokens[(owner, group)] = (time.monotonic(), token)
        session = requests.Session()
        session.trust_env = False  # loopback only
        session.headers["Authorization"] = f"Bearer {token}"
        return session

    def pending(self) -> List[Dict[str, Any]]:
        """Jobs waiting for a pilot, oldest first (JobID, Owner, OwnerGroup)."""
        response = self._session().post(
            f"{self.server.url}/api/jobs/search",
            json={
                "parameters": ["JobID", "Owner", "OwnerGroup", "Status"],
                "search": [{"parameter": "Status", "operator": "in", "values": list(WAITING)}],
                "sort": [{"parameter": "JobID", "direction": "asc"}],
            },
        )
        response.raise_for_status()
        return response.json()

    def job_jdl(self, job_id: int) -> str:
        """The job's current JDL from DiracX's JobDB, as DIRAC's JobDB.getJobJDL reads it."""
        with contextlib.closing(sqlite3.connect(self.server.workdir / "db" / "jobdb.db", timeout=30)) as db:
            row = db.execute("SELECT JDL FROM JobJDLs WHERE JobID = ?", (job_id,)).fetchone()
        if row is None:
            raise LookupError(f"job {job_id} has no JDL in DiracX's JobDB")
        return extract_jdl(row[0])

    def _set_status(self, session: requests.Session, job_id: int, updates: Dict[str, Dict[str, str]]) -> Any:
        response = session.patch(f"{self.server.url}/api/jobs/status", json={str(job_id): updates})
        if response.status_code >= 400:
            raise RuntimeError(f"PATCH /api/jobs/status for {job_id}: {response.status_code} {response.text}")
        return response.json()

    def _download(self, session: requests.Session, pfn: str, target: pathlib.Path) -> pathlib.Path:
        response = session.get(f"{self.server.url}/api/jobs/sandbox", params={"pfn": pfn})
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/jobs/sandbox {pfn}: {response.status_code} {response.text}")
        blob = requests.get(response.json()["url"], timeout=60)
        blob.raise_for_status()
        target.write_bytes(blob.content)
        return target

    def _upload_output(self, session: requests.Session, job_id: int, archive: pathlib.Path) -> str:
        data = archive.read_bytes()
        info = {
            "checksum_algorithm": "sha256",
            "checksum": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "format": "tar.bz2",
        }
        response = session.post(f"{self.server.url}/api/jobs/sandbox", json=info)
        if response.status_code != 200:
            raise RuntimeError(f"POST /api/jobs/sandbox: {response.status_code} {response.text}")
        upload = response.json()
        if upload.get("url"):
            sent = requests.post(upload["url"], data=upload["fields"], files={"file": (archive.name, data)}, timeout=60)
            if not sent.ok:
                raise RuntimeError(f"sandbox upload to the store: {sent.status_code} {sent.text[:500]}")
        assigned = session.patch(f"{self.server.url}/api/jobs/{job_id}/sandbox/output", json=upload["pfn"])
        if assigned.status_code != 200:
            raise RuntimeError(f"PATCH /api/jobs/{job_id}/sandbox/output: {assigned.status_code} {assigned.text}")
        return upload["pfn"]

    # -- running jobs -----------------------------------------------------------------------------------------

    def run_job(self, job_id: int, owner: str = "alice", group: str = "galaxy_user") -> NodeJob:
        """Match one job, run it under DIRAC's JobWrapper and report everything back to DiracX."""
        session = self._session(owner, group)
        jdl = self.job_jdl(job_id)
        wanted = int(str(jdl_module.lookup(jdl_module.parse(jdl), "NumberOfProcessors", 1)).strip('"') or 1)
        if wanted > self.processors:
            raise ValueError(f"job {job_id} wants {wanted} processors, this node's slot has {self.processors}")
        base = dt.datetime.now(dt.timezone.utc)
        path = {
            (base + dt.timedelta(milliseconds=i)).isoformat(): {"Status": s, "MinorStatus": m, "Source": src}
            for i, (s, m, src) in enumerate(MATCHING_PATH)
        }
        self._set_status(session, job_id, path)
        job_dir = self.workdir / f"job-{job_id}"
        (job_dir / "download").mkdir(parents=True, exist_ok=True)
        sandboxes = {}
        for entry in _as_list(jdl_module.lookup(jdl_module.parse(jdl), "InputSandbox", [])):
            if entry.startswith("SB:"):
                name = f"{len(sandboxes)}-{entry.rsplit('/', 1)[-1].replace(':', '_')}"
                sandboxes[entry] = self._download(session, entry, job_dir / "download" / name)
        run = run_under_dirac(
            jdl, sandboxes, job_dir / "node", job_id, owner=owner, owner_group=group, **self.run_kwargs
        )
        node_job = NodeJob(job_id, run)
        session = self._session(owner, group)
        if run.output_sandbox is not None:
            node_job.output_pfn = self._upload_output(session, job_id, run.output_sandbox)
        updates: Dict[str, Dict[str, str]] = {}
        for status in run.statuses:
            update = {k: v for k, v in status.items() if k in ("Status", "MinorStatus", "ApplicationStatus", "Source")}
            updates[_iso(status["time"])] = update
        if updates:
            node_job.responses["status"] = self._set_status(session, job_id, updates)
        if run.rescheduled:
            response = session.post(f"{self.server.url}/api/jobs/reschedule", json={"job_ids": [job_id]})
            node_job.responses["reschedule"] = (response.status_code, response.text)
        self.done.append(node_job)
        return node_job

    def run_pending(self) -> List[NodeJob]:
        """Run every job waiting now, oldest first; return what ran."""
        ran = []
        for row in self.pending():
            job_id = int(row["JobID"])
            if job_id in self._skipped:
                continue
            owner, group = row.get("Owner") or "alice", row.get("OwnerGroup") or "galaxy_user"
            try:
                ran.append(self.run_job(job_id, owner, group))
            except ValueError as exc:  # not for this slot: leave it waiting
                self._skipped.add(job_id)
                self.errors.append(str(exc))
        return ran

    def start(self, interval: float = 1.0) -> DiracxNode:
        """Keep running waiting jobs in a background thread until stop()."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_pending()
                except Exception as exc:  # noqa: BLE001 - a node keeps going; the test reads self.errors
                    log.exception("DiracX node cycle failed")
                    self.errors.append(repr(exc))
                self._stop.wait(interval)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="diracx-node", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """Stop the background thread after the job it is running, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> DiracxNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
