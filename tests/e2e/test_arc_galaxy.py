"""End to end on a real ARC CE: Galaxy jobs → DiracJobRunner → scheduler → ``sitedirector run`` → A-REX → pilots.

A real A-REX (ARC 6, fork LRMS, ``tests/sitedirector/arc_server.py``), the embedded scheduler, a real Galaxy whose
job conf sends the example cat tools to DIRAC at the ARC queue's site, and the SiteDirector daemon as an operator
runs it, with one ARC queue. Demand rises (three Galaxy jobs, more than the queue's two-pilot limit), the director
keeps at most two pilots on the CE, they register, run all three jobs (both transports: the pilots run as the CE's
job account in A-REX's session directory) and end; demand falls and over the following cycles no pilot is
submitted, and the finished ones are cleaned off the CE; a single new job then gets exactly one new pilot.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from sitedirector.ce.arc import ArcComputingElement
from sitedirector.config import Credential, QueueConfig
from tests.conftest import WMSServer, wait_for
from tests.galaxy_server import EXAMPLES, ROOT, GalaxyServer
from tests.sitedirector import arc_server

pytestmark = [pytest.mark.galaxy, pytest.mark.arc, pytest.mark.e2e, pytest.mark.slow]

SITE = "ARC.galaxy-e2e.test"
QUEUE = "arc-galaxy"
MAX_PILOTS = 2
FINAL = {"Done", "Failed", "Aborted", "Deleted"}


@pytest.fixture(scope="module")
def arex() -> Iterator[arc_server.ArcCE]:
    with arc_server.running_arex() as ce:
        yield ce


class SiteDirectorRun:
    """``sitedirector run`` in its own session, one ARC queue; stopped by its PID."""

    def __init__(self, home: Path, wms: WMSServer, ce: arc_server.ArcCE) -> None:
        home.mkdir(parents=True, exist_ok=True)
        config = {
            "scheduler": {"url": wms.url, "token": wms.token("director")},
            "cycle_interval": 2,
            "work_dir": str(home / "work"),
            "credentials": {"proxy": {"type": "proxy", "file": str(ce.proxy)}},
            # Pilots leave after one empty match, so demand falling shows as pilots ending.
            "pilot": {"python": "/usr/bin/python3", "max_idle": 5, "max_empty_matches": 1, "heartbeat_interval": 1},
            "queues": [
                {
                    "name": QUEUE, "type": "arc", "site": SITE, "ce": "arc-localhost", "endpoint": ce.endpoint,
                    "queue": "fork", "max_total": MAX_PILOTS, "max_waiting": MAX_PILOTS, "per_cycle": MAX_PILOTS,
                    "credentials": "proxy",
                    # An empty match is held open 1 s (not the 20 s long poll): idle pilots end sooner.
                    "options": {"verify": str(ce.ca_file), "environment": {"GALAXY_DIRAC_PILOT_MATCH_WAIT": "1"}},
                }
            ],
        }  # fmt: skip
        self.config = home / "sitedirector.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = home / "sitedirector.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sitedirector.cli", "run", "-c", str(self.config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def submitted(self) -> int:
        """Pilots the daemon says it submitted (its "submitted n/m pilots" lines)."""
        return sum(int(n) for n in re.findall(rf"{QUEUE}: submitted (\d+)/\d+ pilots", self.log()))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class Watch:
    """Samples the queue's pilots in the scheduler and its jobs on the CE; keeps the peaks seen."""

    def __init__(self, wms: WMSServer, ce: arc_server.ArcCE, work: Path) -> None:
        self.url = wms.url
        self.admin = requests.Session()
        self.admin.trust_env = False
        self.admin.headers["Authorization"] = f"Bearer {wms.token('admin')}"
        # The pilots' own identity on the CE (same proxy): what is on A-REX for it, independent of the director.
        queue = QueueConfig(
            name="watch", type="arc", site=SITE, ce="arc-localhost", endpoint=ce.endpoint, queue="fork",
            credentials=Credential("proxy", "proxy", {"file": str(ce.proxy)}),
            options={"verify": str(ce.ca_file), "work_dir": str(work)},
        )  # fmt: skip
        self.ce = ArcComputingElement(queue)
        self.peak_live = 0
        self.peak_on_ce = 0
        self.on_ce: set[str] = set()

    def get(self, path: str) -> Any:
        resp = self.admin.get(f"{self.url}{path}", timeout=30)
        assert resp.ok, f"GET {path}: {resp.status_code} {resp.text[:500]}"
        return resp.json()

    def pilots(self) -> list[dict]:
        return [p for p in self.get("/api/x-embedded/pilots") if p["GridSite"] == SITE]

    def waiting_jobs(self) -> int:
        return sum(tq["WaitingJobs"] for tq in self.get("/api/x-embedded/taskqueues/demand") if tq["Sites"] == [SITE])

    def decision(self) -> dict:
        return next((d for d in self.get("/api/x-embedded/monitoring/sitedirector") if d["Queue"] == QUEUE), {})

    def sample(self) -> list[dict]:
        pilots = self.pilots()
        self.peak_live = max(self.peak_live, sum(1 for p in pilots if p["Status"] not in FINAL))
        jobs = set(self.ce.list_jobs())
        self.on_ce |= jobs
        self.peak_on_ce = max(self.peak_on_ce, len(jobs))
        return pilots


