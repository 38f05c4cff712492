"""The pilot wrapper and cloud-init user data, executed for real: bash runs the wrapper in a temp dir on this
machine against the real scheduler process, and the embedded pilot matches and runs a job."""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sitedirector.bundle import VM_USER, WRAPPER_PATH, Bundle
from sitedirector.config import PilotSettings, QueueConfig

from .conftest import Scheduler, jdl, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")

SITE = "LCG.Bundle.test"


def make_bundle(url: str = "http://127.0.0.1:1", token: str = "secret-token-value", site: str = SITE) -> Bundle:
    queue = QueueConfig(name="q1", type="local", site=site, ce="ce.test", tags=["GPU"], processors=2, memory=1000)
    return Bundle(url, token, queue, PilotSettings(max_idle=5, max_empty_matches=1, heartbeat_interval=1))


def run_wrapper(script: str, tmp: Path, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    path = tmp / "wrapper.sh"
    path.write_text(script)
    base = tmp / "scratch"
    base.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_")}
    clean.update({"GALAXY_DIRAC_PILOT_BASE": str(base), "GALAXY_DIRAC_PILOT_MATCH_WAIT": "1", **(env or {})})
    return subprocess.run(["bash", str(path)], env=clean, cwd=tmp, capture_output=True, text=True, timeout=timeout)


def test_wrapper_keeps_token_off_the_command_line() -> None:
    b = make_bundle()
    script = b.wrapper("stamp1")
    assert script.startswith("#!/bin/bash\n")
    assert "secret-token-value" not in script
    assert "--token-file" in script and "--token " not in script
    args = b.pilot_args("stamp1")
    for flag, value in (("--stamp", "stamp1"), ("--site", SITE), ("--tags", "GPU"), ("--processors", "2")):
        assert args[args.index(flag) + 1] == value
    assert len(script) < 64_000


def test_wrapper_runs_the_pilot_against_the_scheduler(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    site = f"LCG.{uid}.test"
    (job_id,) = scheduler.submit(jdl(site, Arguments="from the wrapper"))
    b = make_bundle(scheduler.url, scheduler.pilot_token, site)
    result = run_wrapper(b.wrapper(f"wrapper{uid}"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert scheduler.job(job_id)["Status"] == "Done"
    (row,) = scheduler.pilots(stamp=f"wrapper{uid}")
    assert (row["Status"], row["MatchedJobs"], row["GridSite"]) == ("Done", 1, site)
    assert list((tmp_path / "scratch").iterdir()) == [], "the wrapper removes its work dir (and the token)"


def test_wrapper_without_python_fails_clearly(tmp_path: Path) -> None:
    result = run_wrapper(make_bundle().wrapper("s"), tmp_path, env={"GALAXY_DIRAC_PILOT_PYTHON": "no-such-python"})
    assert result.returncode == 70
    assert "no-such-python not found" in result.stderr


def test_wrapper_passes_on_the_pilot_exit_status(tmp_path: Path) -> None:
    # Nothing listens on port 1: the pilot cannot register and exits non-zero; so must the wrapper.
    result = run_wrapper(make_bundle().wrapper("s"), tmp_path, timeout=120)
    assert result.returncode not in (0, 70, 71, 72), result.stderr


def test_cloud_init_runs_wrapper_unprivileged_and_powers_off(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    site, stamp = f"LCG.{uid}.test", f"vm{uid}"
    b = make_bundle(scheduler.url, scheduler.pilot_token, site)
    user_data = b.cloud_init(stamp)
    # Nova accepts at most 65,535 bytes of base64 user data; cloud-init un-gzips by itself.
    assert len(base64.b64encode(user_data)) < 65535
    text = gzip.decompress(user_data).decode()
    assert text == b.cloud_config(stamp) and text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert {"name": VM_USER, "shell": "/bin/bash", "lock_passwd": True} in doc["users"]
    (wf,) = doc["write_files"]
    assert (wf["path"], wf["permissions"], wf["encoding"]) == (WRAPPER_PATH, "0700", "gz+b64")
    run = " ".join(doc["runcmd"][-1])
    assert "su -s /bin/bash -c" in run and run.rstrip().split(">")[0].strip().endswith(VM_USER)
    assert doc["power_state"]["mode"] == "poweroff" and doc["power_state"]["condition"] is True
    # The embedded wrapper is the real one: run it here as this (unprivileged) user.
    (job_id,) = scheduler.submit(jdl(site, Arguments="from a VM"))
    result = run_wrapper(gzip.decompress(base64.b64decode(wf["content"])).decode(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert scheduler.job(job_id)["Status"] == "Done"
    wait_for(lambda: scheduler.pilots(stamp=stamp)[0]["Status"] == "Done", 10, "pilot Done")


@pytest.mark.skipif(sys.platform != "linux", reason="linux only")
def test_wrapper_forwards_sigterm_to_the_pilot(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    b = make_bundle(scheduler.url, scheduler.pilot_token, f"LCG.{uid}.test")
    b.pilot = PilotSettings(max_idle=300, max_empty_matches=1000, heartbeat_interval=1)
    path = tmp_path / "wrapper.sh"
    path.write_text(b.wrapper(f"term{uid}"))
    base = tmp_path / "scratch"
    base.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_")}
    env.update(GALAXY_DIRAC_PILOT_BASE=str(base), GALAXY_DIRAC_PILOT_MATCH_WAIT="1")
    proc = subprocess.Popen(["bash", str(path)], env=env)
    try:
        wait_for(lambda: scheduler.pilots(stamp=f"term{uid}"), 30, "the pilot to register")
        proc.terminate()
        proc.wait(30)
        assert list(base.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
