"""The pilot wrapper and cloud-init user data, executed for real: bash runs the wrapper in a temp dir on this
machine against the real scheduler process, and the embedded pilot matches and runs a job. Each pilot carries
its own token: embedded in a one-stamp wrapper, delivered as a file beside the shared one."""

from __future__ import annotations

import base64
import gzip
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from galaxy_dirac.wms.auth import verify_token_with_expiry
from sitedirector.bundle import VM_USER, WRAPPER_PATH, Bundle, token_file
from sitedirector.config import PilotSettings, QueueConfig
from sitedirector.director import SchedulerClient

from .conftest import Scheduler, jdl, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")

SITE = "LCG.Bundle.test"


def make_bundle(url: str = "http://127.0.0.1:1", token: str = "secret-token-value", site: str = SITE) -> Bundle:
    queue = QueueConfig(name="q1", type="local", site=site, ce="ce.test", tags=["GPU"], processors=2, memory=1000)
    return Bundle(url, token, queue, PilotSettings(max_idle=5, max_empty_matches=1, heartbeat_interval=1))


def run_wrapper(
    script: str, tmp: Path, env: dict | None = None, timeout: float = 90, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    path = tmp / "wrapper.sh"
    path.write_text(script)
    base = tmp / "scratch"
    base.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GALAXY_DIRAC_")}
    clean.update({"GALAXY_DIRAC_PILOT_BASE": str(base), "GALAXY_DIRAC_PILOT_MATCH_WAIT": "1", **(env or {})})
    return subprocess.run(
        ["bash", str(path), *args], env=clean, cwd=tmp, capture_output=True, text=True, timeout=timeout
    )


def embedded_token(script: str) -> str:
    """The token a wrapper script carries (compressed and base64-encoded, as the wrapper writes it)."""
    (blob,) = re.findall(r'^token = zlib\.decompress\(base64\.b64decode\("([^"]*)"\)\)$', script, re.M)
    return zlib.decompress(base64.b64decode(blob)).decode()


def cloud_init_wrapper(user_data: bytes) -> str:
    (wf,) = yaml.safe_load(gzip.decompress(user_data).decode())["write_files"]
    return gzip.decompress(base64.b64decode(wf["content"])).decode()


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


def test_each_pilot_carries_its_own_token_and_no_other() -> None:
    b = make_bundle(token="shared-token")
    assert embedded_token(b.wrapper("s1")) == "shared-token" and b.token_files(["s1"]) == {}, "nothing issued yet"
    b.issue({"s1": "token-of-s1", "s2": "token-of-s2"})
    for stamp, other in (("s1", "token-of-s2"), ("s2", "token-of-s1")):
        assert embedded_token(b.wrapper(stamp)) == f"token-of-{stamp}"
        assert embedded_token(cloud_init_wrapper(b.cloud_init(stamp))) == f"token-of-{stamp}"
        assert b.pilot_env(stamp) == {"GALAXY_DIRAC_PILOT_TOKEN": f"token-of-{stamp}"}
        assert other not in b.cloud_config(stamp) and "shared-token" not in b.cloud_config(stamp)
    # The script a whole cluster shares carries no token at all: the CE delivers each pilot's beside it.
    assert embedded_token(b.wrapper(None)) == ""
    assert b.token_files(["s2"]) == {"s2": "token-of-s2"}
    with pytest.raises(KeyError, match="no token was issued for pilot s3"):
        b.wrapper("s3")  # never the shared token (or another pilot's) by accident
    b.issue(None)  # an older scheduler: the shared token again, in the shared wrapper too
    assert embedded_token(b.wrapper(None)) == "shared-token" and b.token_files(["s1"]) == {}


def test_shared_wrapper_runs_the_pilot_with_its_delivered_token(scheduler: Scheduler, tmp_path: Path, uid: str) -> None:
    """``wrapper(None)`` with the stamp as $1 reads pilot-token-<stamp> from its working directory, moves it into
    the private work dir and deletes it; the pilot registers and runs a job with that one-pilot token."""
    site, stamp = f"LCG.{uid}.test", f"file{uid}"
    tokens = SchedulerClient(scheduler.url, scheduler.director_token).pilot_tokens([stamp], site)
    assert tokens is not None
    b = make_bundle(scheduler.url, "shared-token", site)
    b.issue(tokens)
    script = b.wrapper(None)
    missing = run_wrapper(script, tmp_path, args=(stamp,))
    assert missing.returncode == 72 and f"no pilot token: {token_file(stamp)} was not delivered" in missing.stderr
    (job_id,) = scheduler.submit(jdl(site, Arguments="with its own token"))
    delivered = tmp_path / token_file(stamp)
    delivered.write_text(tokens[stamp] + "\n")
    result = run_wrapper(script, tmp_path, args=(stamp,))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not delivered.exists(), "the wrapper deletes the delivered token file"
    assert list((tmp_path / "scratch").iterdir()) == []
    assert scheduler.job(job_id)["Status"] == "Done"
    (row,) = scheduler.pilots(stamp=stamp)
    assert (row["Status"], row["MatchedJobs"], row["GridSite"]) == ("Done", 1, site)
    principal, _ = verify_token_with_expiry(scheduler.server.key, tokens[stamp])
    assert (principal.role, principal.pilot_stamp, principal.pilot_site) == ("pilot", stamp, site)
