"""Run a job the way a real DIRAC 9 worker node does: DIRAC's own JobAgent steps and JobWrapper, from a side venv.

The Galaxy job bundle must work on any DIRAC installation's pilots, not only on ours. `run_under_dirac` hands a
JDL and its input sandbox archive(s) to DIRAC 9.1.22's real worker-node code (tests/dirac_node/harness, run in
the `dirac` side venv; DIRAC is GPL and never enters our package) and returns what the node reported. Only the
transport is replaced: service RPCs are recorded instead of sent, `SB:` pfns resolve to local archives, and
the output sandbox tar that DIRAC builds is kept. Findings about what DIRAC does are in README.md here.
Stdlib only.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from tests.sidevenvs import ensure_known, venv_python

HARNESS = pathlib.Path(__file__).resolve().parent / "harness"
#: What the test node calls itself (DIRAC.siteName(), the CE of the slot).
SITE = "DIRAC.GalaxyTest.local"


def dirac_venv() -> pathlib.Path:
    """The DIRAC 9.1.22 side venv (built on first use)."""
    return ensure_known("dirac")


@dataclass
class DiracRun:
    """What a DIRAC node reported for one job, and what it produced."""

    job_id: int
    node_dir: pathlib.Path
    state_dir: pathlib.Path
    #: Status updates in the order the JobWrapper/JobAgent sent them: {time, Status?, MinorStatus?,
    #: ApplicationStatus?, Source} (only the keys DIRAC sent).
    statuses: List[Dict[str, str]]
    #: Job parameters the node set, name -> last value.
    parameters: Dict[str, Any]
    #: Every service call the node made: {service, method, args}.
    rpc_calls: List[Dict[str, Any]]
    #: The payload's exit code as the JobWrapper saw it (None if the payload never ran).
    payload_exit_code: Optional[int]
    #: Exit code of DIRAC's job wrapper process (JobWrapperTemplate): 0 ok, 1 init, 2 outputs, ...
    wrapper_exit_code: Optional[int]
    #: The output sandbox archive DIRAC uploaded (None if it uploaded none).
    output_sandbox: Optional[pathlib.Path]
    #: The payload's StdOutput / StdError files as DIRAC wrote them in the job directory.
    stdout: str
    stderr: str
    #: The JDL as the node received it (JobDB-prepared).
    jdl: str
    #: DIRAC's own log of the node (JobAgent side + job wrapper).
    log: str
    error: str = ""
    events: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def final_status(self) -> str:
        """The last major status reported."""
        return next((s["Status"] for s in reversed(self.statuses) if s.get("Status")), "")

    @property
    def final_minor_status(self) -> str:
        """The last minor status reported (DIRAC keeps the previous one when an update carries none)."""
        return next((s["MinorStatus"] for s in reversed(self.statuses) if s.get("MinorStatus")), "")

    @property
    def rescheduled(self) -> bool:
        """Whether the node asked the JobManager to reschedule the job."""
        return any(call["method"] == "rescheduleJob" for call in self.rpc_calls)

    def output_members(self) -> List[str]:
        """Member names of the output sandbox archive."""
        if self.output_sandbox is None:
            return []
        with tarfile.open(self.output_sandbox) as tar:
            return tar.getnames()

    def output_file(self, name: str) -> bytes:
        """One member of the output sandbox archive."""
        assert self.output_sandbox is not None, "no output sandbox was uploaded"
        with tarfile.open(self.output_sandbox) as tar:
            member = tar.extractfile(name)
            assert member is not None, f"{name} is not a file in the output sandbox"
            return member.read()


def node_environment(node_dir: pathlib.Path, venv: pathlib.Path, extra: Optional[Mapping[str, str]] = None) -> dict:
    """A pilot's environment, nothing of ours: DIRAC's Python first on PATH (as DIRACOS is), HOME/TMPDIR inside
    the node directory. No GALAXY_*, PYTHONPATH, VIRTUAL_ENV or proxy settings leak from the test process."""
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(node_dir / "home"),
        "TMPDIR": str(node_dir / "tmp"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def run_under_dirac(
    jdl_text: str,
    sandboxes: Mapping[str, Union[str, os.PathLike]],
    workdir: Union[str, os.PathLike],
    job_id: int,
    *,
    env: Optional[Mapping[str, str]] = None,
    output_sandbox_limit: Optional[int] = None,
    processors: int = 1,
    max_ram_mb: int = 4096,
    owner: str = "alice",
    owner_group: str = "galaxy_user",
    vo: str = "galaxy",
    keep_job_dir: bool = False,
    watchdog_polling_seconds: int = 2,
    timeout: float = 600.0,
) -> DiracRun:
    """Run one job through DIRAC's JobAgent steps and real JobWrapper in `workdir` (the node's directory).

    `sandboxes` maps each `SB:<SE>|<pfn>` of the JDL's InputSandbox to a local archive. A JDL without JobID is
    first prepared as DIRAC's JobDB does at submission (with `owner`, `owner_group`, `vo`). `processors` and
    `max_ram_mb` describe the slot; `output_sandbox_limit` (bytes) overrides DIRAC's default (10 MiB) through
    the JobWrapper's OutputSandboxLimit option; `keep_job_dir` turns DIRAC's clean-up of the job directory off.
    """
    venv = dirac_venv()
    node = pathlib.Path(workdir).resolve()
    state = node / "harness-state"
    for directory in (node, node / "home", node / "tmp", state):
        directory.mkdir(parents=True, exist_ok=True)
    request = {
        "jdl": jdl_text,
        "job_id": int(job_id),
        "sandboxes": {pfn: str(pathlib.Path(path).resolve()) for pfn, path in sandboxes.items()},
        "owner": owner,
        "owner_group": owner_group,
        "vo": vo,
        "site": SITE,
        "grid_ce": "node.galaxytest.local",
        "queue": "default",
        "pilot_reference": f"galaxy-dirac-test-node-{job_id}",
        "processors": int(processors),
        "max_ram_mb": int(max_ram_mb),
        "cpu_time": 86400,
        "output_sandbox_limit": output_sandbox_limit,
        "keep_job_dir": keep_job_dir,
        "watchdog_polling_seconds": watchdog_polling_seconds,
        "log_level": "INFO",
    }
    (state / "request.json").write_text(json.dumps(request))
    (state / "rpc.jsonl").unlink(missing_ok=True)
    log_path = state / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [str(venv_python(venv)), str(HARNESS / "jobagent.py"), str(state)],
            cwd=str(node),
            env=node_environment(node, venv, env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,
        )
    log_text = log_path.read_text(errors="replace")
    result_path = state / "result.json"
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"the DIRAC node harness failed ({proc.returncode}):\n{log_text[-6000:]}")
    return _collect(int(job_id), node, state, log_text)


def _collect(job_id: int, node: pathlib.Path, state: pathlib.Path, log_text: str) -> DiracRun:
    """Turn the harness's state directory into a DiracRun."""
    events = [json.loads(line) for line in (state / "rpc.jsonl").read_text().splitlines() if line.strip()] if (
        state / "rpc.jsonl"
    ).exists() else []
    rpc_calls = [e for e in events if e["kind"] == "rpc"]
    statuses: List[Dict[str, str]] = []
    parameters: Dict[str, Any] = {}
    for call in rpc_calls:
        if call["method"] == "setJobStatusBulk":
            for stamp, update in sorted(call["args"][1].items()):
                statuses.append({"time": stamp, **update})
        elif call["method"] == "setJobParameters":
            parameters.update({name: value for name, value in call["args"][1]})
        elif call["method"] == "setJobParameter":
            parameters[call["args"][1]] = call["args"][2]
    uploads = [e for e in events if e["kind"] == "sandbox_upload"]
    output = state / "output_sandbox" / uploads[-1]["name"] if uploads else None
    payload = json.loads((state / "payload.json").read_text()) if (state / "payload.json").exists() else {}
    result = json.loads((state / "result.json").read_text())

    def text(name: str) -> str:
        path = state / name
        return path.read_text(errors="replace") if path.exists() else ""

    return DiracRun(
        job_id=job_id,
        node_dir=node,
        state_dir=state,
        statuses=statuses,
        parameters=parameters,
        rpc_calls=rpc_calls,
        payload_exit_code=payload.get("exit_code"),
        wrapper_exit_code=result.get("wrapper_exit_code"),
        output_sandbox=output,
        stdout=text("payload.stdout"),
        stderr=text("payload.stderr"),
        jdl=text("matched.jdl"),
        log=log_text,
        error=result.get("error", ""),
        events=events,
    )
