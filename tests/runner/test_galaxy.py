"""The runner in a real Galaxy: real scheduler, real pilot processes, tools and workflows through Galaxy's API.

One Galaxy server, one scheduler and one pilot process for the whole module (they are slow to start on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.conftest import wait_for
from tests.galaxy_server import ADMIN_KEY, GalaxyServer
from tests.galaxy_stack import GalaxyStack, galaxy_stack

pytestmark = pytest.mark.galaxy

TIMINGS: Dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GalaxyStack]:
    started = time.monotonic()
    with galaxy_stack(tmp_path_factory.mktemp("galaxy-stack")) as stack:
        TIMINGS["galaxy_startup"] = stack.galaxy.startup_seconds[-1]
        stack.add_pilot("pilot-1")
        yield stack
    TIMINGS["stack"] = time.monotonic() - started
    sys.stderr.write(f"\ngalaxy stack timings: {TIMINGS}\n")


def _output(job: Dict[str, Any], name: str) -> str:
    return job["outputs"][name]["id"]


def test_single_tool_galaxy_transport(stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = stack.galaxy
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


def test_single_tool_sandbox_transport(stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = stack.galaxy
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


def test_failing_tool_reports_stderr(stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = stack.galaxy
    history = galaxy.new_history("fail")
    data = galaxy.upload(history, "x\n")
    run = galaxy.run_tool(history, "gd_fail", {"input1": {"src": "hda", "id": data}})
    job = galaxy.wait_job(run["jobs"][0]["id"])
    assert job["state"] == "error"
    assert "something went wrong on purpose" in (job.get("tool_stderr") or job.get("stderr") or "")
    assert job["exit_code"] == 3


def _tool_processes(*argv: str) -> List[int]:
    """PIDs of processes on this machine whose command line is exactly ``argv`` (the pilot runs on it too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_kill_from_galaxy(stack: GalaxyStack) -> None:
    """A job deleted in Galaxy while its tool runs is Killed in DIRAC and its process is gone.

    Deleted while its inputs are still being fetched, a job fails instead (Galaxy's job files API refuses a finished
    job, and the kill finds it Failed): the test waits for the tool's own process, not for Galaxy's "running"."""
    galaxy: GalaxyServer = stack.galaxy
    history = galaxy.new_history("kill")
    data = galaxy.upload(history, "x\n")
    run = galaxy.run_tool(history, "gd_sleep", {"input1": {"src": "hda", "id": data}, "seconds": 299})
    job_id = run["jobs"][0]["id"]
    galaxy.wait_job(job_id, states=("running",), timeout=120)
    wait_for(lambda: _tool_processes("sleep", "299"), 120, "the tool's sleep on the node")
    external_id = galaxy.job(job_id)["external_id"]
    galaxy.api("DELETE", f"jobs/{job_id}")
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = {row["JobID"]: row["Status"] for row in stack.dirac_jobs()}.get(int(external_id))
        if status == "Killed":
            break
        time.sleep(0.5)
    history = stack.scheduler("GET", f"api/x-embedded/jobs/{int(external_id)}")["History"]
    assert status == "Killed", "; ".join(
        f"{h['Status']} / {h['MinorStatus']} / {h['ApplicationStatus']} ({h.get('Source')})" for h in history
    )
    assert galaxy.job(job_id, full=False)["state"] in ("deleted", "deleting", "deleted_new")
    wait_for(lambda: not _tool_processes("sleep", "299"), 30, "the killed tool's process to end")


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


def test_workflow_with_collection(stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = stack.galaxy
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


def test_restart_recovers_queued_and_running_jobs(stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = stack.galaxy
    history = galaxy.new_history("restart")
    data = galaxy.upload(history, "restart\n")
    before = len(stack.dirac_jobs())
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
    after = stack.dirac_jobs()
    assert len(after) - before == 3, after[before:]
    assert len({galaxy.job(j)["external_id"] for j in job_ids}) == 3
