"""TPV routes jobs of a real Galaxy to DIRAC, and Galaxy's job information shows where a DIRAC job ran.

Galaxy runs with ``examples/tpv/job_conf.yml`` and ``examples/tpv/dirac.yml`` as they are (TPV 3.3 from Galaxy's
side venv); a real scheduler and a real pilot process (with a CE, queue and stamp of its own) run the jobs.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import time
import uuid
from typing import Any, Dict, Iterator

import pytest

from galaxy_dirac import jdl
from tests.galaxy_server import ADMIN_KEY, EXAMPLES, GalaxyServer
from tests.galaxy_stack import GalaxyStack, galaxy_stack

pytestmark = [pytest.mark.galaxy, pytest.mark.slow]

TIMINGS: Dict[str, float] = {}
CE = "ce01.tpv.example.org"
QUEUE = "grid-long"


@pytest.fixture(scope="module")
def tpv_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GalaxyStack]:
    def use_tpv(galaxy: GalaxyServer) -> None:
        # The example job_conf names its TPV rules relative to Galaxy's working directory, as an admin's would.
        config = galaxy.config_path.read_text()
        plain = f"job_config_file: {EXAMPLES}/job_conf.yml"
        assert plain in config
        galaxy.config_path.write_text(config.replace(plain, f"job_config_file: {EXAMPLES}/tpv/job_conf.yml"))
        (galaxy.home / "tpv").symlink_to(EXAMPLES / "tpv", target_is_directory=True)

    stamp = f"tpv-{uuid.uuid4().hex[:12]}"
    with galaxy_stack(tmp_path_factory.mktemp("tpv-stack"), before_start=use_tpv) as stack:
        TIMINGS["galaxy_startup"] = stack.galaxy.startup_seconds[-1]
        # A pilot (2 cores, 8 GB) for Local.test that says which CE and queue it came from.
        stack.add_pilot("pilot", args=["--ce", CE, "--queue", QUEUE, "--stamp", stamp, "--memory", "8000"])
        stack.extra["stamp"] = stamp
        yield stack
    sys.stderr.write(f"\ntpv stack timings: {TIMINGS}\n")


def _dirac_job_count(stack: GalaxyStack) -> int:
    return len(stack.dirac_jobs())


@pytest.fixture(scope="module")
def cat_job(tpv_stack: GalaxyStack) -> Dict[str, Any]:
    """gd_cat, which the TPV rules send to DIRAC with 2 cores and 3 GB, run once to the end."""
    galaxy: GalaxyServer = tpv_stack.galaxy
    history = galaxy.new_history("tpv")
    first = galaxy.upload(history, "alpha\n")
    second = galaxy.upload(history, "beta\n")
    started = time.monotonic()
    run = galaxy.run_tool(
        history, "gd_cat", {"input1": {"src": "hda", "id": first}, "input2": {"src": "hda", "id": second}}
    )
    job = galaxy.wait_job(run["jobs"][0]["id"], timeout=240)
    TIMINGS["gd_cat_submit_to_ok"] = time.monotonic() - started
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    return job


def test_tpv_sends_the_tool_to_dirac_with_its_cores_and_memory(tpv_stack: GalaxyStack, cat_job: Dict) -> None:
    galaxy: GalaxyServer = tpv_stack.galaxy
    admin = {"x-api-key": ADMIN_KEY}
    destination = galaxy.api("GET", f"jobs/{cat_job['id']}/destination_params", headers=admin)
    assert destination["Runner"] == "dirac", destination
    assert destination["Runner Job ID"] == cat_job["external_id"]
    # TPV evaluated the params templates of examples/tpv/dirac.yml with the tool's cores=2 and mem=3 (GB).
    assert (destination["processors"], destination["memory"], destination["cpu_time"]) == ("2", "3072", "43200")
    received = tpv_stack.received_jdl(cat_job["external_id"])
    assert jdl.lookup(received, "NumberOfProcessors") == 2, received
    assert jdl.lookup(received, "MinRAM") == 3072 and jdl.lookup(received, "MaxRAM") == 3072, received
    assert jdl.lookup(received, "CPUTime") == 43200
    assert jdl.lookup(received, "JobGroup") == "galaxy-dirac-tpv"
    # The cores and memory reached the tool: the payload set GALAXY_SLOTS and GALAXY_MEMORY_MB from the JDL, and
    # Galaxy's own core metrics, read from the job script's instrumentation, say so.
    assert galaxy.content(cat_job["outputs"]["extra"]["id"]).strip() == "slots=2"
    core = {m["title"]: m["value"] for m in galaxy.api("GET", f"jobs/{cat_job['id']}/metrics") if m["plugin"] == "core"}
    assert (core.get("Cores Allocated"), core.get("Memory Allocated (MB)")) == ("2", "3072"), core
    assert galaxy.content(cat_job["outputs"]["out_file1"]["id"]) == "alpha\nbeta\n"


def test_tpv_keeps_other_tools_on_the_local_runner(tpv_stack: GalaxyStack) -> None:
    galaxy: GalaxyServer = tpv_stack.galaxy
    history = galaxy.new_history("tpv-local")
    data = galaxy.upload(history, "local\n")
    before = _dirac_job_count(tpv_stack)
    run = galaxy.run_tool(history, "gd_cat_local", {"input1": {"src": "hda", "id": data}})
    job = galaxy.wait_job(run["jobs"][0]["id"])
    assert job["state"] == "ok", f"{job}\n{galaxy.log_tail()}"
    destination = galaxy.api("GET", f"jobs/{job['id']}/destination_params", headers={"x-api-key": ADMIN_KEY})
    assert destination["Runner"] == "local", destination
    assert _dirac_job_count(tpv_stack) == before


def test_job_information_shows_where_the_dirac_job_ran(tpv_stack: GalaxyStack, cat_job: Dict) -> None:
    galaxy: GalaxyServer = tpv_stack.galaxy
    dirac_id = int(cat_job["external_id"])
    scheduler = tpv_stack.scheduler("GET", f"api/x-embedded/jobs/{dirac_id}")
    metrics = galaxy.api("GET", f"jobs/{cat_job['id']}/metrics", headers={"x-api-key": ADMIN_KEY})
    dirac = {m["title"]: m for m in metrics if m["plugin"] == "dirac"}
    shown = {title: m["value"] for title, m in dirac.items()}
    assert shown["DIRAC job ID"] == str(dirac_id), shown
    assert shown["DIRAC site"] == scheduler["Site"] == "Local.test"
    assert shown["Computing element"] == CE
    assert shown["Computing element queue"] == QUEUE
    assert shown["DIRAC pilot"] == tpv_stack.extra["stamp"] == scheduler["Pilots"][-1]
    assert shown["DIRAC reschedules"] == str(scheduler["RescheduleCounter"]) == "0"
    start, end = (
        dt.datetime.fromisoformat(scheduler[k].replace("Z", "+00:00")) for k in ("StartExecTime", "EndExecTime")
    )
    wall = dirac["Wall time on the worker node"]
    assert float(wall["raw_value"]) == pytest.approx((end - start).total_seconds(), abs=0.01), (wall, start, end)
    assert wall["value"] == f"{float(wall['raw_value']):.1f} seconds"
    cpu = dirac["CPU time on the worker node"]
    assert float(cpu["raw_value"]) == pytest.approx(scheduler["HeartBeat"]["CPUConsumed"])
    assert re.fullmatch(r"\d+\.\d seconds", cpu["value"]), cpu
    memory = dirac["Peak memory on the worker node"]
    assert float(memory["raw_value"]) == pytest.approx(scheduler["HeartBeat"]["MaxMemoryUsed"])
    assert re.fullmatch(r"[\d.]+ (bytes|KiB|MiB|GiB)", memory["value"]), memory
    assert len(dirac) == 9, sorted(dirac)  # every DIRAC metric has its title: no raw names left
    # Where a job ran is infrastructure detail, like Galaxy's hostname metric: users do not see it by default.
    user_view = galaxy.api("GET", f"jobs/{cat_job['id']}/metrics")
    assert not [m for m in user_view if m["plugin"] == "dirac"], user_view
    assert [m for m in user_view if m["plugin"] == "core"], user_view
