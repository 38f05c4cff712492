"""Pilots on an HTCondorCE through the ``htcondor`` 25.x bindings (``htcondor2``/``classad2``).

Two paths, as in DIRAC:

* ``mode: remote`` (default): the CE *is* a schedd (port 9619). It is located through its collector
  (``Collector.locate``) or a location ad, jobs are submitted with ``submit(spool=True)`` and the wrapper is
  sent with ``spool()``.
* ``mode: grid``: a local schedd forwards ``universe = grid`` / ``grid_resource = condor <ce> <ce>:9619`` jobs.

N pilots are one cluster, one transaction: a single wrapper script taking the stamp as ``$1`` and
``queue stamp in (...)``. Credentials are process-wide HTCondor settings (``htcondor2.param`` and
``BEARER_TOKEN_FILE``), so every call runs under one lock with this queue's settings applied.
Finished jobs stay in the queue a while (``leave_in_queue``) and are then removed by the schedd's own
``periodic_remove`` policy or by :meth:`cleanup`.

Each pilot's own token travels as its own input file, ``pilot-token-<stamp>`` (``transfer_input_files`` with the
proc's ``$(stamp)``), written mode 0600 in the director's work dir: never in a job ad attribute, the arguments or
the environment, which other users of the CE can read. The files go once the CE has them (after ``spool``) or, in
grid mode, once the local schedd no longer holds the job.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence
from urllib.parse import urlsplit

import classad2
import htcondor2
from pydantic import Field, field_validator

from ..bundle import TOKEN_FILE_PREFIX, token_file
from .base import (
    ABORTED,
    DONE,
    FAILED,
    RUNNING,
    UNKNOWN,
    WAITING,
    CEError,
    CEOptions,
    ComputingElement,
    PilotRef,
    PilotStatus,
)

log = logging.getLogger(__name__)

#: HTCondor settings are process-global; one queue at a time may set and use them.
_LOCK = threading.RLock()

CE_PORT = 9619
#: The HTCondor settings a queue's credentials change (reset before each queue's calls).
_CRED_PARAMS = (
    "SEC_CLIENT_AUTHENTICATION_METHODS", "SCITOKENS_FILE", "AUTH_SSL_CLIENT_CERTFILE", "AUTH_SSL_CLIENT_KEYFILE",
)  # fmt: skip
#: HoldReasonCode values that do not mean failure: the job is still waiting for its input to be spooled.
_HOLD_WAITING = {16}  # SpoolingInput
_PROJECTION = [
    "ClusterId", "ProcId", "JobStatus", "HoldReasonCode", "HoldReasonSubCode", "HoldReason", "ExitCode",
    "PilotStamp", "EnteredCurrentStatus",
]  # fmt: skip


def pilot_state(ad: Any) -> PilotStatus:
    """DIRAC's mapping of an HTCondor job ad to a pilot state.

    Idle → Waiting; Running, Transferring output, Suspended → Running; Completed → Done (Failed if the
    wrapper exited non-zero); Removed → Aborted; Held → Waiting while input spools (code 16), otherwise
    Aborted with the hold reason (the CE never releases a held pilot by itself).
    """
    status = int(ad.get("JobStatus", 0))
    if status == 1:
        return PilotStatus(WAITING)
    if status in (2, 6, 7):
        return PilotStatus(RUNNING)
    if status == 4:
        code = ad.get("ExitCode")
        if code not in (None, 0) and isinstance(code, int):
            return PilotStatus(FAILED, f"pilot wrapper exited with {code}")
        return PilotStatus(DONE)
    if status == 3:
        return PilotStatus(ABORTED, "removed from the CE")
    if status == 5:
        code = int(ad.get("HoldReasonCode", 0) or 0)
        reason = f"held (code {code}/{ad.get('HoldReasonSubCode', 0)}): {ad.get('HoldReason', '')}"
        if code in _HOLD_WAITING:
            return PilotStatus(WAITING, reason)
        return PilotStatus(ABORTED, reason[:255])
    return PilotStatus(UNKNOWN, f"JobStatus {status}")


def parse_reference(reference: str) -> tuple[str, int, int]:
    """``htcondorce://host:9619/12.3`` → (host:port, 12, 3)."""
    parts = urlsplit(reference)
    cluster, _, proc = parts.path.lstrip("/").partition(".")
    return parts.netloc, int(cluster), int(proc or 0)


