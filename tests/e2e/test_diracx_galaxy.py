"""End to end on real DIRAC software: a Galaxy workflow through DiracJobRunner → DiracX 0.7 → DIRAC's JobWrapper.

Galaxy's runner submits to a real DiracX (access tokens of one minute, a diracx-client credentials file that the
runner refreshes), and a test-side DIRAC worker node (tests/dirac_node) runs each waiting job under DIRAC 9.1.22's
own JobWrapper in its own directory, with only what DIRAC sets in the environment, then reports back through
DiracX's API. The workflow's output must be right: nothing of our pilot is involved, only the job bundle's own
payload.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import requests
import yaml

from tests.contract.diracx_server import DiracxServer, diracx_venv, start_diracx_server
from tests.contract.test_diracx_login import login
from tests.dirac_node import dirac_venv
from tests.dirac_node.conftest import _unavailable
from tests.dirac_node.diracx_node import DiracxNode, configure_for_dirac_pilots
from tests.galaxy_server import GalaxyServer

pytestmark = [pytest.mark.e2e, pytest.mark.galaxy, pytest.mark.diracx, pytest.mark.dirac, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "workflows" / "split-count-merge.gxwf.yml"
DATA = ROOT / "examples" / "data" / "poem.txt"


@pytest.fixture(scope="module")
def dirac_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """DiracX (one-minute access tokens), Galaxy pointed at it with a credentials file, and a DIRAC node."""
    if not (ROOT / "galaxy_dirac" / "payload").is_dir():
        pytest.skip("galaxy_dirac/payload (the job's own staging) is not there yet")
    if shutil.which("git") is None:
        _unavailable("git is needed for DiracX's configuration repository")
    for name, build in (("DiracX", diracx_venv), ("DIRAC", dirac_venv)):
        try:
            build()
        except Exception as exc:  # noqa: BLE001 - environment problem, see _unavailable
            _unavailable(f"cannot build the {name} side venv: {exc}")
    home = tmp_path_factory.mktemp("diracx-galaxy")
    server = start_diracx_server(home / "diracx", token_minutes=1, refresh_minutes=60, with_idp=True)
    galaxy = node = None
    try:
        configure_for_dirac_pilots(server)
        credentials = home / "diracx-credentials.json"
        login(server, credentials)  # a real device-flow login: its refresh tokens rotate
        initial = json.loads(credentials.read_text())
        written_at = time.monotonic()
        galaxy = GalaxyServer(
            home / "galaxy",
            env={
                "GALAXY_DIRAC_SCHEDULER_URL": server.url,
                "GALAXY_DIRAC_CREDENTIALS_FILE": str(credentials),
                "GALAXY_DIRAC_LOGIN_RETRY_INTERVAL": "3",
            },
        )
        galaxy.start()
        node = DiracxNode(server, home / "node").start(interval=1.0)
        yield {"diracx": server, "galaxy": galaxy, "node": node, "credentials": credentials, "initial": initial,
               "written_at": written_at}
    finally:
        if node is not None:
            node.stop()
        if galaxy is not None:
            galaxy.stop()
        server.stop()


def _dirac_jobs(server: DiracxServer) -> Dict[int, Dict[str, Any]]:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {server.mint()['access_token']}"
    response = session.post(
        f"{server.url}/api/jobs/search", json={"parameters": ["JobID", "JobName", "Status", "MinorStatus"]}
    )
    response.raise_for_status()
    return {row["JobID"]: row for row in response.json()}


def test_workflow_runs_on_dirac_jobwrapper_through_diracx(dirac_stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = dirac_stack["galaxy"]
    node: DiracxNode = dirac_stack["node"]
    history = galaxy.new_history("diracx + DIRAC JobWrapper")
    data = galaxy.upload(history, DATA.read_text(), name=DATA.name)
    galaxy.wait_dataset(data)
    workflow = galaxy.api("POST", "workflows", json={"workflow": yaml.safe_load(WORKFLOW.read_text())})
    started = time.monotonic()
    invocation = galaxy.api(
        "POST",
        f"workflows/{workflow['id']}/invocations",
        json={"history_id": history, "inputs": {"text": {"src": "hda", "id": data}}, "inputs_by": "name"},
    )
    merged = galaxy.wait_invocation_output(invocation["id"], "merged", timeout=1200)
    wall = time.monotonic() - started

    jobs = galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "view": "collection"})
    states = {job["id"]: job["state"] for job in jobs}
    runs = {done.job_id: done.run for done in node.done}
    details = "\n".join(
        f"DIRAC job {job_id}: {run.final_status}/{run.final_minor_status} exit={run.payload_exit_code}\n"
        f"{run.stderr[-1500:]}"
        for job_id, run in runs.items()
    )
    assert set(states.values()) == {"ok"}, f"{states}\nnode errors: {node.errors}\n{details}\n{galaxy.log_tail()}"
    content = galaxy.content(merged["id"])
    expected = len(DATA.read_text().split())
    assert sum(int(line.split()[-1]) for line in content.splitlines() if line.split()) == expected, content
    assert node.errors == []

    # Every Galaxy job went through DIRAC's JobWrapper on the node and ended Done in DiracX.
    dirac = _dirac_jobs(dirac_stack["diracx"])
    galaxy_ids = {galaxy.job(job["id"], full=False).get("external_id") for job in jobs}
    assert {str(job_id) for job_id in runs} >= {str(i) for i in galaxy_ids}
    for job_id in runs:
        assert dirac[job_id]["Status"] == "Done", (dirac[job_id], details)
    # The access token written before Galaxy started has long expired: the runner refreshed (and stored) the login.
    assert time.monotonic() - dirac_stack["written_at"] > 60
    stored = json.loads(dirac_stack["credentials"].read_text())
    assert stored["access_token"] != dirac_stack["initial"]["access_token"]
    assert stored["refresh_token"] != dirac_stack["initial"]["refresh_token"]  # rotated, and the rotation stored
    print(f"workflow on DIRAC's JobWrapper through DiracX: {wall:.1f} s, {len(runs)} DIRAC jobs")


def test_restarted_galaxy_reuses_the_stored_login_and_sandbox_transport_works(dirac_stack: Dict[str, Any]) -> None:
    """After a restart the runner carries on with the (rotated) login in the file; transport sandbox on DIRAC."""
    galaxy: GalaxyServer = dirac_stack["galaxy"]
    node: DiracxNode = dirac_stack["node"]
    before = json.loads(dirac_stack["credentials"].read_text())
    galaxy.stop()
    time.sleep(61)  # the stored access token expires while Galaxy is down
    galaxy.start()
    history = galaxy.new_history("after restart")
    first = galaxy.upload(history, "one\n")
    second = galaxy.upload(history, "two\n")
    ran_before = len(node.done)
    run = galaxy.run_tool(
        history, "gd_cat_sandbox", {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
    )
    job = galaxy.wait_job(run["jobs"][0]["id"], timeout=300)
    new_runs = node.done[ran_before:]
    details = "\n".join(f"{d.job_id}: {d.run.final_status} {d.run.stderr[-1500:]}" for d in new_runs)
    assert job["state"] == "ok", f"{job}\nnode errors: {node.errors}\n{details}\n{galaxy.log_tail()}"
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == "one\ntwo\n"
    assert len(new_runs) == 1 and new_runs[0].run.final_status == "Done"
    # The sandbox transport's results came back in DIRAC's own output sandbox archive.
    assert "galaxy_dirac_results.tar" in new_runs[0].run.output_members()
    after = json.loads(dirac_stack["credentials"].read_text())
    assert after["refresh_token"] != before["refresh_token"]  # the restarted runner refreshed the stored login


def test_a_lapsed_login_holds_jobs_queued_until_a_new_login(dirac_stack: Dict[str, Any]) -> None:
    """A login that can no longer be refreshed fails nothing: the job waits, says why, and runs after a new login."""
    galaxy: GalaxyServer = dirac_stack["galaxy"]
    node: DiracxNode = dirac_stack["node"]
    credentials: Path = dirac_stack["credentials"]
    lapsed = json.loads(credentials.read_text())
    lapsed.update(expires_on=int(time.time()) - 5, refresh_token="a-refresh-token-diracx-never-issued")
    tmp = credentials.with_suffix(".tmp")
    tmp.write_text(json.dumps(lapsed))
    tmp.replace(credentials)
    ran_before = len(node.done)
    history = galaxy.new_history("lapsed login")
    first = galaxy.upload(history, "held\n")  # Galaxy's own upload runs locally
    galaxy.wait_dataset(first)
    run = galaxy.run_tool(
        history, "gd_cat", {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": first}}
    )
    job_id, output = run["jobs"][0]["id"], run["outputs"][0]["id"]
    deadline = time.monotonic() + 120
    info = ""
    while time.monotonic() < deadline and "Waiting for a DIRAC login" not in info:
        time.sleep(1)
        info = str(galaxy.api("GET", f"datasets/{output}").get("misc_info") or "")  # what the user sees
    assert "Waiting for a DIRAC login" in info and "galaxy-dirac login" in info, f"{info!r}\n{galaxy.log_tail()}"
    time.sleep(8)  # several retries later: still held, nothing submitted, nothing failed
    assert galaxy.job(job_id, full=False)["state"] == "queued"
    assert len(node.done) == ran_before
    assert "DIRAC login lapsed" in galaxy.log_tail(20000)

    login(dirac_stack["diracx"], credentials)  # the admin logs in again; no restart
    job = galaxy.wait_job(job_id, timeout=300)
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(job["outputs"]["out_file1"]["id"]) == "held\nheld\n"  # the same dataset twice, once staged
    assert len(node.done) == ran_before + 1