def galaxy_job_conf(path: Path) -> Path:
    """``examples/job_conf.yml`` with the DIRAC environments sent to the ARC queue's site."""
    conf = yaml.safe_load((EXAMPLES / "job_conf.yml").read_text())
    for env in conf["execution"]["environments"].values():
        if env.get("runner") == "dirac":
            env["site"] = SITE
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def test_sitedirector_run_keeps_pilots_on_arc_for_galaxy_jobs(arex: arc_server.ArcCE, tmp_path: Path) -> None:
    wms = WMSServer(tmp_path / "wms", maintenance_interval=1).start()
    galaxy = director = watch = None
    try:
        token_file = tmp_path / "runner.token"
        token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
        galaxy = GalaxyServer(
            tmp_path / "galaxy",
            env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)},
            config={"job_config_file": str(galaxy_job_conf(tmp_path / "job_conf.yml"))},
        ).start()
        watch = Watch(wms, arex, tmp_path / "watch")
        history = galaxy.new_history("arc")
        alpha = galaxy.upload(history, "alpha\n", name="alpha.txt")
        beta = galaxy.upload(history, "beta\n", name="beta.txt")

        def run(tool: str, first: str, second: str) -> str:
            inputs = {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
            return galaxy.run_tool(history, tool, inputs)["jobs"][0]["id"]

        # --- demand rises: three jobs for a queue allowed two pilots --------------------------------------------
        # gd_cat_sandbox ships data in the sandboxes; gd_cat has the node pull and push through Galaxy's API.
        expected = {
            run("gd_cat_sandbox", alpha, beta): "alpha\nbeta\n",
            run("gd_cat_sandbox", beta, alpha): "beta\nalpha\n",
            run("gd_cat", alpha, alpha): "alpha\nalpha\n",
        }
        # All three wait in the task queue before the director starts, so its first cycle sees the whole demand.
        wait_for(lambda: watch.waiting_jobs() == 3, 180, f"3 DIRAC jobs waiting for {SITE}\n{galaxy.log_tail()}")
        director = SiteDirectorRun(tmp_path / "sitedirector", wms, arex)

        def galaxy_jobs_final() -> bool:
            watch.sample()
            assert director.process.poll() is None, f"sitedirector run exited:\n{director.log()}"
            return all(galaxy.job(j, full=False)["state"] in ("ok", "error", "failed") for j in expected)

        wait_for(galaxy_jobs_final, 300, f"the Galaxy jobs to end\n{arex.processes()}", interval=1)
        for job_id, content in expected.items():
            job = galaxy.job(job_id)
            assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}\n{director.log()[-4000:]}"
            assert galaxy.content(job["outputs"]["out_file1"]["id"]) == content
            assert galaxy.content(job["outputs"]["extra"]["id"]).strip() == "slots=1"

        pilots = watch.sample()
        stamps = {p["PilotStamp"]: p for p in pilots}
        # Demand (3) was above the queue's limit: exactly MAX_PILOTS pilots, never more at once, all on A-REX.
        assert len(pilots) == MAX_PILOTS, pilots
        assert watch.peak_live <= MAX_PILOTS and 0 < watch.peak_on_ce <= MAX_PILOTS, (watch.peak_live, watch.peak_on_ce)
        assert all(p["PilotJobReference"].startswith(arex.endpoint + "/") for p in pilots), pilots
        ce_ids = {watch.ce.job_id(p["PilotJobReference"]) for p in pilots}
        assert ce_ids <= watch.on_ce, (ce_ids, watch.on_ce)
        # Each Galaxy job ran as a DIRAC job at the ARC site, through one of these pilots.
        for job_id in expected:
            dirac = watch.get(f"/api/x-embedded/jobs/{galaxy.job(job_id)['external_id']}")
            assert dirac["Status"] == "Done" and dirac["Site"] == SITE, dirac
            assert dirac["Pilots"] and dirac["Pilots"][-1] in stamps, (dirac, stamps)

        # --- demand falls: the pilots end, later cycles submit nothing, the CE is cleaned --------------------------
        wait_for(lambda: all(p["Status"] == "Done" for p in watch.sample()), 120, "the idle pilots to end Done")
        assert sum(p["MatchedJobs"] for p in watch.pilots()) == 3
        quiet: set[str] = set()

        def quiet_and_cleaned() -> bool:
            watch.sample()
            d = watch.decision()
            if d and d["submit"] == 0 and d["matching_jobs"] == 0 and not d.get("skipped"):
                quiet.add(d["DecisionTime"])
            return len(quiet) >= 3 and not set(watch.ce.list_jobs()) & ce_ids

        wait_for(quiet_and_cleaned, 120, "three idle cycles and the finished pilots cleaned off A-REX", interval=1)
        assert len(watch.pilots()) == MAX_PILOTS and director.submitted() == MAX_PILOTS, director.log()[-4000:]

        # --- demand rises again, by one: exactly one new pilot ------------------------------------------------------
        last = run("gd_cat_sandbox", beta, beta)
        wait_for(lambda: watch.sample() is not None and galaxy.job(last, full=False)["state"] in ("ok", "error"), 240,
                 "the new Galaxy job to end", interval=1)  # fmt: skip
        job = galaxy.job(last)
        assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}\n{director.log()[-4000:]}"
        assert galaxy.content(job["outputs"]["out_file1"]["id"]) == "beta\nbeta\n"
        wait_for(lambda: all(p["Status"] == "Done" for p in watch.sample()), 120, "the new pilot to end Done")
        new = [p for p in watch.pilots() if p["PilotStamp"] not in stamps]
        assert len(new) == 1 and new[0]["MatchedJobs"] == 1, new
        assert director.submitted() == MAX_PILOTS + 1, director.log()[-4000:]
    finally:
        if director is not None:
            director.stop()
        if watch is not None:
            watch.ce.close()
        # The fork LRMS leaves payloads running when a job is killed or the CE stopped: end what ours started.
        arex.kill_jobs()
        if galaxy is not None:
            galaxy.stop()
        wms.stop()
        peaks = (watch.peak_live, watch.peak_on_ce) if watch is not None else None
        sys.stderr.write(f"\nA-REX timings {arex.timings}; peak live pilots, jobs on the CE: {peaks}\n")
