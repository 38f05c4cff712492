"""Local CE end to end: the real scheduler process, the real ``sitedirector`` CLI, real pilot processes.

Demand appears (jobs submitted with a runner token) → a director cycle starts local pilots → the jobs run
to Done → the pilots stop when idle and report Done to PilotAgents → the next cycle cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from galaxy_dirac.wms.auth import verify_token_with_expiry
from sitedirector.config import load
from sitedirector.director import Director

from .conftest import Scheduler, jdl, wait_for, write_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local pilots need /proc")


def sitedirector(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sitedirector.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def local_queue(uid: str, **over: object) -> dict:
    q = {"name": f"local{uid}", "type": "local", "site": f"LCG.{uid}.test", "ce": "localhost"}
    q.update(max_total=4, max_waiting=4)
    q.update(over)
    q.setdefault("options", {"slots": 4})
    return q


def test_demand_to_pilots_to_done(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    q = local_queue(uid)
    name, site = q["name"], q["site"]
    cfg = write_config(tmp_path / "sd.yml", scheduler, [q])
    job_ids = scheduler.submit(*(jdl(site, Arguments=f"job {i}") for i in range(3)))
    demand = lambda: sum(tq["WaitingJobs"] for tq in scheduler.demand() if tq["Sites"] == [site])  # noqa: E731
    wait_for(lambda: demand() == 3, 10, "demand")

    dry = sitedirector("once", "--dry-run", "-c", str(cfg))
    assert dry.returncode == 0, dry.stderr
    assert f"{name}: submit 3 [matching jobs 3" in dry.stdout
    assert scheduler.pilots(queue=name) == [], "a dry run starts nothing"

    result = sitedirector("once", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    assert f"{name}: submitted 3/3 pilots" in result.stderr
    # Same log format as galaxy-dirac-wms.
    assert any(" INFO    sitedirector: " in line for line in result.stderr.splitlines()), result.stderr
    pilots = scheduler.pilots(queue=name)
    assert len(pilots) == 3 and all(p["GridSite"] == site for p in pilots)
    # The cycle's decision is on the scheduler's monitoring page.
    shown = scheduler.server.api("GET", "/api/x-embedded/monitoring/sitedirector")
    assert any(str(d).count(name) and "submit 3" in str(d) for d in shown), shown

    for job_id in job_ids:
        wait_for(lambda j=job_id: scheduler.job(j)["Status"] == "Done", 60, f"job {job_id} Done")

    # A second cycle while pilots finish: demand is gone, so no new pilots.
    again = sitedirector("once", "-c", str(cfg))
    assert "submitted" not in again.stderr, again.stderr

    def all_done() -> bool:
        return all(p["Status"] == "Done" for p in scheduler.pilots(queue=name))

    wait_for(all_done, 60, "pilots to stop when idle and report Done")
    assert sum(p["MatchedJobs"] for p in scheduler.pilots(queue=name)) == 3

    work = tmp_path / "work" / name
    wait_for(lambda: all((d / "rc").exists() for d in work.iterdir() if d.is_dir()), 30, "pilot processes to exit")
    sitedirector("once", "-c", str(cfg))
    assert not [d for d in work.iterdir() if d.is_dir()], "finished pilots' directories are cleaned up"

    status = sitedirector("status", "--json", "-c", str(cfg))
    assert status.returncode == 0, status.stderr
    table = json.loads(status.stdout)
    assert table[0]["queue"] == name and table[0]["states"] == {"Done": 3}


def test_empty_pilots_are_counted(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    """A pilot that finds no job ends Done with no match; the director counts and reports it."""
    # Two empty matches: the pilot lives through its first idle back-off (5 s), so the director sees it live.
    pilot = {"max_idle": 30, "max_empty_matches": 2, "heartbeat_interval": 1}
    q = local_queue(uid)
    name = q["name"]
    cfg = write_config(tmp_path / "sd.yml", scheduler, [q], pilot=pilot)
    director = Director(load(cfg))
    try:
        st = director.queues[name]
        director._submit(st, 1)  # no demand: this pilot will come back empty
        director.cycle(wait=True)
        wait_for(lambda: scheduler.pilots(queue=name)[0]["Status"] == "Done", 60, "the empty pilot to end")
        director.cycle(wait=True)
        assert (st.finished, st.empty) == (1, 1)
        assert director.status_table()[0]["empty"] == 1
        assert scheduler.pilots(queue=name)[0]["MatchedJobs"] == 0
    finally:
        director.shutdown()


def test_slot_limit_and_kill(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    """The local CE never runs more pilots than slots; killed pilots end Deleted."""
    cfg = write_config(
        tmp_path / "sd.yml",
        scheduler,
        [local_queue(uid, options={"slots": 2}, max_total=10, max_waiting=10)],
        pilot={"max_idle": 60, "max_empty_matches": 100, "heartbeat_interval": 1},
    )
    director = Director(load(cfg))
    try:
        st = director.queues[f"local{uid}"]
        refs = st.ce.submit(["a" * 32, "b" * 32, "c" * 32])
        assert len(refs) == 2
        from sitedirector.ce.base import CEQueueFull

        with pytest.raises(CEQueueFull):
            st.ce.submit(["d" * 32])
        assert {s.state for s in st.ce.status(refs).values()} == {"Running"}
        st.ce.kill(refs)
        wait_for(lambda: {s.state for s in st.ce.status(refs).values()} == {"Deleted"}, 20, "pilots killed")
        wait_for(lambda: st.ce.running() == 0, 20, "slots free")
        for ref in refs:
            pid = int((st.ce.work_dir / ref.stamp / "pid").read_text())
            wait_for(lambda p=pid: st.ce.status(refs) and not Path(f"/proc/{p}").exists(), 20, "killed pilots to exit")
    finally:
        director.shutdown()


def test_run_stops_cleanly_on_sigterm(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    q = local_queue(uid)
    cfg = write_config(tmp_path / "sd.yml", scheduler, [q])
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sitedirector.cli", "run", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        scheduler.submit(jdl(q["site"]))
        wait_for(lambda: "submitted 1/1" in log.read_text(), 30, "the daemon to start a pilot")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
        assert log.read_text().rstrip().endswith("sitedirector: stopped")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_each_local_pilot_runs_with_its_own_token_only(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    """The director mints a token per pilot; each pilot registers and runs a job with it, and the token is
    refused for anything another pilot (or another site, or a director) would do."""
    q = local_queue(uid)
    name, site = q["name"], q["site"]
    pilot = {"max_idle": 30, "max_empty_matches": 2, "heartbeat_interval": 1}
    cfg = write_config(tmp_path / "sd.yml", scheduler, [q], pilot=pilot)
    job_ids = scheduler.submit(jdl(site, Arguments="one"), jdl(site, Arguments="two"))
    director = Director(load(cfg))
    try:
        director.cycle(wait=True)
        st = director.queues[name]
        assert st.submitted == 2, st.health
        stamps = sorted(p["PilotStamp"] for p in scheduler.pilots(queue=name))
        tokens = {stamp: st.bundle.token_for(stamp) for stamp in stamps}
        key = scheduler.server.key
        for stamp, token in tokens.items():
            principal, _ = verify_token_with_expiry(key, token)
            assert (principal.role, principal.pilot_stamp, principal.pilot_site) == ("pilot", stamp, site)
            # The token is what the pilot process got, in its environment (readable by this user only).
            pid = int((st.ce.work_dir / stamp / "pid").read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"GALAXY_DIRAC_PILOT_TOKEN={token}".encode() in environ
            assert not any(t.encode() in b"".join(environ) for s, t in tokens.items() if s != stamp)
        for job_id in job_ids:
            wait_for(lambda j=job_id: scheduler.job(j)["Status"] == "Done", 60, f"job {job_id} Done")
        wait_for(lambda: all(p["Status"] == "Done" for p in scheduler.pilots(queue=name)), 60, "pilots Done")
        assert sum(p["MatchedJobs"] for p in scheduler.pilots(queue=name)) == 2

        mine, other = stamps
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {tokens[mine]}"
        api = f"{scheduler.url}/api/x-embedded"
        refused = {
            "mark another pilot Failed": http.patch(f"{api}/pilots/{other}", json={"status": "Failed"}, timeout=30),
            "register as another pilot": http.post(f"{api}/pilots/register", json={"stamp": other, "site": site},
                                                   timeout=30),
            "match as another pilot": http.post(f"{api}/match", json={"Site": site, "PilotStamp": other}, timeout=30),
            "match at another site": http.post(f"{api}/match", json={"Site": "LCG.Other.org", "PilotStamp": mine},
                                               timeout=30),
            "mint pilot tokens": http.post(f"{api}/pilots/tokens", json={"stamps": ["x"], "site": site}, timeout=30),
        }  # fmt: skip
        assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)
        assert scheduler.pilots(stamp=other)[0]["Status"] == "Done", "the other pilot's record is untouched"
        own = http.patch(f"{api}/pilots/{mine}", json={"status": "Done", "reason": "again"}, timeout=30)
        assert own.status_code == 200, own.text
    finally:
        director.shutdown()
