"""End to end: a Galaxy workflow through the runner, the scheduler, the SiteDirector's local CE and real pilots.

The first test runs the demo itself (``scripts/galaxy_demo.py``), so the README's first command is tested as it is.
The fault test kills a pilot with SIGKILL while its job runs and restarts Galaxy during the workflow: the workflow
must still complete with the right output, every Galaxy job must map to exactly one DIRAC job (nothing submitted
twice), and the killed job must have been rescheduled by the scheduler rather than resubmitted by Galaxy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import galaxy_demo  # noqa: E402

from tests.conftest import WMSServer  # noqa: E402
from tests.galaxy_server import GalaxyServer  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.galaxy, pytest.mark.slow]

FAULT_WORKFLOW = """
class: GalaxyWorkflow
name: galaxy-dirac fault test
inputs:
  text: data
outputs:
  merged:
    outputSource: merge/out_file1
steps:
  split:
    tool_id: gd_split
    in:
      input1: text
  slow:
    tool_id: gd_sleep
    in:
      input1: split/parts
    tool_state:
      seconds: 8
  count:
    tool_id: gd_wc
    in:
      input1: slow/out_file1
  merge:
    tool_id: gd_collection_cat
    in:
      inputs: count/out_file1
"""


def test_demo_runs_the_workflow_through_dirac() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "galaxy_demo.py")], capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert "workflow finished" in done.stdout
    assert "wc over the whole input says" in done.stdout
    for tool in ("gd_split", "gd_wc", "gd_collection_cat"):
        assert tool in done.stdout


def _pilot_pids(stamp: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if stamp.encode() in cmdline and any(b"pilot" in part for part in cmdline):
                pids.append(int(proc.name))
    return pids


def _dirac_jobs(admin: requests.Session, wms: WMSServer) -> list[dict[str, Any]]:
    response = admin.post(
        f"{wms.url}/api/jobs/search",
        params={"per_page": 1000},
        json={"parameters": ["JobID", "JobName", "Status", "RescheduleCounter"]},
        timeout=30,
    )
    return response.json()


def test_pilot_killed_and_galaxy_restarted_during_the_workflow(tmp_path: Path) -> None:
    wms = WMSServer(tmp_path / "wms", maintenance_interval=1, stalled_after=4, failed_after=2).start()
    director = galaxy = None
    try:
        token_file = tmp_path / "runner.token"
        token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
        admin = requests.Session()
        admin.headers["Authorization"] = f"Bearer {wms.token('admin')}"
        galaxy_demo.VAR = tmp_path
        (tmp_path / "logs").mkdir(exist_ok=True)
        director = galaxy_demo.SiteDirector(wms, tmp_path / "sitedirector")
        galaxy = GalaxyServer(
            tmp_path / "galaxy",
            env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)},
        ).start()
        history = galaxy.new_history("fault")
        text = "one two\nthree four five\nsix\n"
        data = galaxy.upload(history, text)
        galaxy.wait_dataset(data)
        workflow = galaxy.api("POST", "workflows", json={"workflow": yaml.safe_load(FAULT_WORKFLOW)})
        invocation = galaxy.api(
            "POST",
            f"workflows/{workflow['id']}/invocations",
            json={"history_id": history, "inputs": {"text": {"src": "hda", "id": data}}, "inputs_by": "name"},
        )
        # Wait for a slow job running on a pilot, then kill that pilot outright.
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:
            jobs = galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "view": "collection"})
            for job in jobs:
                external_id = (
                    galaxy.job(job["id"], full=False).get("external_id") if job["tool_id"] == "gd_sleep" else None
                )
                if not external_id:
                    continue
                details = admin.get(f"{wms.url}/api/x-embedded/jobs/{external_id}", timeout=30).json()
                if details["Status"] == "Running" and details["Pilots"]:
                    pids = _pilot_pids(details["Pilots"][-1])
                    if pids:
                        victim = (details["JobID"], pids)
                        break
            time.sleep(0.5)
        assert victim, f"no slow job ever ran on a pilot: {_dirac_jobs(admin, wms)}"
        for pid in victim[1]:
            os.kill(pid, signal.SIGKILL)
        galaxy.stop()
        galaxy.start()
        merged = galaxy.wait_invocation_output(invocation["id"], "merged", timeout=600)
        lines = galaxy.content(merged["id"]).splitlines()
        assert sorted(int(line.split()[-1]) for line in lines) == [1, 2, 3]
        galaxy_jobs = galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "view": "collection"})
        assert {job["state"] for job in galaxy_jobs} == {"ok"}, galaxy_jobs
        dirac = _dirac_jobs(admin, wms)
        external = [galaxy.job(job["id"], full=False)["external_id"] for job in galaxy_jobs]
        assert len(set(external)) == len(external) == len(dirac), (external, dirac)
        killed = next(job for job in dirac if job["JobID"] == victim[0])
        assert killed["Status"] == "Done" and killed["RescheduleCounter"] >= 1, killed
    finally:
        for part in (galaxy, director, wms):
            if part is not None:
                part.stop()