class HTCondorCEComputingElement(ComputingElement):
    """One HTCondorCE queue. Options: ``mode`` (remote|grid), ``pool`` (collector, default the endpoint),
    ``schedd_name``, ``location`` (host:port: skip the collector), ``batch_queue``, ``keep_finished`` (s),
    ``keep_held`` (s), ``submit`` (extra submit commands), ``local_schedd`` (grid mode)."""

    type_name = "htcondorce"

    #: Builds the schedd to talk to; the tests replace it with a double of ``htcondor2.Schedd``.
    schedd_factory: Optional[Callable[[HTCondorCEComputingElement], Any]] = None

    class Options(CEOptions):
        """The queue options of the class docstring; empty strings mean "derive from the endpoint/queue"."""

        mode: Literal["remote", "grid"] = "remote"
        pool: str = ""
        schedd_name: str = ""
        location: str = ""
        batch_queue: str = ""
        keep_finished: int = Field(3600, ge=0)
        keep_held: int = Field(86400, ge=0)
        #: Extra submit commands, written as given (values as text).
        submit: dict[str, str] = Field(default_factory=dict)
        local_schedd: str = ""

        @field_validator("submit", mode="before")
        @classmethod
        def _as_text(cls, value: Any) -> Any:
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value

    def __init__(self, queue: Any, bundle: Any = None) -> None:
        super().__init__(queue, bundle)
        opts = self.read_options(queue)
        endpoint = queue.endpoint or queue.ce
        host = endpoint.split("://")[-1].split("/")[0]
        self.host = host.split(":")[0]
        self.address = host if ":" in host else f"{host}:{CE_PORT}"
        self.mode = opts.mode
        self.pool = opts.pool or self.address
        self.schedd_name = opts.schedd_name or self.host
        self.batch_queue = opts.batch_queue or queue.queue or ""
        self.keep_finished = opts.keep_finished
        self.keep_held = opts.keep_held
        self.extra = dict(opts.submit)
        self.local_schedd = opts.local_schedd or None
        self.location = opts.location
        work = opts.work_dir or os.path.join(tempfile.gettempdir(), "sitedirector", queue.name)
        self.work_dir = Path(work)
        self._schedd: Any = None

    # --- credentials and connection -------------------------------------------------------------------
    def _apply_credentials(self) -> None:
        """Point HTCondor at this queue's token (SciTokens) or proxy; called under the lock before each call."""
        cred = self.queue.credentials
        # Start from a clean slate: another queue may have set its own credentials in this process.
        for key in _CRED_PARAMS:
            if htcondor2.param.get(key) is not None:
                del htcondor2.param[key]
        for var in ("BEARER_TOKEN_FILE", "X509_USER_PROXY"):
            os.environ.pop(var, None)
        if cred is None:
            return
        path = str(cred.get("file"))
        if cred.type == "scitoken":
            htcondor2.param["SEC_CLIENT_AUTHENTICATION_METHODS"] = "SCITOKENS"
            htcondor2.param["SCITOKENS_FILE"] = path
            os.environ["BEARER_TOKEN_FILE"] = path
        elif cred.type == "proxy":
            # HTCondor 25 has no GSI: a proxy authenticates as an SSL client certificate (cert and key in one file).
            htcondor2.param["SEC_CLIENT_AUTHENTICATION_METHODS"] = "SSL"
            htcondor2.param["AUTH_SSL_CLIENT_CERTFILE"] = path
            htcondor2.param["AUTH_SSL_CLIENT_KEYFILE"] = path
            os.environ["X509_USER_PROXY"] = path

    def _connect(self) -> Any:
        if self.schedd_factory is not None:
            return type(self).schedd_factory(self)
        if self.mode == "grid":
            if self.local_schedd:
                ad = htcondor2.Collector().locate(htcondor2.DaemonType.Schedd, str(self.local_schedd))
                return htcondor2.Schedd(ad)
            return htcondor2.Schedd()
        if self.location:
            return htcondor2.Schedd(self.location_ad())
        ad = htcondor2.Collector(self.pool).locate(htcondor2.DaemonType.Schedd, self.schedd_name)
        return htcondor2.Schedd(ad)

    def location_ad(self) -> classad2.ClassAd:
        """A schedd location ad for ``options.location`` (host:port), to skip asking the CE's collector."""
        return classad2.ClassAd(
            {
                "MyType": "Scheduler",
                "Name": self.schedd_name,
                "MyAddress": f"<{self.location}>",
                "CondorVersion": htcondor2.version(),
            }
        )

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(schedd)`` with this queue's credentials; HTCondor errors become CEError."""
        with _LOCK:
            self._apply_credentials()
            try:
                if self._schedd is None:
                    self._schedd = self._connect()
                return fn(self._schedd)
            except (htcondor2.HTCondorException, OSError, RuntimeError, ValueError) as exc:
                self._schedd = None  # reconnect next time
                raise CEError(f"{self.address}: {what} failed: {exc}") from exc

    # --- submit description ---------------------------------------------------------------------------
    def _wrapper_file(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "pilot-wrapper.sh"
        text = self.bundle.wrapper(None)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o700)
            tmp.replace(path)
        return path

    @property
    def token_dir(self) -> Path:
        """Where the per-pilot token files wait for the schedd to send them (mode 0700)."""
        return self.work_dir / "tokens"

    def _write_tokens(self, stamps: Sequence[str]) -> Optional[Path]:
        """Each pilot's token as the file its proc transfers; ``None`` when the pilots share the wrapper's token."""
        tokens = self.bundle.token_files(stamps)
        if not tokens:
            return None
        self.token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.token_dir.chmod(0o700)
        for stamp, token in tokens.items():
            fd = os.open(self.token_dir / token_file(stamp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(token)
        return self.token_dir

    def _remove_tokens(self, stamps: Sequence[str]) -> None:
        for stamp in stamps:
            (self.token_dir / token_file(stamp)).unlink(missing_ok=True)

    def _reap_tokens(self) -> None:
        """Delete the token files of pilots the schedd no longer holds (grid mode: the local schedd forwards a
        job's input to the CE some time after submission, so a file stays while its job is in the queue)."""
        files = [p.name for p in self.token_dir.glob(TOKEN_FILE_PREFIX + "*")] if self.token_dir.is_dir() else []
        if not files:
            return
        name = classad2.quote(self.queue.name)
        ads = self._call("query", lambda s: s.query(f"SiteDirectorQueue == {name}", ["PilotStamp"]))
        queued = {token_file(str(ad.get("PilotStamp", ""))) for ad in ads}
        for stale in set(files) - queued:
            (self.token_dir / stale).unlink(missing_ok=True)

    def description(self, stamps: Sequence[str], wrapper: str, token_dir: Optional[Path] = None) -> htcondor2.Submit:
        """The submit description for one cluster of pilots, one proc per stamp."""
        q = self.queue
        lines = {
            "executable": wrapper,
            "arguments": "$(stamp)",
            "output": "pilot.$(Cluster).$(Process).out",
            "error": "pilot.$(Cluster).$(Process).err",
            "should_transfer_files": "YES",
            "when_to_transfer_output": "ON_EXIT_OR_EVICT",
            "+PilotStamp": '"$(stamp)"',
            "+SiteDirectorQueue": classad2.quote(q.name),
            "request_cpus": str(q.processors),
            # Keep finished pilots a while so status can see how they ended, then let the schedd drop them.
            "leave_in_queue": f"JobStatus == 4 && (time() - EnteredCurrentStatus) < {self.keep_finished}",
            # Only held jobs: a periodic_remove on a completed job would turn it into "Removed" (Aborted);
            # completed ones leave the queue as Completed once leave_in_queue turns false.
            "periodic_remove": f"JobStatus == 5 && (time() - EnteredCurrentStatus) > {self.keep_held}",
        }
        if q.memory:
            lines["request_memory"] = str(q.memory)
        if q.cpu_time:
            lines["+maxWallTime"] = str(max(1, q.cpu_time // 60))
        if self.batch_queue:
            lines["+queue"] = classad2.quote(self.batch_queue)
        if self.mode == "grid":
            lines["universe"] = "grid"
            lines["grid_resource"] = f"condor {self.host} {self.address}"
        else:
            lines["universe"] = "vanilla"
        cred = q.credentials
        if cred is not None and cred.type == "scitoken" and self.mode == "grid":
            # The local schedd authenticates to the CE with this token; remote submission uses the client's.
            lines["scitokens_file"] = str(cred.get("file"))
        elif cred is not None and cred.type == "proxy":
            lines["x509userproxy"] = str(cred.get("file"))
        lines.update(self.extra)
        if token_dir is not None:
            # Each proc brings its own pilot's token file, plus whatever the queue's own submit commands send.
            own = f"{token_dir}/{TOKEN_FILE_PREFIX}$(stamp)"
            lines["transfer_input_files"] = ", ".join(filter(None, (own, lines.get("transfer_input_files", ""))))
        text = "\n".join(f"{k} = {v}" for k, v in lines.items())
        return htcondor2.Submit(f"{text}\nqueue stamp in ({', '.join(stamps)})\n")

    def _ref(self, cluster: int, proc: int) -> str:
        return f"htcondorce://{self.address}/{cluster}.{proc}"

    # --- interface ------------------------------------------------------------------------------------
    def submit(self, stamps: Sequence[str]) -> list[PilotRef]:
        if not stamps:
            return []
        try:
            wrapper = self._wrapper_file()
            token_dir = self._write_tokens(stamps)
        except OSError as exc:
            self._remove_tokens(stamps)
            raise CEError(f"cannot write the pilot wrapper or tokens: {exc}") from exc
        sub = self.description(stamps, str(wrapper), token_dir)
        spool = self.mode == "remote"

        def do(schedd: Any) -> Any:
            result = schedd.submit(sub, spool=spool)
            if spool:
                schedd.spool(result)
            return result

        try:
            result = self._call("submit", do)
        except CEError:
            self._remove_tokens(stamps)
            raise
        if spool:  # spool() sent every proc's token file to the CE
            self._remove_tokens(stamps)
        cluster, first = result.cluster(), result.first_proc()
        log.info("%s: cluster %d with %d pilots on %s", self.queue.name, cluster, len(stamps), self.address)
        return [PilotRef(self._ref(cluster, first + i), stamp) for i, stamp in enumerate(stamps)]

    def _constraint(self, refs: Sequence[PilotRef]) -> str:
        ids: dict[int, list[int]] = {}
        for ref in refs:
            _, cluster, proc = parse_reference(ref.reference)
            ids.setdefault(cluster, []).append(proc)
        parts = [
            f"(ClusterId == {c} && ({' || '.join(f'ProcId == {p}' for p in sorted(procs))}))"
            for c, procs in sorted(ids.items())
        ]
        return " || ".join(parts) or "False"

    def status(self, refs: Sequence[PilotRef]) -> dict[str, PilotStatus]:
        refs = [r for r in refs if r.reference.startswith("htcondorce://")]
        if not refs:
            return {}
        constraint = self._constraint(refs)
        ads = self._call("query", lambda s: s.query(constraint, _PROJECTION))
        found = {(int(ad["ClusterId"]), int(ad["ProcId"])): ad for ad in ads}
        missing = [r for r in refs if parse_reference(r.reference)[1:] not in found]
        if missing:
            hist = self._call(
                "history", lambda s: s.history(self._constraint(missing), _PROJECTION, match=len(missing))
            )
            found.update({(int(ad["ClusterId"]), int(ad["ProcId"])): ad for ad in hist})
        out = {}
        for ref in refs:
            ad = found.get(parse_reference(ref.reference)[1:])
            out[ref.reference] = pilot_state(ad) if ad is not None else PilotStatus(UNKNOWN, "not in queue or history")
        return out

    def kill(self, refs: Sequence[PilotRef]) -> None:
        refs = [r for r in refs if r.reference.startswith("htcondorce://")]
        if refs:
            ids = [f"{c}.{p}" for _, c, p in map(parse_reference, (r.reference for r in refs))]
            self._call("remove", lambda s: s.act(htcondor2.JobAction.Remove, ids, "killed by the SiteDirector"))

    def cleanup(self, refs: Optional[Sequence[PilotRef]] = None) -> list[PilotRef]:
        """Remove this queue's completed and failed-hold jobs that the director no longer tracks.

        Tracked pilots stay until the scheduler has their final state (the next cycle), so a pilot that
        ends between ``status`` and ``cleanup`` is never removed unseen. Token files of pilots no longer in the
        queue go first (those of the jobs removed here, next time).
        """
        self._reap_tokens()
        name = classad2.quote(self.queue.name)
        held = " || ".join(f"HoldReasonCode == {c}" for c in sorted(_HOLD_WAITING))
        constraint = f"SiteDirectorQueue == {name} && (JobStatus == 4 || (JobStatus == 5 && !({held})))"
        ads = self._call("query", lambda s: s.query(constraint, ["ClusterId", "ProcId", "PilotStamp"]))
        tracked = {r.reference for r in refs or ()}
        removed = [
            PilotRef(self._ref(int(a["ClusterId"]), int(a["ProcId"])), str(a.get("PilotStamp", ""))) for a in ads
        ]
        removed = [r for r in removed if r.reference not in tracked]
        if not removed:
            return []
        ids = [f"{c}.{p}" for _, c, p in (parse_reference(r.reference) for r in removed)]
        self._call("remove", lambda s: s.act(htcondor2.JobAction.Remove, ids, "finished pilot cleanup"))
        return removed

    def close(self) -> None:
        self._schedd = None
