"""The runner in a real Galaxy: real scheduler, real pilot processes, tools and workflows through Galaxy's API.

One Galaxy server, one scheduler and one pilot process for the whole module (they are slow to start on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.conftest import WMSServer, wait_for
from tests.galaxy_server import ADMIN_KEY, GalaxyServer

pytestmark = pytest.mark.galaxy

TIMINGS: Dict[str, float] = {}


class Pilot:
    """A real pilot process (``python -m galaxy_dirac.pilot``) serving Local.test (or ``site``; ``env`` added)."""

    def __init__(
        self,
        wms: WMSServer,
        token: str,
        workdir: Path,
        processors: int = 2,
        site: str = "Local.test",
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "pilot.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "galaxy_dirac.pilot",
                "--url",
                wms.url,
                "--token",
                token,
                "--site",
                site,
                "--processors",
                str(processors),
                "--heartbeat-interval",
                "1",
                "--max-empty-matches",
                "100000",
                "--max-idle",
                "900",
                "--idle-backoff",
                "0.2",
                "--idle-backoff-max",
                "0.5",
                "--workdir",
                str(workdir),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    home = tmp_path_factory.mktemp("galaxy-stack")
    wms = WMSServer(home / "wms", maintenance_interval=1).start()
    token_file = home / "runner.token"
    token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
    reader = wms.token("admin")
    pilot_token = wms.token("pilot")
    started = time.monotonic()
    galaxy = GalaxyServer(
        home / "galaxy",
        env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)},
    )
    TIMINGS["galaxy_venv"] = time.monotonic() - started
    pilots: List[Pilot] = []
    try:
        galaxy.start()
        TIMINGS["galaxy_startup"] = galaxy.startup_seconds[-1]
        pilots.append(Pilot(wms, pilot_token, home / "pilot-1"))
        yield {
            "wms": wms,
            "galaxy": galaxy,
            "pilots": pilots,
            "pilot_token": pilot_token,
            "admin": reader,
            "home": home,
        }
    finally:
        for pilot in pilots:
            pilot.stop()
        galaxy.stop()
        wms.stop()
        sys.stderr.write(f"\ngalaxy stack timings: {TIMINGS}\n")


def _dirac_jobs(stack: Dict[str, Any]) -> List[Dict[str, Any]]:
    import requests

    wms = stack["wms"]
    response = requests.post(
        f"{wms.url}/api/jobs/search",
        params={"per_page": 1000},
        json={"parameters": ["JobID", "JobName", "Status", "MinorStatus"]},
        headers={"Authorization": f"Bearer {stack['admin']}"},
    )
    assert response.status_code in (200, 206), response.text
    return response.json()


def _output(job: Dict[str, Any], name: str) -> str:
    return job["outputs"][name]["id"]


def test_single_tool_galaxy_transport(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("single")
    first = galaxy.upload(history, "alpha\nbeta\n")
    second = galaxy.upload(history, "gamma\n")
    started = time.monotonic()
    run = galaxy.run_tool(
        history, "gd_cat", {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
    )
    job_id = run["jobs"][0]["id"]
    job = galaxy.wait_job(job_id)
    TIMINGS["gd_cat_submit_to_ok"] = time.monotonic() - started
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(_output(job, "out_file1")) == "alpha\nbeta\ngamma\n"
    assert (
        galaxy.content(_output(job, "extra")).strip() == "slots=1"
    )  # the JDL asks for one processor: GALAXY_SLOTS comes from the pilot
    assert galaxy.wait_dataset(_output(job, "out_file1"))["state"] == "ok"
    # DIRAC metrics have no Galaxy plugin, so Galaxy shows them to admins only.
    admin = {"x-api-key": ADMIN_KEY}
    metrics = {(m["plugin"], m["name"]): m for m in galaxy.api("GET", f"jobs/{job_id}/metrics", headers=admin)}
    assert ("core", "runtime_seconds") in metrics, metrics
    assert ("core", "galaxy_slots") in metrics
    assert ("dirac", "site") in metrics and metrics[("dirac", "site")]["raw_value"] == "Local.test"
    assert ("dirac", "dirac_job_id") in metrics
    # CPU and peak memory from the job's heartbeats (the wrapper sends a final one when the payload ends).
    assert ("dirac", "cpu_seconds") in metrics and ("dirac", "max_memory_mb") in metrics, metrics
    dirac_id = int(float(metrics[("dirac", "dirac_job_id")]["raw_value"]))
    assert job["external_id"] == str(dirac_id)


def test_single_tool_sandbox_transport(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("sandbox")
    first = galaxy.upload(history, "one\n")
    second = galaxy.upload(history, "two\n")
    run = galaxy.run_tool(
        history, "gd_cat_sandbox", {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
    )
    job = galaxy.wait_job(run["jobs"][0]["id"])
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    assert galaxy.content(_output(job, "out_file1")) == "one\ntwo\n"
    assert (
        galaxy.content(_output(job, "extra")).strip() == "slots=1"
    )  # the JDL asks for one processor: GALAXY_SLOTS comes from the pilot


def test_failing_tool_reports_stderr(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("fail")
    data = galaxy.upload(history, "x\n")
    run = galaxy.run_tool(history, "gd_fail", {"input1": {"src": "hda", "id": data}})
    job = galaxy.wait_job(run["jobs"][0]["id"])
    assert job["state"] == "error"
    assert "something went wrong on purpose" in (job.get("tool_stderr") or job.get("stderr") or "")
    assert job["exit_code"] == 3


def test_kill_from_galaxy(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("kill")
    data = galaxy.upload(history, "x\n")
    run = galaxy.run_tool(history, "gd_sleep", {"input1": {"src": "hda", "id": data}, "seconds": 300})
    job_id = run["jobs"][0]["id"]
    galaxy.wait_job(job_id, states=("running",), timeout=120)
    external_id = galaxy.job(job_id)["external_id"]
    galaxy.api("DELETE", f"jobs/{job_id}")
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = {row["JobID"]: row["Status"] for row in _dirac_jobs(stack)}.get(int(external_id))
        if status == "Killed":
            break
        time.sleep(0.5)
    assert status == "Killed"
    assert galaxy.job(job_id, full=False)["state"] in ("deleted", "deleting", "deleted_new")


WORKFLOW = {
    "class": "GalaxyWorkflow",
    "name": "galaxy-dirac split and merge",
    "inputs": {"text": "data"},
    "outputs": {"merged": {"outputSource": "merge/out_file1"}},
    "steps": {
        "split": {"tool_id": "gd_split", "in": {"input1": "text"}},
        "merge": {"tool_id": "gd_collection_cat", "in": {"inputs": "split/parts"}},
    },
}


def test_workflow_with_collection(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("workflow")
    data = galaxy.upload(history, "l1\nl2\nl3\n")
    workflow = galaxy.api("POST", "workflows", json={"workflow": WORKFLOW})
    invocation = galaxy.api(
        "POST",
        f"workflows/{workflow['id']}/invocations",
        json={"history_id": history, "inputs": {"text": {"src": "hda", "id": data}}, "inputs_by": "name"},
    )
    merged = galaxy.wait_invocation_output(invocation["id"], "merged", timeout=240)
    assert galaxy.wait_dataset(merged["id"])["state"] == "ok"
    assert galaxy.content(merged["id"]) == "l1\nl2\nl3\n"
    jobs = galaxy.api("GET", f"invocations/{invocation['id']}/jobs_summary")
    assert jobs["states"] == {"ok": 2}, jobs


def test_restart_recovers_queued_and_running_jobs(stack: Dict[str, Any]) -> None:
    galaxy: GalaxyServer = stack["galaxy"]
    history = galaxy.new_history("restart")
    data = galaxy.upload(history, "restart\n")
    before = len(_dirac_jobs(stack))
    job_ids = [
        galaxy.run_tool(history, "gd_sleep", {"input1": {"src": "hda", "id": data}, "seconds": 12})["jobs"][0]["id"]
        for _ in range(3)
    ]
    # The pilot has 2 processors: two jobs run, the third stays queued in DIRAC.
    galaxy.wait_job(job_ids[0], states=("running",), timeout=120)

    def running_and_queued() -> List[str]:
        # Galaxy's handler dispatches the three jobs one by one: wait until none is still "new".
        states = [galaxy.job(j, full=False)["state"] for j in job_ids]
        return states if "running" in states and "queued" in states and "new" not in states else []

    wait_for(running_and_queued, 60, "two jobs running and one queued")
    galaxy.kill_hard()
    time.sleep(2)
    galaxy.start()
    TIMINGS["galaxy_restart"] = galaxy.startup_seconds[-1]
    for job_id in job_ids:
        job = galaxy.wait_job(job_id, timeout=240)
        assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
        assert galaxy.content(_output(job, "out_file1")) == "restart\n"
    after = _dirac_jobs(stack)
    assert len(after) - before == 3, after[before:]
    assert len({galaxy.job(j)["external_id"] for j in job_ids}) == 3
