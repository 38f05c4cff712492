"""Runs INSIDE the DIRAC side venv: the only parts of a DIRAC worker node that the harness replaces.

A real node talks to DIRAC services (JobStateUpdate, JobManager, JobMonitoring, ReqManager, Accounting) over
DIPS/HTTPS and moves sandboxes through the SandboxStore and a StorageElement. Here:

- every service RPC made through `DIRAC.Core.Base.Client.Client` is recorded (one JSON line per call in
  ``<state>/rpc.jsonl``) and answered OK, so status reports are captured instead of sent;
- the input sandbox StorageElement copies the local archive mapped to the ``SB:`` pfn (DIRAC itself then
  unpacks it, as on a node);
- the output sandbox TransferClient keeps the tar that DIRAC built (after its own OutputSandbox resolution,
  directory tarring and size-limit check) in ``<state>/output_sandbox/``.

Nothing else of DIRAC is changed. The state directory comes from the command line, never from the environment,
so nothing of the harness reaches the payload's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Dict

_LOCK = threading.Lock()


class State:
    """Where the harness keeps what it captured, shared by the JobAgent-side and the wrapper process."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.request: Dict[str, Any] = json.loads((self.dir / "request.json").read_text())

    def record(self, kind: str, **data: Any) -> None:
        """Append one event; several processes append to the same file, one line each."""
        line = json.dumps({"kind": kind, "pid": os.getpid(), "time": time.time(), **data}, default=str)
        with _LOCK, open(self.dir / "rpc.jsonl", "a") as fh:
            fh.write(line + "\n")

    def events(self) -> list:
        path = self.dir / "rpc.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last_status(self) -> str:
        """The job's major status as the WMS would have it after the calls recorded so far."""
        status = ""
        updates = []
        for event in self.events():
            if event["kind"] == "rpc" and event["method"] == "setJobStatusBulk":
                updates.extend(sorted(event["args"][1].items()))
        for _, update in sorted(updates, key=lambda item: item[0]):
            status = update.get("Status", status)
        return status


def install(state: State) -> None:
    """Replace DIRAC's service transport and sandbox storage by the recording/local versions."""
    from DIRAC import S_OK
    from DIRAC.Core.Base import Client as client_module
    from DIRAC.WorkloadManagementSystem.Client import SandboxStoreClient as sbclient_module

    class RecordingRPC:
        """Stands for the RPC client of one service URL: records each call, answers like a healthy service."""

        def __init__(self, url: str) -> None:
            self.url = url

        def __getattr__(self, method: str):
            def call(*args: Any) -> Dict[str, Any]:
                state.record("rpc", service=str(self.url), method=method, args=list(args))
                if method == "getJobsStatus":
                    job_ids = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
                    return S_OK({int(job): {"Status": state.last_status()} for job in job_ids})
                if method in ("getJobParameter", "getJobParameters"):
                    return S_OK({})
                if method == "putRequest":
                    return S_OK(1)
                return S_OK()

            return call

    def _get_rpc(self, rpc=None, url="", timeout=None):  # noqa: ARG001 - same signature as Client._getRPC
        return rpc or RecordingRPC(url or self.serverURL)

    client_module.Client._getRPC = _get_rpc

    sandboxes: Dict[str, str] = state.request.get("sandboxes", {})

    class LocalSandboxSE:
        """A StorageElement whose files are the local archives mapped to `SB:<SE>|<pfn>` in the request."""

        def __init__(self, name: str, vo: Any = None, **_: Any) -> None:
            self.name = name

        def getFile(self, pfn: str, localPath: str = "", **_: Any) -> Dict[str, Any]:  # noqa: N802 - DIRAC API
            source = sandboxes.get(f"SB:{self.name}|{pfn}")
            state.record("sandbox_download", se=self.name, pfn=pfn, source=source)
            if not source or not os.path.isfile(source):
                return S_OK({"Successful": {}, "Failed": {pfn: "No such sandbox in this test node"}})
            target = os.path.join(localPath or os.getcwd(), os.path.basename(pfn))
            shutil.copyfile(source, target)
            return S_OK({"Successful": {pfn: os.path.getsize(target)}, "Failed": {}})

    class CapturingTransferClient:
        """The SandboxStore upload: keeps the archive DIRAC built and answers with a sandbox pfn."""

        def __init__(self, service: str, **_: Any) -> None:
            self.service = service

        def sendFile(self, path: str, params: Any) -> Dict[str, Any]:  # noqa: N802 - DIRAC API
            name, assign_to = params
            out = state.dir / "output_sandbox"
            out.mkdir(exist_ok=True)
            shutil.copyfile(path, out / name)
            pfn = f"SB:ProductionSandboxSE|/SandBox/node/{name}"
            state.record("sandbox_upload", name=name, size=os.path.getsize(path), assign_to=assign_to, pfn=pfn)
            return S_OK(pfn)

    if not callable(getattr(sbclient_module, "StorageElement", None)):
        raise RuntimeError("DIRAC's SandboxStoreClient no longer uses StorageElement: update the harness")
    sbclient_module.StorageElement = LocalSandboxSE
    sbclient_module.TransferClient = CapturingTransferClient
