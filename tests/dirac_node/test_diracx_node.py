"""A DIRAC worker node (DIRAC's real JobWrapper) serving a real DiracX 0.7: jobs submitted to DiracX end Done/Failed
with the output sandbox the JobWrapper built, with access tokens that expire every minute."""

from __future__ import annotations

import hashlib
import io
import pathlib
import shutil
import tarfile
import time
from typing import Dict, Iterator, List

import pytest
import requests

from tests.contract.diracx_server import DiracxServer, diracx_venv, start_diracx_server
from tests.dirac_node.conftest import _unavailable
from tests.dirac_node.diracx_node import DiracxNode, configure_for_dirac_pilots

pytestmark = [pytest.mark.diracx, pytest.mark.dirac, pytest.mark.slow]

JOB_SH = """#!/bin/sh
tr a-z A-Z < input.txt > result.txt
echo "job $JOBID ran with DIRAC_JOB_PROCESSORS=$DIRAC_JOB_PROCESSORS"
exit "${1:-0}"
"""


@pytest.fixture(scope="module")
def short_token_diracx(
    tmp_path_factory: pytest.TempPathFactory, dirac_node_venv: pathlib.Path
) -> Iterator[DiracxServer]:
    """A DiracX of its own whose access tokens live one minute (refresh tokens two)."""
    if shutil.which("git") is None:
        _unavailable("git is needed for DiracX's configuration repository")
    try:
        diracx_venv()
    except Exception as exc:  # noqa: BLE001 - environment problem, see _unavailable
        _unavailable(f"cannot build the DiracX side venv: {exc}")
    server = start_diracx_server(tmp_path_factory.mktemp("diracx-node"), token_minutes=1)
    try:
        configure_for_dirac_pilots(server)
        yield server
    finally:
        server.stop()


def _session(server: DiracxServer) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {server.mint()['access_token']}"
    return session


def _upload(session: requests.Session, url: str, files: Dict[str, str]) -> str:
    """An input sandbox uploaded through DiracX's API; its SB: pfn."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    info = {"checksum_algorithm": "sha256", "checksum": hashlib.sha256(blob).hexdigest(), "size": len(blob),
            "format": "tar.bz2"}
    upload = session.post(f"{url}/api/jobs/sandbox", json=info)
    assert upload.status_code == 200, upload.text
    target = upload.json()
    if target["url"]:
        assert requests.post(target["url"], data=target["fields"], files={"file": ("isb.tar.bz2", blob)}).ok
    return target["pfn"]


def _submit(session: requests.Session, url: str, pfn: str, exit_codes: List[int]) -> List[int]:
    jdls = [
        f'Executable = "job.sh"; Arguments = "{code}"; JobName = "node-{code}-{time.time_ns()}"; '
        f'StdOutput = "std.out"; StdError = "std.err"; NumberOfProcessors = 2; '
        f'InputSandbox = {{"{pfn}"}}; OutputSandbox = {{"std.out", "result.txt"}};'
        for code in exit_codes
    ]
    response = session.post(f"{url}/api/jobs/jdl", json=jdls)
    assert response.status_code == 201, response.text
    return [job["JobID"] for job in response.json()]


def _job(session: requests.Session, url: str, job_id: int) -> Dict[str, object]:
    response = session.post(
        f"{url}/api/jobs/search",
        json={"parameters": ["JobID", "Status", "MinorStatus"],
              "search": [{"parameter": "JobID", "operator": "eq", "value": job_id}]},
    )
    assert response.status_code == 200, response.text
    return response.json()[0]


def _output(session: requests.Session, url: str, job_id: int) -> Dict[str, bytes]:
    """The job's output sandbox as DiracX serves it to the runner: member name -> content."""
    (pfn,) = session.get(f"{url}/api/jobs/{job_id}/sandbox/output").json()
    link = session.get(f"{url}/api/jobs/sandbox", params={"pfn": f"SB:SandboxSE|{pfn}"})
    assert link.status_code == 200, link.text
    with tarfile.open(fileobj=io.BytesIO(requests.get(link.json()["url"]).content)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_node_runs_waiting_jobs_and_reports_to_diracx(short_token_diracx: DiracxServer, tmp_path: pathlib.Path) -> None:
    server = short_token_diracx
    session = _session(server)
    pfn = _upload(session, server.url, {"job.sh": JOB_SH, "input.txt": "through diracx\n"})
    ok, failing = _submit(session, server.url, pfn, [0, 5])
    assert _job(session, server.url, ok)["Status"] == "Received"  # DiracX 0.7 has no optimizers

    assert server.credentials["expires_in"] == 60  # this DiracX's access tokens live one minute

    node = DiracxNode(server, tmp_path / "node")
    ran = {job.job_id: job for job in node.run_pending()}
    assert set(ran) == {ok, failing}

    session = _session(server)
    assert _job(session, server.url, ok)["Status"] == "Done"
    assert _job(session, server.url, ok)["MinorStatus"] == "Execution Complete"
    outputs = _output(session, server.url, ok)
    assert outputs["result.txt"] == b"THROUGH DIRACX\n"
    assert f"job {ok} ran with DIRAC_JOB_PROCESSORS=2".encode() in outputs["std.out"]

    assert ran[failing].run.payload_exit_code == 5
    assert _job(session, server.url, failing)["Status"] == "Failed"
    assert _job(session, server.url, failing)["MinorStatus"] == "Application Finished With Errors"
    assert _output(session, server.url, failing)["result.txt"] == b"THROUGH DIRACX\n"
    assert node.pending() == []


def test_background_node_picks_up_jobs_submitted_later(
    short_token_diracx: DiracxServer, tmp_path: pathlib.Path
) -> None:
    server = short_token_diracx
    with DiracxNode(server, tmp_path / "node") as node:
        session = _session(server)
        pfn = _upload(session, server.url, {"job.sh": JOB_SH, "input.txt": "later\n"})
        (job_id,) = _submit(session, server.url, pfn, [0])
        deadline = time.monotonic() + 120
        while _job(session, server.url, job_id)["Status"] != "Done" and time.monotonic() < deadline:
            time.sleep(1)
    assert node.errors == []
    assert _job(session, server.url, job_id)["Status"] == "Done"
    assert _output(session, server.url, job_id)["result.txt"] == b"LATER\n"
