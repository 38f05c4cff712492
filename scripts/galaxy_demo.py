"""One command, the whole system on one machine: a Galaxy workflow executed through DIRAC pilots.

Starts the embedded scheduler, the SiteDirector with its local CE, and a real Galaxy (SQLite, offline) configured
with ``examples/job_conf.yml``; uploads example data; runs ``examples/workflows/split-count-merge.gxwf.yml``
(split a text into a collection, count the words of each part as one job per element, merge the counts); prints
each step's Galaxy state, DIRAC job id, site, pilot, state and timings, the outputs, and where the logs are; then
stops everything it started. Progress is printed as it happens. Everything lives under ``var/galaxy-demo`` and is
recreated on every run. ``--keep`` leaves the stack running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import WMSServer  # noqa: E402
from tests.galaxy_server import GalaxyServer  # noqa: E402

VAR = ROOT / "var" / "galaxy-demo"
WORKFLOW = ROOT / "examples" / "workflows" / "split-count-merge.gxwf.yml"
DATA = ROOT / "examples" / "data" / "poem.txt"
SITE = "Local.test"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class SiteDirector:
    """``sitedirector run`` with one local queue serving the scheduler's demand."""

    def __init__(self, wms: WMSServer, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "director.token").write_text(wms.token("director") + "\n")
        config = {
            "scheduler": {"url": wms.url, "token_file": "director.token"},
            "cycle_interval": 2,
            "boot_grace": 30,
            "work_dir": str(home / "work"),
            "pilot": {"python": sys.executable, "heartbeat_interval": 5, "max_idle": 60, "max_empty_matches": 6},
            "queues": [
                {
                    "name": "local",
                    "type": "local",
                    "site": SITE,
                    "ce": "localhost",
                    "max_total": 2,
                    "max_waiting": 2,
                    "per_cycle": 2,
                    "processors": 1,
                    "options": {"slots": 2},
                },
            ],
        }
        self.config = home / "sitedirector.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = VAR / "logs" / "sitedirector.log"
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sitedirector.cli", "run", "-c", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def dirac_job(admin: requests.Session, wms: WMSServer, job_id: str | None) -> dict[str, Any]:
    if not job_id:
        return {}
    response = admin.get(f"{wms.url}/api/x-embedded/jobs/{job_id}", timeout=30)
    return response.json() if response.ok else {}


def run_workflow(galaxy: GalaxyServer, wms: WMSServer, admin: requests.Session) -> int:
    history = galaxy.new_history("galaxy-dirac demo")
    say(f"uploading {DATA.relative_to(ROOT)}")
    data = galaxy.upload(history, DATA.read_text(), name=DATA.name)
    galaxy.wait_dataset(data)
    workflow = galaxy.api("POST", "workflows", json={"workflow": yaml.safe_load(WORKFLOW.read_text())})
    say(f"invoking workflow '{WORKFLOW.name}'")
    started = time.monotonic()
    invocation = galaxy.api(
        "POST",
        f"workflows/{workflow['id']}/invocations",
        json={"history_id": history, "inputs": {"text": {"src": "hda", "id": data}}, "inputs_by": "name"},
    )
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = galaxy.api("GET", f"invocations/{invocation['id']}", params={"step_details": True})
        for job in galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "view": "collection"}):
            line = job["state"]
            full = galaxy.job(job["id"], full=False)
            dirac = dirac_job(admin, wms, full.get("external_id"))
            if dirac:
                line += f" / DIRAC {dirac['JobID']} {dirac['Status']}"
            if seen.get(job["id"]) != line:
                seen[job["id"]] = line
                say(f"  {job['tool_id']:<18} galaxy job {job['id'][:8]}: {line}")
        outputs = state.get("outputs") or {}
        merged = outputs.get("merged")
        if state["state"] in ("failed", "cancelled"):
            say(f"workflow invocation {state['state']}")
            return 1
        if merged and galaxy.api("GET", f"datasets/{merged['id']}")["state"] in ("ok", "error"):
            break
        time.sleep(1)
    else:
        say("workflow did not finish in 15 minutes")
        return 1
    wall = time.monotonic() - started
    say(f"workflow finished in {wall:.1f} s; per job:")
    print(
        f"    {'tool':<18} {'galaxy':<7} {'DIRAC id':>8} {'site':<11} {'pilot':<34} {'status':<7} "
        f"{'waiting→matched':>15} {'running':>8}"
    )
    for job in galaxy.api("GET", "jobs", params={"invocation_id": invocation["id"], "view": "collection"}):
        full = galaxy.job(job["id"], full=False)
        dirac = dirac_job(admin, wms, full.get("external_id"))
        at = {
            h["Status"]: dt.datetime.fromisoformat(h["StatusTime"].replace("Z", "+00:00"))
            for h in dirac.get("History", [])
        }
        waited = (at["Matched"] - at["Waiting"]).total_seconds() if {"Matched", "Waiting"} <= set(at) else float("nan")
        ran = (at["Done"] - at["Running"]).total_seconds() if {"Done", "Running"} <= set(at) else float("nan")
        print(
            f"    {job['tool_id']:<18} {job['state']:<7} {dirac.get('JobID', '-'):>8} {dirac.get('Site', '-'):<11} "
            f"{','.join(dirac.get('Pilots', [])) or '-':<34} {dirac.get('Status', '-'):<7} {waited:>14.2f}s "
            f"{ran:>7.2f}s"
        )
    content = galaxy.content(merged["id"])
    say("merged output (words per part):")
    for line in content.splitlines():
        print(f"    {line}")
    expected = len(DATA.read_text().split())
    total = sum(int(line.split()[-1]) for line in content.splitlines() if line.split())
    say(f"total {total} words; wc over the whole input says {expected}")
    return 0 if total == expected else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    args = parser.parse_args()
    begun = time.monotonic()
    shutil.rmtree(VAR, ignore_errors=True)
    (VAR / "logs").mkdir(parents=True)
    wms = galaxy = director = None
    try:
        say("starting the embedded scheduler")
        wms = WMSServer(VAR / "wms", maintenance_interval=5).start()
        token_file = VAR / "runner.token"
        token_file.write_text(wms.token("runner", "galaxy", "galaxy_user") + "\n")
        admin = requests.Session()
        admin.headers["Authorization"] = f"Bearer {wms.token('admin')}"
        say(f"scheduler at {wms.url}; starting the SiteDirector (local CE, site {SITE})")
        director = SiteDirector(wms, VAR / "sitedirector")
        say("preparing Galaxy (its side venv is built on first use; this takes a while once)")
        galaxy = GalaxyServer(
            VAR / "galaxy", env={"GALAXY_DIRAC_SCHEDULER_URL": wms.url, "GALAXY_DIRAC_TOKEN_FILE": str(token_file)}
        )
        say(f"starting Galaxy at {galaxy.url}")
        galaxy.start()
        say(f"Galaxy ready in {galaxy.startup_seconds[-1]:.1f} s")
        status = run_workflow(galaxy, wms, admin)
        say(
            f"logs: scheduler {wms.log_path}, Galaxy {galaxy.log_path}, SiteDirector {director.log}, "
            f"pilots {VAR / 'sitedirector' / 'work'}"
        )
        say(f"demo wall time {time.monotonic() - begun:.1f} s")
        if args.keep:
            say(f"Galaxy {galaxy.url} (admin key in {galaxy.config_path}); Ctrl-C stops everything")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return status
    finally:
        for part in (galaxy, director, wms):
            if part is not None:
                part.stop()
        say("stopped Galaxy, the SiteDirector and the scheduler")


if __name__ == "__main__":
    sys.exit(main())
