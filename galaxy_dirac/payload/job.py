"""Run one Galaxy job in the current directory (the node's job directory); see :mod:`galaxy_dirac.payload`.

Standard library only: it runs on worker nodes from ``galaxy_dirac_payload.pyz`` beside the pilot's modules it shares
(``pilot.staging`` for transfers, ``archive`` for deterministic archives, ``states`` for the exit-code contract).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from galaxy_dirac.archive import ArchiveError, create_archive
from galaxy_dirac.payload import ATTEMPT, ATTEMPT_LINE, CONFIG, EXTRA_TAR, PLACEHOLDER, RESULTS, WORK_TAR
from galaxy_dirac.pilot.http import Backoff
from galaxy_dirac.pilot.staging import ManifestError, StagingError, Transfers, confined_path, parse_manifest
from galaxy_dirac.states import (
    INPUT_STAGING_FAILED,
    JOB_SCRIPT_INCOMPLETE,
    OUTPUT_SANDBOX_TOO_LARGE,
    OUTPUT_STAGING_FAILED,
    PAYLOAD_ERROR,
    PAYLOAD_EXIT,
)

log = logging.getLogger("galaxy_dirac.payload")

#: Where a slot says how many cores the job may use. DIRAC's JobAgent and our pilot both set DIRAC_JOB_PROCESSORS (the
#: JDL's NumberOfProcessors as granted); DIRAC 9's DIRAC_PROCESSORS is always 1 and is not read. (Galaxy's job script
#: itself prefers a batch system's own figure, e.g. SLURM_CPUS_ON_NODE, over GALAXY_SLOTS.)
PROCESSOR_VARIABLES = ("DIRAC_JOB_PROCESSORS",)


class PayloadFailure(Exception):
    """A failure of the payload itself; ``minor`` is the DIRAC minor status it stands for (its exit code's key)."""

    def __init__(self, minor: str, message: str) -> None:
        super().__init__(message)
        self.minor = minor

    @property
    def exit_code(self) -> int:
        return PAYLOAD_EXIT[self.minor]


def _positive_int(value: Any) -> Optional[int]:
    try:
        number = int(float(str(value).strip()))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def slot_environment(environ: Mapping[str, str], config: Mapping[str, Any]) -> Dict[str, str]:
    """The job script's environment: the node's, with ``GALAXY_SLOTS`` (the slot's) and ``GALAXY_MEMORY_MB``.

    The slot's core count wins over the request in the bundle: a site may give more than asked for (a whole-node
    slot) and Galaxy's tools should use them, as on Galaxy's own cluster runners.
    """
    env = dict(environ)
    slots = next((n for n in (_positive_int(environ.get(v)) for v in PROCESSOR_VARIABLES) if n), None)
    if not slots and str(environ.get("DIRAC_WHOLENODE", "")).lower() == "true":
        slots = os.cpu_count()
    slots = slots or _positive_int(config.get("processors")) or 1
    env["GALAXY_SLOTS"] = str(slots)
    memory = _positive_int(config.get("memory_mb"))  # DIRAC puts no memory figure in the environment: the request
    if memory:
        env["GALAXY_MEMORY_MB"] = str(memory)
    return env


def rewrite_placeholders(job_dir: str, files: Sequence[str]) -> None:
    """Put the node's job directory where the bundle wrote :data:`PLACEHOLDER` (job script, configs, tool files)."""
    needle, real = PLACEHOLDER.encode(), os.fsencode(job_dir)
    for rel in files:
        path = confined_path(job_dir, rel)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as stream:
            data = stream.read()
        if needle in data:
            mode = os.stat(path).st_mode
            with open(path, "wb") as stream:
                stream.write(data.replace(needle, real))
            os.chmod(path, mode)


def snapshot(root: str) -> Dict[str, Tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every regular file and symlink under ``root``."""
    found: Dict[str, Tuple[int, int]] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def changed_files(root: str, before: Mapping[str, Tuple[int, int]]) -> List[str]:
    """Files under ``root`` created or changed since ``before`` (sorted, relative)."""
    after = snapshot(root)
    return sorted(rel for rel, stat in after.items() if before.get(rel) != stat)


def _die_with_parent() -> None:
    """In the job script's process: die when the payload dies, so a killed payload leaves nothing running."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Payload:
    """One Galaxy job in ``job_dir`` as the bundle's config describes it."""

    def __init__(self, job_dir: str, config: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.job_dir = os.path.realpath(job_dir)
        self.config = dict(config)
        self.environ = environ
        self.transport = str(config.get("transport") or "galaxy")
        if self.transport not in ("galaxy", "sandbox"):
            raise PayloadFailure(PAYLOAD_ERROR, f"unknown transport {self.transport!r}")
        try:
            self.manifest = parse_manifest(config)
        except ManifestError as exc:
            raise PayloadFailure(PAYLOAD_ERROR, f"bad {CONFIG}: {exc}") from None
        self.transfers = Transfers(
            concurrency=int(config.get("staging_concurrency") or 4),
            retries=int(config.get("staging_retries", 5)),
            backoff=Backoff(base=1.0, cap=30.0),
        )
        self._child: Optional[subprocess.Popen] = None
        self.attempt = secrets.token_hex(8)
        for output in self.manifest.outputs:  # this run's own place Galaxy-side (transport galaxy)
            output.fields = {k: str(v).replace(ATTEMPT, self.attempt) for k, v in output.fields.items()}

    def _path(self, rel: str) -> str:
        return confined_path(self.job_dir, rel, create_parents=True)

    def run(self) -> int:
        """Everything, in order; returns the exit code (0, or one of PAYLOAD_EXIT_CODES)."""
        print(f"{ATTEMPT_LINE}{self.attempt}", flush=True)
        rewrite_placeholders(self.job_dir, list(self.config.get("rewrite") or []))
        for folder in ("work", "inputs", "outputs"):
            os.makedirs(os.path.join(self.job_dir, folder), exist_ok=True)
        if self.manifest.inputs:
            log.info("fetching %d inputs from Galaxy", len(self.manifest.inputs))
            try:
                self.transfers.stage_in(self.manifest.inputs, self.job_dir)
            except (StagingError, ManifestError, OSError) as exc:
                raise PayloadFailure(INPUT_STAGING_FAILED, f"input staging from Galaxy failed: {exc}") from None
        work = os.path.join(self.job_dir, "work")
        before = snapshot(work)
        rc = self._run_job_script()
        self._pack_work(work, before)
        self._deliver()
        print(f"{ATTEMPT_LINE}{self.attempt}", flush=True)  # again at the end: the runner reads stdout's tail
        exit_code_file = self.config.get("exit_code_file")
        if exit_code_file and not os.path.isfile(self._path(str(exit_code_file))):
            raise PayloadFailure(
                JOB_SCRIPT_INCOMPLETE,
                f"the Galaxy job script exited with {rc} before writing its exit code file; its stderr ends with:\n"
                + _tail(self._path(self._stream("e"))),
            )
        return 0

    def _stream(self, kind: str) -> str:
        script = str(self.config["job_script"])
        stem = script[:-3] if script.endswith(".sh") else script
        return f"{stem}.{kind}"

    def _run_job_script(self) -> int:
        """Run the Galaxy job script; SIGTERM/SIGINT/SIGHUP to the payload reach it, and it dies with the payload."""
        script = self._path(str(self.config["job_script"]))
        os.chmod(script, os.stat(script).st_mode | 0o700)
        env = slot_environment(self.environ, self.config)
        log.info("running %s with GALAXY_SLOTS=%s", self.config["job_script"], env["GALAXY_SLOTS"])
        with open(self._path(self._stream("o")), "wb") as out, open(self._path(self._stream("e")), "wb") as err:
            self._child = subprocess.Popen(
                ["/bin/sh", script],
                cwd=self.job_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            rc = self._child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("Galaxy job script exited with %d", rc)
        return rc

    def _forward(self, signum: int, _frame: Any) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    def _pack_work(self, work: str, before: Mapping[str, Tuple[int, int]]) -> None:
        """Archive what the job created or changed in Galaxy's working directory (results, metrics, exit code)."""
        pairs = []
        real_work = os.path.realpath(work)
        for rel in changed_files(work, before):
            path = os.path.join(work, rel)
            target = os.path.realpath(path)
            if os.path.islink(path) and not (target == real_work or target.startswith(real_work + os.sep)):
                # A link to an input or elsewhere on the node (tools link their inputs under working/): it means
                # nothing on the Galaxy host, and whatever Galaxy keeps of it the job script has copied already.
                log.info("not sent back: %s links outside the job's working directory", rel)
                continue
            pairs.append((rel, path))
        try:
            create_archive(os.path.join(self.job_dir, WORK_TAR), pairs, "tar", base=work)
        except (ArchiveError, OSError) as exc:
            raise PayloadFailure(PAYLOAD_ERROR, f"cannot pack the job's results: {exc}") from None

    def _extra_files(self) -> List[Tuple[str, str]]:
        """(relative, path) of every regular file the job wrote into its outputs' extra files directories."""
        pairs = []
        for rel in self.config.get("output_dirs") or []:
            root = self._path(str(rel))
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        pairs.append((os.path.relpath(path, self.job_dir), path))
        return pairs

    def _deliver(self) -> None:
        extra = self._extra_files()
        if self.transport == "galaxy":
            try:
                if extra:  # one archive, not one request per file: an html report can have thousands
                    create_archive(os.path.join(self.job_dir, EXTRA_TAR), extra, "tar", base=self.job_dir)
                self.transfers.stage_out(self.manifest.outputs, self.job_dir)
            except ArchiveError as exc:
                raise PayloadFailure(PAYLOAD_ERROR, f"cannot pack the outputs' extra files: {exc}") from None
            except (StagingError, ManifestError, OSError) as exc:
                raise PayloadFailure(OUTPUT_STAGING_FAILED, f"pushing the results to Galaxy failed: {exc}") from None
            return
        pairs = [(WORK_TAR, os.path.join(self.job_dir, WORK_TAR))]
        for rel in self.config.get("output_files") or []:
            path = self._path(str(rel))
            if os.path.isfile(path):
                pairs.append((str(rel), path))
        pairs += extra
        results = os.path.join(self.job_dir, RESULTS)
        try:
            _sha, size = create_archive(results, pairs, "tar", base=self.job_dir)
        except (ArchiveError, OSError) as exc:
            raise PayloadFailure(PAYLOAD_ERROR, f"cannot pack the outputs: {exc}") from None
        limit = _positive_int(self.config.get("max_output_bytes"))
        if limit and size > limit:
            os.unlink(results)
            raise PayloadFailure(
                OUTPUT_SANDBOX_TOO_LARGE,
                f"the job's outputs are {_mb(size)}, over this destination's output sandbox limit of {_mb(limit)} "
                "(output_sandbox_limit); send them through Galaxy instead with transport: galaxy",
            )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as stream:
            stream.seek(max(0, os.path.getsize(path) - size))
            return stream.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def load_config(job_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(job_dir, CONFIG), encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError) as exc:
        raise PayloadFailure(PAYLOAD_ERROR, f"cannot read {CONFIG}: {exc}") from None
    if not isinstance(data, dict) or not data.get("job_script"):
        raise PayloadFailure(PAYLOAD_ERROR, f"{CONFIG} names no job script")
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the job in the current directory; the exit code and stderr are what DIRAC keeps of a failure."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s galaxy-dirac payload: %(message)s")
    job_dir = os.getcwd()
    try:
        return Payload(job_dir, load_config(job_dir), os.environ).run()
    except PayloadFailure as exc:
        log.error("%s: %s", exc.minor, exc)
        print(f"galaxy-dirac: {exc.minor}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - whatever it is, DIRAC must see a failure with a reason
        log.exception("payload error")
        print(f"galaxy-dirac: Galaxy job payload error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return PAYLOAD_EXIT[PAYLOAD_ERROR]
